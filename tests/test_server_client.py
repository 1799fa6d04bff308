"""ServerEngine routing, seeds, retries and errors against real HTTP servers on 127.0.0.1 (no vLLM).

The servers run ``server_app.create_app`` around ``TagEngine``, a deterministic engine whose
completions record which prompt and which per-completion seed produced them, so splitting a batch
over several servers can be checked against one in-process call.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from engine_helpers import free_port
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from atlas_jax.engines.base import Completion, Engine, SamplingParams
from atlas_jax.engines.factory import engine_class, make_engine
from atlas_jax.engines.server_client import ServerEngine, ServerError

pytestmark = pytest.mark.multiprocess


class TagEngine(Engine):
    """Completion j of prompt i = [first prompt token, seed + i*n + j] (VLLMEngine's seed rule)."""

    def generate(self, prompts, params, n=1):
        out = []
        for i, p in enumerate(prompts):
            ids = [ord(ch) for ch in p] if isinstance(p, str) else list(p)
            group = []
            for j in range(n):
                seed = -1 if params.seed is None else params.seed + i * n + j
                group.append(Completion(ids, [ids[0], seed], f"{ids[0]}:{seed}", [-0.5, -0.25], "length"))
            out.append(group)
        return out

    @property
    def tokenizer(self):
        return None


class ThreadServer:
    def __init__(self, app):
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def servers():
    from atlas_jax.engines.server_app import create_app

    started = [ThreadServer(create_app(TagEngine(), token="t")) for _ in range(3)]
    yield started
    for s in started:
        s.stop()


def test_batch_split_over_three_servers_equals_one_engine(servers):
    prompts = [[i + 1, 2, 3] for i in range(7)]
    params = SamplingParams(seed=100, max_tokens=2)
    want = TagEngine().generate(prompts, params, n=3)
    with ServerEngine([s.url for s in servers]) as client:
        for _ in range(3):  # Different round-robin starting servers, same answer.
            got = client.generate(prompts, params, n=3)
            assert [[(c.prompt_ids, c.token_ids, c.text) for c in g] for g in got] == [
                [(c.prompt_ids, c.token_ids, c.text) for c in g] for g in want
            ]
        health = client.health()
    assert list(health) == [s.url for s in servers]
    assert all(h["status"] == "ok" for h in health.values())


def test_single_prompt_calls_rotate_over_servers(servers):
    hits = []
    with ServerEngine([s.url for s in servers]) as client:
        original = client._request

        def spy(url, method, path, **kw):
            hits.append(url)
            return original(url, method, path, **kw)

        client._request = spy
        for _ in range(3):
            client.generate([[5]], SamplingParams(max_tokens=1))
    assert sorted(hits) == sorted(s.url for s in servers)


def test_retries_on_503_then_succeeds_or_names_url():
    calls = {"n": 0}
    app = FastAPI()

    @app.post("/generate")
    def flaky() -> JSONResponse:
        calls["n"] += 1
        if calls["n"] <= 2:
            return JSONResponse({"detail": "warming up"}, status_code=503)
        c = {"prompt_ids": [1], "token_ids": [2], "text": "x", "logprobs": [-1.0], "finish_reason": "length"}
        return JSONResponse({"completions": [[c]]})

    server = ThreadServer(app)
    try:
        with (
            ServerEngine([server.url], retries=1, backoff=0.01) as client,
            pytest.raises(ServerError, match=rf"server {server.url} unreachable.*HTTP 503"),
        ):
            client.generate([[1]], SamplingParams(max_tokens=1))
        with ServerEngine([server.url], retries=2, backoff=0.01) as client:
            [[c]] = client.generate([[1]], SamplingParams(max_tokens=1))
        assert c.token_ids == [2] and calls["n"] == 3
    finally:
        server.stop()


def test_client_side_errors(servers):
    with ServerEngine([servers[0].url]) as client, pytest.raises(ValueError, match="model_config"):
        client.update_weights({})
    r = httpx.post(servers[0].url + "/generate", json={"prompts": [[1]], "temperature": -1})
    assert r.status_code == 422 and "temperature" in r.text
    with (
        ServerEngine([servers[0].url], token="") as client,
        pytest.raises(ServerError, match="need a token"),
    ):
        client.reset_prefix_cache()
    with pytest.raises(ValueError, match="http"):
        ServerEngine(["127.0.0.1:8000"])
    with pytest.raises(ValueError, match="empty"):
        ServerEngine([])


def test_factory():
    assert engine_class("vllm_server") is ServerEngine
    assert isinstance(make_engine("vllm_server", ["http://127.0.0.1:1"]), ServerEngine)
    with pytest.raises(ValueError, match=r"unknown engine kind 'foo'.*openai"):
        engine_class("foo")
