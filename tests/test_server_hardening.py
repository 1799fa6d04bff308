"""Server hardening on a real uvicorn server on 127.0.0.1 (tiny JAX engine behind ``server_app``), and the
client's behaviour against servers that are down, slow, or answer garbage (real misbehaving HTTP servers).
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import numpy as np
import pytest
from engine_helpers import ThreadServer, free_port
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from protocol_helpers import make_tokenizer
from server_fixtures import TOKEN, JaxServed

from atlas_jax.engines import weight_sync
from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.server_app import create_app
from atlas_jax.engines.server_client import ServerEngine, ServerError
from atlas_jax.models.params import flatten

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights_root")
    engine = JaxServed(make_tokenizer())
    app = create_app(
        engine, role="teacher", token=TOKEN, max_weights_bytes=1 << 20, max_json_bytes=8 << 10,
        weights_root=str(root), max_inflight=2, max_sequences=8, max_new_tokens=16,
    )  # fmt: skip
    server = ThreadServer(app)
    yield engine, server, root, app
    server.stop()


def _greedy(server) -> list[list[int]]:
    with ServerEngine([server.url]) as client:
        return [c.token_ids for [c] in client.generate([[5, 17, 42], [9, 9]], GREEDY)]


def _mutating_posts(app) -> list[str]:
    """Every POST route that changes server state (weights, caches, transfers) - by its name."""
    return sorted(
        r.path for r in app.routes
        if "POST" in getattr(r, "methods", ()) and any(w in r.path for w in ("weight", "reset", "load", "update"))
    )  # fmt: skip


def test_serve_binds_loopback_by_default():
    from launch import serve

    assert serve._HOST.default == "127.0.0.1"


def test_every_mutating_endpoint_needs_the_token(served):
    engine, server, _, app = served
    paths = _mutating_posts(app)
    assert {"/update_weights", "/reset_prefix_cache"} <= set(paths)
    before = _greedy(server)
    for path in paths:
        assert httpx.post(server.url + path, content=b"{}").status_code == 401, path  # no header
        for bad in ("Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x", ""):
            r = httpx.post(server.url + path, content=b"{}", headers={"Authorization": bad})
            assert r.status_code in (401, 403), (path, bad, r.status_code)
    assert engine.loads == 0 and _greedy(server) == before  # nothing was applied


def test_client_without_or_with_wrong_token(served, monkeypatch):
    engine, server, _, _ = served
    monkeypatch.delenv("ATLAS_SERVER_TOKEN", raising=False)
    flat = flatten(engine.inner.params)
    no_token = ServerEngine([server.url], model_config=engine.model_config)
    with pytest.raises(
        ServerError, match="weight updates need a token: pass token= or set ATLAS_SERVER_TOKEN"
    ):
        no_token.update_weights(flat)
    wrong = ServerEngine([server.url], token="wrong", model_config=engine.model_config)
    with pytest.raises(ServerError, match=r"/update_weights failed: HTTP 403: invalid token"):
        wrong.update_weights(flat)
    assert engine.loads == 0


def test_path_updates_stay_inside_the_weights_root(served, tmp_path):
    engine, server, root, _ = served
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    json_auth = {**AUTH, "Content-Type": "application/json"}
    for path in ("../outside", str(outside), "link", "sub/../../outside", "/etc"):
        r = httpx.post(server.url + "/update_weights", json={"path": path}, headers=json_auth)
        assert r.status_code == 403 and "outside the allowed weights root" in r.text, (path, r.text)
    r = httpx.post(server.url + "/update_weights", content=b"{not json", headers=json_auth)
    assert r.status_code == 422 and "not valid JSON" in r.text
    r = httpx.post(server.url + "/update_weights", json={"path": 3}, headers=json_auth)
    assert r.status_code == 422
    r = httpx.post(server.url + "/update_weights", json={"path": "missing"}, headers=json_auth)
    assert r.status_code == 422 and "no *.safetensors" in r.text  # inside the root, but empty
    assert engine.loads == 0


def test_path_update_inside_the_root_applies(served):
    from converters.safetensors_io import write_safetensors

    engine, server, root, _ = served
    flat = {k: np.asarray(v) * 0.5 for k, v in flatten(engine.inner.params).items()}
    tensors = [(k, t.numpy()) for k, t in weight_sync.hf_tensors(flat, engine.model_config)]
    (root / "new").mkdir()
    write_safetensors(tensors, root / "new")
    with ServerEngine([server.url], token=TOKEN) as client:
        client.update_weights_from_path(root / "new")
    # The served weights are the halved ones (a tiny random model's greedy output may not change with them).
    after = {k: np.asarray(v, np.float32) for k, v in flatten(engine.inner.params).items()}
    assert engine.loads == 1 and after.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_allclose(after[k], np.asarray(v, np.float32), rtol=0, atol=1e-6, err_msg=k)
    assert _greedy(server)  # and the server still generates


def test_server_without_a_root_refuses_path_updates():
    engine = JaxServed(make_tokenizer())
    server = ThreadServer(create_app(engine, token=TOKEN))
    try:
        r = httpx.post(server.url + "/update_weights", json={"path": "x"}, headers=AUTH)
        assert r.status_code == 403 and "--weights_root" in r.text
    finally:
        server.stop()


def test_size_and_count_limits(served):
    _, server, _, _ = served
    r = httpx.post(server.url + "/generate", json={"prompts": ["x" * (16 << 10)]})
    assert r.status_code == 413
    r = httpx.post(server.url + "/update_weights", content=b"\0" * (2 << 20), headers=AUTH)
    assert r.status_code == 413
    r = httpx.post(server.url + "/generate", json={"prompts": [[1, 2]] * 5, "n": 2, "max_tokens": 2})
    assert r.status_code == 422 and "at most 8 completions" in r.text
    r = httpx.post(server.url + "/generate", json={"prompts": [[1, 2]], "max_tokens": 17})
    assert r.status_code == 422 and "max_tokens <= 16" in r.text


def test_concurrency_limit_answers_503_and_health_stays_up(served):
    engine, server, _, _ = served
    engine.gate, engine.entered = threading.Event(), threading.Event()
    results = []

    def call():
        results.append(
            httpx.post(server.url + "/generate", json={"prompts": [[1, 2]], "max_tokens": 2}, timeout=60)
        )

    threads = [threading.Thread(target=call) for _ in range(2)]  # max_inflight = 2
    try:
        for t in threads:
            t.start()
        assert engine.entered.wait(30)
        deadline = time.monotonic() + 30
        while True:  # both held requests are in flight once a third one is refused
            r = httpx.post(server.url + "/generate", json={"prompts": [[1, 2]], "max_tokens": 2}, timeout=60)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "server busy" in r.text
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        engine.gate.set()
        for t in threads:
            t.join(60)
        engine.gate = None
    assert [x.status_code for x in results] == [200, 200]


# ---- misbehaving servers, seen from the client ----


def _misbehaving_app(delay: float = 0.0) -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    def generate(kind: str = "html"):
        time.sleep(delay)
        return PlainTextResponse("<html>502 from a proxy</html>", status_code=200)

    return app


def test_client_names_a_server_that_is_down():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = ServerEngine([url], retries=1, backoff=0.01, connect_timeout=1.0)
    with pytest.raises(ServerError, match=rf"server {url} unreachable \(POST /generate\): 2 attempts"):
        client.generate([[1, 2]], GREEDY)


def test_client_times_out_on_a_slow_server():
    server = ThreadServer(_misbehaving_app(delay=3.0))
    try:
        client = ServerEngine([server.url], timeout=0.5, retries=0)
        with pytest.raises(ServerError, match=rf"POST {server.url}/generate failed: ReadTimeout"):
            client.generate([[1, 2]], GREEDY)
    finally:
        server.stop()


def test_client_rejects_garbage_answers():
    app = _misbehaving_app()

    @app.post("/v2/generate")
    def wrong_shape():
        return {"completions": [[{"prompt_ids": [1], "token_ids": [1, 2], "text": "", "logprobs": [0.0],
                                  "finish_reason": "stop"}]]}  # fmt: skip

    server = ThreadServer(app)
    try:
        client = ServerEngine([server.url], retries=0)
        with pytest.raises(ServerError, match=r"/generate: the answer is not JSON .*502 from a proxy"):
            client.generate([[1, 2]], GREEDY)
        bad = ServerEngine([server.url + "/v2"], retries=0)
        with pytest.raises(
            ServerError, match=r"malformed /generate answer: expected 1 groups of 1 completions"
        ):
            bad.generate([[1, 2]], GREEDY)
    finally:
        server.stop()


def test_env_token_is_used_when_none_given(served, monkeypatch):
    _, server, _, _ = served
    monkeypatch.setenv("ATLAS_SERVER_TOKEN", TOKEN)
    with ServerEngine([server.url]) as client:
        client.reset_prefix_cache()  # 200 with the env token
    assert os.environ["ATLAS_SERVER_TOKEN"] == TOKEN
