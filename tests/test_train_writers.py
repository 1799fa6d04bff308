"""Metric writers: JSONL records, resume truncation, samples files, phase split of a rollout."""

import json

import pytest

from atlas_jax.training.grpo_loop import phase_times
from atlas_jax.training.writers import MetricsWriter, PhaseTimer, read_metrics


def test_jsonl_records_and_resume_truncation(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.write(s, {"loss": 1.0 / s, "vector": [1, 2], "nan": float("nan")})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 0.')  # a line cut by a kill
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)  # resumed from checkpoint 3
    w.write(4, {"loss": 0.5})
    w.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["loss"] == 1.0 and "vector" not in recs[0] and recs[0]["nan"] == "nan"
    assert recs[-1]["loss"] == 0.5


def test_samples_file(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    path = w.write_samples(7, [{"problem": "1+1", "reward": 0.5}])
    w.close()
    assert path.name == "step_7.jsonl" and json.loads(path.read_text()) == {"problem": "1+1", "reward": 0.5}
    assert list((tmp_path / "tensorboard").iterdir())


def test_phase_split():
    t = phase_times([1.0, 2.0, 3.0], [4.0], 11.5)
    assert t == pytest.approx(
        {"time/gen_teacher": 4.0, "time/gen_baseline": 1.0, "time/gen_probe": 2.0, "time/gen_taught": 3.0,
         "time/scoring": 1.5}
    )  # fmt: skip
    t = phase_times([2.0, 3.0], [4.0], 9.0)  # baselines cached: no baseline call
    assert t["time/gen_baseline"] == 0.0 and t["time/gen_probe"] == 2.0 and t["time/scoring"] == 0.0


def test_phase_timer():
    timer = PhaseTimer()
    with timer("a"):
        pass
    with timer("a"):
        pass
    out = timer.pop()
    assert set(out) == {"time/a"} and out["time/a"] >= 0 and timer.pop() == {}
