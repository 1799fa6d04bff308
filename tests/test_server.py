"""Generation server (real uvicorn on 127.0.0.1 in a thread, real vLLM) and its client ServerEngine.

Reference outputs come from transformers with the same weights; greedy tokens must match exactly.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from engine_helpers import HFReference, free_port, make_hf_dir, perturbed_state

from atlas_jax.engines import weight_sync
from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.server_client import ServerEngine, ServerError
from converters import mapping

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "s3cret-token"
PROMPTS = [[5, 17, 42, 100, 7], [250, 3, 3, 9], [11, 12]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


class ThreadServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from atlas_jax.engines.server_app import create_app
    from atlas_jax.engines.vllm_engine import VLLMEngine

    d = make_hf_dir(tmp_path_factory.mktemp("model"), tied=True)
    engine = VLLMEngine(d, max_model_len=256)
    app = create_app(
        engine, role="teacher", token=TOKEN, max_weights_bytes=1 << 20, max_json_bytes=64 << 10,
        weights_root=str(tmp_path_factory.getbasetemp()),  # every test's tmp_path lies inside
    )  # fmt: skip
    server = ThreadServer(app)
    yield engine, server, HFReference(d), d
    server.stop()
    engine.close()


def greedy_ids(client: ServerEngine) -> list[list[int]]:
    return [c.token_ids for [c] in client.generate(PROMPTS, GREEDY)]


def check_matches(client: ServerEngine, ref: HFReference) -> None:
    for prompt, [c] in zip(PROMPTS, client.generate(PROMPTS, GREEDY), strict=True):
        assert c.prompt_ids == prompt
        assert c.token_ids == ref.greedy(prompt, len(c.token_ids))
        np.testing.assert_allclose(c.logprobs, ref.logprobs(prompt, c.token_ids), atol=1e-4, rtol=0)


def test_health(served):
    _, server, _, _ = served
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["role"] == "teacher"


def test_generate_matches_transformers(served):
    _engine, server, ref, _ = served
    with ServerEngine([server.url]) as client:
        check_matches(client, ref)


def test_batch_split_over_servers_equals_one_server(served):
    """Two URLs (the same server twice) split the batch; per-chunk seed offsets keep samples equal."""
    _, server, _, _ = served
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=7)
    with ServerEngine([server.url]) as one, ServerEngine([server.url, server.url]) as two:
        a = one.generate(PROMPTS, params, n=2)
        b = two.generate(PROMPTS, params, n=2)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert [len(g) for g in a] == [2, 2, 2]


def test_update_refused_without_or_with_wrong_token(served):
    engine, server, _ref, d = served
    cfg = engine.model_config
    with ServerEngine([server.url]) as client:
        before = greedy_ids(client)
    payload = weight_sync.serialize(
        weight_sync.hf_tensors(mapping.hf_to_flat(perturbed_state(d, seed=21), cfg), cfg)
    )
    octet = {"Content-Type": "application/octet-stream"}
    r = httpx.post(server.url + "/update_weights", content=payload, headers=octet)
    assert r.status_code == 401
    r = httpx.post(
        server.url + "/update_weights", content=payload, headers={**octet, "Authorization": "Bearer nope"}
    )
    assert r.status_code == 403
    r = httpx.post(server.url + "/reset_prefix_cache", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    with (
        ServerEngine([server.url], token="wrong", model_config=cfg) as bad,
        pytest.raises(ServerError, match="403"),
    ):
        bad.update_weights(mapping.hf_to_flat(perturbed_state(d, seed=21), cfg))
    with ServerEngine([server.url]) as client:
        assert greedy_ids(client) == before  # Weights unchanged.


def test_update_with_token_applies(served):
    engine, server, ref, d = served
    cfg = engine.model_config
    state = perturbed_state(d, seed=22)
    with ServerEngine([server.url], token=TOKEN, model_config=cfg) as client:
        before = greedy_ids(client)
        v0 = httpx.get(server.url + "/health").json()["weight_version"]
        assert client.update_weights(mapping.hf_to_flat(state, cfg)) == [v0 + 1]
        ref.load(state)
        check_matches(client, ref)
        assert greedy_ids(client) != before


def test_update_from_path(served, tmp_path):
    _engine, server, ref, d = served
    state = perturbed_state(d, seed=23)
    ref.load(state)
    ref.model.save_pretrained(tmp_path / "new")
    with ServerEngine([server.url], token=TOKEN) as client:
        client.update_weights_from_path(tmp_path / "new")
        check_matches(client, ref)
        with pytest.raises(ServerError, match=r"422.*no \*\.safetensors"):
            client.update_weights_from_path(tmp_path / "missing")


def test_bad_payloads_are_rejected_and_weights_unchanged(served):
    engine, server, _, d = served
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
    with ServerEngine([server.url]) as client:
        before = greedy_ids(client)
        r = httpx.post(server.url + "/update_weights", content=b"x" * (2 << 20), headers=auth)
        assert r.status_code == 413
        tensors = weight_sync.deserialize(
            weight_sync.serialize(
                weight_sync.hf_tensors(
                    mapping.hf_to_flat(perturbed_state(d, seed=24), engine.model_config), engine.model_config
                )
            )
        )
        tensors.pop("model.norm.weight")
        r = httpx.post(
            server.url + "/update_weights", content=weight_sync.serialize(tensors.items()), headers=auth
        )
        assert r.status_code == 422 and "model.norm.weight" in r.text
        r = httpx.post(server.url + "/update_weights", content=b"not safetensors", headers=auth)
        assert r.status_code == 422
        assert greedy_ids(client) == before
        with pytest.raises(ServerError, match=r"422.*outside the vocabulary"):
            client.generate([[1, 10**6]], GREEDY)
        big = {"prompts": ["x" * (100 << 10)]}
        assert httpx.post(server.url + "/generate", json=big).status_code == 413


def test_server_without_token_refuses_updates(served):
    from atlas_jax.engines.server_app import create_app

    engine, _, _, _ = served
    open_server = ThreadServer(create_app(engine, role="student", token=None))
    try:
        r = httpx.post(open_server.url + "/reset_prefix_cache", headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "without a token" in r.text
    finally:
        open_server.stop()


def test_stopped_server_fails_fast_with_url():
    url = f"http://127.0.0.1:{free_port()}"  # Nothing listens there.
    client = ServerEngine([url], retries=2, backoff=0.05, connect_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(ServerError, match=f"server {url} unreachable.*3 attempts"):
        client.generate([[1, 2]], GREEDY)
    assert time.monotonic() - start < 10.0  # Bounded by retries x (connect timeout + backoff).
