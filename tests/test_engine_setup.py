"""Engines from the config (issue 10 items 1, 3, 4): budgets -> context lengths, vLLM options, JAX's memory share,
the JAX student on the mesh in the compute dtype with row-chunked calls, and the HTTP student kinds.

Expected context lengths are derived by hand from the budgets and the templates tokenised directly here.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest
from engine_helpers import make_hf_dir

from atlas_jax.engines import memory
from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.chunked import RowChunked, prompts_per_chunk
from atlas_jax.protocol.budgets import Budgets, student_context, teacher_context
from atlas_jax.protocol.templates import Templates, fill
from atlas_jax.training import engine_setup, rl_setup
from atlas_jax.training.validate import ConfigError, validate_config
from configs.run import teacher_rcl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """Tiny Qwen3 (512 positions, head_dim 32) with a ChatML tokenizer."""
    return make_hf_dir(tmp_path_factory.mktemp("student"), tied=True)


def _rcl(model: Path, **protocol: int):
    """teacher_rcl with a local teacher/student and small budgets (the shape the rehearsal uses)."""
    c = teacher_rcl.get_config()
    c.model.teacher = c.model.student = str(model)
    c.data.rl_path = "/data/rl.jsonl"
    for k, v in {"max_prompt_tokens": 64, "max_probe_tokens": 16, "max_teaching_tokens": 96,
                 "max_student_tokens": 48, **protocol}.items():  # fmt: skip
        c.protocol[k] = v
    return c


def test_student_context_by_hand_without_tokenizer():
    # Without a tokenizer, template sizes are their UTF-8 bytes: "B" 1, "PP" 2, "TTT" 3.
    t = Templates(student_baseline="B{question}", student_probe="PP{question}", teacher="{question}{approach}",
                  student_taught="TTT{question}{teaching}")  # fmt: skip
    b = Budgets(max_prompt_tokens=10, max_probe_tokens=5, max_teaching_tokens=20, max_student_tokens=7)
    # baseline 1+10+7+2, probe 2+10+5+2, taught 3+10+20+7+2*2 = 44 (the largest).
    assert student_context(b, t, None) == 44
    with_approach = Templates(**{**t.__dict__, "student_taught": "TTT{question}{approach}{teaching}"})
    assert student_context(b, with_approach, None) == 44 + 5 + 2
    assert teacher_context(b) == 30


def test_student_context_counts_chat_markup(hf_dir):
    tok = engine_setup.load_tokenizer(str(hf_dir))
    t = Templates(student_chat=True, student_system="be brief")
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": fill(t.student_taught, question="", teaching="")}]  # fmt: skip
    taught = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    b = Budgets(max_prompt_tokens=64, max_probe_tokens=16, max_teaching_tokens=96, max_student_tokens=48)
    assert taught > 20  # the template, ChatML markup and system message are all counted
    assert student_context(b, t, tok) == taught + 64 + 96 + 48 + 4


def test_vllm_options_from_the_config(hf_dir):
    c = _rcl(hf_dir)
    tok = engine_setup.load_tokenizer(str(hf_dir))
    taught = len(
        tok.encode(fill(Templates().student_taught, question="", teaching=""), add_special_tokens=False)
    )
    opts = engine_setup.vllm_options(c, "student", tok, 512)
    assert opts == {"dtype": "float32", "max_model_len": taught + 64 + 96 + 48 + 4, "seed": 0,
                    "gpu_memory_utilization": 0.3, "enforce_eager": True, "tensor_parallel_size": 1}  # fmt: skip
    c.engine.dtype, c.engine.gpu_memory_utilization, c.engine.tensor_parallel_size = "bfloat16", 0.2, 2
    c.engine.enforce_eager, c.seed = False, 7
    opts = engine_setup.vllm_options(c, "teacher", tok, 512)
    assert opts == {"dtype": "bfloat16", "max_model_len": 64 + 96, "seed": 7, "gpu_memory_utilization": 0.2,
                    "enforce_eager": False, "tensor_parallel_size": 1}  # fmt: skip
    assert engine_setup.vllm_options(c, "student", tok, 512)["tensor_parallel_size"] == 2
    c.engine.max_model_len = 400
    assert engine_setup.vllm_options(c, "student", tok, 512)["max_model_len"] == 400
    c.engine.max_model_len = 100
    with pytest.raises(
        ValueError, match=r"student needs \d+ positions > --config\.engine\.max_model_len=100"
    ):
        engine_setup.vllm_options(c, "student", tok, 512)
    c = _rcl(hf_dir, max_teaching_tokens=400)
    with pytest.raises(
        ValueError, match=r"max_position_embeddings=512: lower --config\.protocol\.max_\*_tokens"
    ):
        engine_setup.vllm_options(c, "student", tok, 512)


def test_validate_checks_student_budgets_and_engine_values(hf_dir):
    c = _rcl(hf_dir)
    validate_config(c, num_devices=8)
    c = teacher_rcl.get_config()  # the shipped budgets (1024 / 2048 / 2048) on a 512-position student
    c.model.teacher = c.model.student = str(hf_dir)
    c.data.rl_path = "/data/rl.jsonl"
    c.protocol.max_prompt_tokens, c.protocol.max_teaching_tokens = 100, 100  # the teacher fits
    with pytest.raises(ConfigError) as e:
        validate_config(c, num_devices=8)
    msg = str(e.value)
    assert "exceeds the student's context (512 positions)" in msg
    assert "--config.protocol.max_prompt_tokens / max_teaching_tokens / max_student_tokens" in msg
    c = _rcl(hf_dir)
    c.engine.max_model_len, c.engine.dtype, c.engine.gpu_memory_utilization = 64, "fp8", 0.7
    c.engine.teacher, c.engine.student_api = "vllm", "responses"
    with pytest.raises(ConfigError) as e:
        validate_config(c, num_devices=8)
    msg = str(e.value)
    for needle in ("exceeds --config.engine.max_model_len=64", "--config.engine.dtype='fp8'",
                   "--config.engine.student_api='responses'", "--config.engine.gpu_memory_utilization=[0.7, 0.7]",
                   "exceeds --config.engine.max_model_len=64 (the vLLM teacher's context)"):  # fmt: skip
        assert needle in msg, msg
    c = _rcl(hf_dir)
    c.model.student = "/no/student"
    with pytest.raises(ConfigError, match=r"--config\.model\.student=/no/student: no such folder"):
        validate_config(c, num_devices=8)
    c.engine.student, c.engine.student_url = "openai", "http://127.0.0.1:1"  # a served name is not a folder
    validate_config(c, num_devices=8)


def test_jax_memory_share():
    assert memory.jax_memory_env(0.0, True, [0.3]) == {memory.FRACTION_ENV: "0.650"}
    assert memory.jax_memory_env(0.0, True, [0.3, 0.3]) == {memory.FRACTION_ENV: "0.350"}
    assert memory.jax_memory_env(0.5, True, [0.3]) == {memory.FRACTION_ENV: "0.500"}
    assert memory.jax_memory_env(0.0, True, []) == {}  # no vLLM in this process: JAX's own default
    assert memory.jax_memory_env(0.0, False, []) == {memory.PREALLOCATE_ENV: "false"}
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=\[0.6, 0.35\] leaves"):
        memory.jax_memory_env(0.0, True, [0.6, 0.35])
    with pytest.raises(ValueError, match=r"jax_memory_fraction=1.2"):
        memory.jax_memory_env(1.2, True, [])


def test_launcher_sets_the_memory_share_before_jax_starts():
    # launch.train's main with its first JAX call (distributed.initialize) replaced by a probe.
    probe = (
        "import json, os, sys\n"
        "sys.argv = ['train', '--config=configs/run/teacher_rcl.py', '--config.engine.gpu_memory_utilization=0.25']\n"
        "import launch.train as t\n"
        "from atlas_jax import distributed\n"
        "from jax._src import xla_bridge\n"
        "def first_jax_use():\n"
        "    print(json.dumps([os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),\n"
        "                      xla_bridge.backends_are_initialized()]))\n"
        "distributed.initialize = first_jax_use\n"
        "t.train = lambda config: None\n"
        "t.run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(memory.FRACTION_ENV, None)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    fraction, started = json.loads(out.stdout.strip().splitlines()[-1])
    assert fraction == "0.700"  # 1 - 0.05 headroom - 0.25 for the in-process vLLM student of teacher_rcl
    assert started is False  # set before the launcher's first JAX call started a backend


@pytest.mark.slow
def test_jax_student_on_the_mesh_in_the_compute_dtype(hf_dir):
    c = _rcl(hf_dir)
    c.engine.student, c.mesh.shape, c.engine.jax_max_rows = "jax", (2, 2, 2), 8
    assert (c.model.compute_dtype, c.model.param_dtype, c.model.remat) == ("bfloat16", "float32", True)
    engine = rl_setup.student_engine(c)
    assert isinstance(engine, RowChunked) and engine.max_rows == 8
    sampler = engine.inner
    assert sampler.mesh.devices.shape == (2, 2, 2) and not sampler.cfg.remat
    leaves = jax.tree.leaves(sampler.params)
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    assert all(len(x.sharding.device_set) == 8 for x in leaves)  # on the mesh, not on device 0
    out = engine.generate(["the quick brown fox"] * 5, SamplingParams(temperature=0.0, max_tokens=4), n=2)
    assert [len(g) for g in out] == [2] * 5 and all(len(x.token_ids) == 4 for g in out for x in g)


class _Recorder:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, params, n=1):
        self.calls.append((len(prompts), n, params.seed))
        return self.inner.generate(prompts, params, n)


@pytest.mark.slow
def test_row_chunked_bounds_rows_per_call(hf_dir):
    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model

    assert [prompts_per_chunk(8, n) for n in (1, 2, 3, 4, 9)] == [8, 4, 2, 2, 1]
    tok = engine_setup.load_tokenizer(str(hf_dir))
    sampler = JaxSampler(build_model(ModelConfig.from_hf(hf_dir), seed=3), tok)
    rec = _Recorder(sampler)
    chunked = RowChunked(rec, max_rows=4)
    prompts = [f"the quick brown fox {i}" for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=6, seed=11)
    got = chunked.generate(prompts, params, n=2)
    assert [(k, n) for k, n, _ in rec.calls] == [(2, 2), (2, 2)]  # <= 4 rows per call
    assert len({seed for _, _, seed in rec.calls}) == 2  # each chunk draws its own stream
    want = sampler.generate(prompts, params, n=2)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    """/health of a student server, and an OpenAI-style /v1/completions that records what it was sent and
    the peak of requests in flight."""

    lock, in_flight, peak, paths = threading.Lock(), 0, 0, []

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with cls.lock:
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
            cls.paths.append((self.path, body["model"], body["max_tokens"]))
        deadline = time.monotonic() + 1.0  # hold until 3 are in flight (or 1 s), so the peak is reached
        while time.monotonic() < deadline:
            with cls.lock:
                if cls.in_flight >= 3:
                    break
            time.sleep(0.01)
        with cls.lock:
            cls.in_flight -= 1
        data = json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        data = json.dumps({"role": "student"}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_students_from_the_config(hf_dir):
    from atlas_jax.engines.openai_client import OpenAIEngine
    from atlas_jax.engines.server_client import ServerEngine

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        c = _rcl(hf_dir)
        c.engine.student, c.engine.student_url = "vllm_server", f"{url},{url}/"
        c.engine.retries, c.engine.timeout_s = 1, 9.0
        engine = rl_setup.student_engine(c)  # waits for both servers' /health (role student)
        assert type(engine) is ServerEngine and engine.urls == [url, url]
        assert engine.retries == 1 and engine._client.timeout.read == 9.0
        c.engine.student = "openai"
        with pytest.raises(ValueError, match=r"engine\.student=openai takes one URL per host, got 2"):
            rl_setup.student_engine(c)
        c.engine.student_url = url
        c.engine.concurrency, c.engine.student_model = 3, "served-name"
        engine = rl_setup.student_engine(c)
        assert type(engine) is OpenAIEngine and engine.base_url == url + "/v1"
        assert (engine.model, engine.mode, engine.retries, engine._client.timeout.read) == (
            "served-name", "completions", 1, 9.0)  # fmt: skip
        out = engine.generate([f"q{i}" for i in range(7)], SamplingParams(temperature=0.0, max_tokens=5))
        assert [g[0].text for g in out] == ["ok"] * 7
        assert _CountingHandler.peak == 3  # at most engine.concurrency requests in flight
        assert set(_CountingHandler.paths) == {("/v1/completions", "served-name", 5)}
    finally:
        server.shutdown()
        server.server_close()
