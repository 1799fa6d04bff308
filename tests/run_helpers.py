"""Real training jobs in child processes, for the crash / signal tests (tests/test_crash_resume.py, test_preemption.py).

The child is ``tests/multihost_worker.py SPEC.json --train`` (one process, no ``ATLAS_*`` variables): it runs
``launch.train.train`` on ``configs.base`` with the spec's dotted overrides, exactly as ``atlas-train`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from protocol_helpers import SAMPLES, make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
# Wall-clock keys differ run to run; everything else in metrics.jsonl must be bit-equal after a resume.
TIMING_PREFIXES = ("time/",)
TIMING_SUFFIXES = ("_per_s",)


def model_folders(root: Path) -> dict[str, str]:
    """Tiny teacher/student HF folders with a locally trained tokenizer."""
    tok = make_tokenizer()
    out = {}
    for name, seed in (("teacher", 0), ("student", 1)):
        make_model(tok, seed).save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def common(out: Path, folders: dict[str, str]) -> dict:
    return {
        "output_dir": str(out),
        "model.teacher": folders["teacher"],
        "model.student": folders["student"],
        "model.tokenizer": folders["teacher"],
        "model.compute_dtype": "float32",
        "model.remat": False,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "mesh.shape": [1, -1, 1],
    }


def sft_overrides(out: Path, folders: dict[str, str], steps: int = 12) -> dict:
    return {
        **common(out, folders),
        "job": "sft",
        "data.sft_path": str(SAMPLES / "sft_sample.jsonl"),
        "data.eval_fraction": 0.0,
        "sft.num_steps": steps,
        "sft.batch_size": 8,
        "sft.micro_batch_size": 8,
        "sft.max_length": 256,
        "sft.learning_rate": 1e-3,
        "optim.schedule": "cosine",
        "optim.warmup_steps": 2,
        "checkpoint.every_steps": 2,
        "checkpoint.async_save": True,
    }


def grpo_overrides(out: Path, folders: dict[str, str], steps: int = 4) -> dict:
    """12 training problems, 4 per step: the third step ends an epoch, so later steps hit the baseline cache."""
    return {
        **common(out, folders),
        "job": "grpo",
        "data.rl_path": str(SAMPLES / "rl_sample.jsonl"),
        "data.eval_fraction": 0.25,
        "grpo.num_steps": steps,
        "grpo.problems_per_step": 4,
        "grpo.num_generations": 2,
        "grpo.micro_batch_size": 8,
        "grpo.learning_rate": 1e-3,
        "grpo.beta": 0.04,
        "grpo.ref_update": "ema",
        "grpo.ref_sync_steps": 1,
        "protocol.max_probe_tokens": 8,
        "protocol.max_teaching_tokens": 16,
        "protocol.max_student_tokens": 8,
        "protocol.num_baseline_samples": 1,
        "protocol.num_student_samples": 1,
        "eval.every_steps": 0,
        "eval.num_problems": 2,
        "checkpoint.every_steps": 1,
        "checkpoint.async_save": True,
    }


def spawn(spec_dir: Path, *runs: dict, log_name: str = "child", cache_dir: str = "") -> subprocess.Popen:
    """Starts the worker on ``runs`` (one spec file); stdout+stderr go to ``spec_dir/<log_name>.log``.

    The child sees one CPU device (small, fast programs) and, with ``cache_dir``, shares a persistent
    compilation cache with its siblings: a restarted job loads its programs instead of compiling them.
    """
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = spec_dir / f"{log_name}.json"
    spec.write_text(json.dumps({"runs": list(runs)}))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    for k in [k for k in env if k.startswith("ATLAS_")]:
        env.pop(k)
    log = (spec_dir / f"{log_name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(spec), "--train"], stdout=log, stderr=subprocess.STDOUT, env=env
    )


def log_text(spec_dir: Path, log_name: str = "child") -> str:
    return (spec_dir / f"{log_name}.log").read_text()


def steps_written(out: Path) -> list[int]:
    """Steps in ``out/metrics.jsonl`` so far (a line cut by a kill is ignored)."""
    path = out / "metrics.jsonl"
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):  # a line cut by the kill
                steps.append(int(json.loads(line)["step"]))
    return steps


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600.0) -> None:
    """Blocks until ``metrics.jsonl`` has a record of ``step`` (fails if the child exits first)."""
    deadline = time.monotonic() + timeout
    while step not in steps_written(out):
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} not reached in {timeout} s")
        time.sleep(0.02)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 300.0) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def deterministic(records: list[dict]) -> list[dict]:
    """``metrics.jsonl`` records without their wall-clock keys."""
    return [
        {k: v for k, v in r.items() if not (k.startswith(TIMING_PREFIXES) or k.endswith(TIMING_SUFFIXES))}
        for r in records
    ]
