"""OpenAIEngine against a real OpenAI-compatible server: ``python -m launch.serve`` in a subprocess.

This also exercises the server CLI (absl flags, token from the environment, loopback bind).
References come from transformers with the same weights (greedy tokens exact, logprobs <= 1e-4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from engine_helpers import HFReference, free_port, make_hf_dir, wait_healthy

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.openai_client import APIError, OpenAIEngine

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = make_hf_dir(tmp_path_factory.mktemp("model"), tied=False)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "ATLAS_SERVER_TOKEN": "tok", "PYTHONPATH": str(REPO)}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.serve",
                f"--model={d}",
                "--role=student",
                f"--port={port}",
                "--max_model_len=256",
            ],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log, "launch.serve", timeout=300, poll_s=0.5)
    yield url, HFReference(d), d
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_cli_server_health_and_token(server):
    url, _, _ = server
    assert httpx.get(url + "/health").json()["role"] == "student"
    assert httpx.post(url + "/reset_prefix_cache").status_code == 401
    assert httpx.post(url + "/reset_prefix_cache", headers={"Authorization": "Bearer no"}).status_code == 403
    assert httpx.post(url + "/reset_prefix_cache", headers={"Authorization": "Bearer tok"}).status_code == 200


def test_completions_token_prompts(server):
    url, ref, _ = server
    prompts = [[5, 17, 42, 100, 7], [250, 3, 3, 9], [11, 12], [40, 41, 42], [7], [99, 98, 97, 96]]
    with OpenAIEngine(url + "/v1", "atlas", concurrency=3) as engine:
        outs = engine.generate(prompts, GREEDY)
    for prompt, [c] in zip(prompts, outs, strict=True):
        assert c.prompt_ids == prompt
        assert c.token_ids == ref.greedy(prompt, len(c.token_ids))
        np.testing.assert_allclose(c.logprobs, ref.logprobs(prompt, c.token_ids), atol=1e-4, rtol=0)
        assert c.finish_reason in ("stop", "length")


def test_completions_text_prompt_with_tokenizer(server):
    url, ref, d = server
    with OpenAIEngine(url + "/v1", "atlas", tokenizer=str(d), return_token_ids=False) as engine:
        [[c]] = engine.generate(["the quick brown fox"], GREEDY)
        ids = engine.tokenizer.encode("the quick brown fox", add_special_tokens=False)
    assert c.prompt_ids == ids
    want = ref.greedy(ids, GREEDY.max_tokens)
    assert c.text == engine.tokenizer.decode(want[: len(c.logprobs)], skip_special_tokens=True)


def test_chat_mode(server):
    url, ref, d = server
    with OpenAIEngine(url + "/v1", "atlas", mode="chat", tokenizer=str(d)) as engine:
        [[c, c2]] = engine.generate(["what is 2+2?"], SamplingParams(temperature=0.0, max_tokens=6), n=2)
        tok = engine.tokenizer
        with pytest.raises(ValueError, match="chat mode needs text"):
            engine.generate([[1, 2]], GREEDY)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "what is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(chat, add_special_tokens=False)
    assert c.token_ids == ref.greedy(ids, len(c.token_ids)) == c2.token_ids
    np.testing.assert_allclose(c.logprobs, ref.logprobs(ids, c.token_ids), atol=1e-4, rtol=0)


def test_unreachable_api_names_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with OpenAIEngine(url, "atlas", retries=1, backoff=0.05) as engine, pytest.raises(APIError, match=url):
        engine.generate(["hi"], GREEDY)
