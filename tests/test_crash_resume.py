"""Crash resume: a real training process killed with SIGKILL at a (seeded) random step, then started again,
gives the same metrics.jsonl as an uninterrupted run (bit-equal on CPU, every key but wall-clock times).

Also: a partially written step (no orbax commit marker), a stale orbax tmp folder and a corrupted step are
never restored; they are moved to ``checkpoints/quarantine/`` (kept, not deleted) and the previous complete
step is used.
"""

from __future__ import annotations

import random
import shutil
import signal

import jax
import numpy as np
import pytest
from run_helpers import (
    deterministic,
    grpo_overrides,
    kill,
    log_text,
    model_folders,
    sft_overrides,
    spawn,
    steps_written,
    wait_for_step,
)

from atlas_jax.checkpoint import QUARANTINE, Checkpointer
from atlas_jax.training.checkpointing import TrainCheckpointer
from atlas_jax.training.train_step import TrainState
from atlas_jax.training.writers import read_metrics

KILL_SEED = 16  # the tests' random kill points are drawn from random.Random(KILL_SEED)
SFT_STEPS, GRPO_STEPS = 12, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Model folders, a shared compile cache, and the uninterrupted SFT and GRPO reference runs."""
    root = tmp_path_factory.mktemp("runs")
    folders = model_folders(root)
    cache = str(root / "jax_cache")
    jobs = {
        "sft": lambda out: sft_overrides(out, folders, SFT_STEPS),
        "grpo": lambda out: grpo_overrides(out, folders, GRPO_STEPS),
    }
    refs = {}
    for name, overrides in jobs.items():
        proc = spawn(root / "logs", overrides(root / f"ref_{name}"), log_name=f"ref_{name}", cache_dir=cache)
        assert proc.wait(timeout=900) == 0, log_text(root / "logs", f"ref_{name}")[-3000:]
        refs[name] = read_metrics(root / f"ref_{name}")
    return {"jobs": jobs, "refs": refs, "cache": cache}


def _interrupt_and_resume(tmp_path, runs, job, sig, after_step):
    """A run interrupted by ``sig`` once ``after_step`` is logged, then started again in a new process."""
    overrides, logs, out = runs["jobs"][job], tmp_path / "logs", tmp_path / "run"
    child = spawn(logs, overrides(out), log_name="interrupted", cache_dir=runs["cache"])
    wait_for_step(child, out, after_step)
    rc = kill(child, sig)
    info = {
        "rc": rc,
        "logged": max(steps_written(out)),
        "committed": Checkpointer(out / "checkpoints").latest_step(),
    }
    info["log"] = log_text(logs, "interrupted")
    resumed = spawn(logs, overrides(out), log_name="resumed", cache_dir=runs["cache"])
    assert resumed.wait(timeout=900) == 0, log_text(logs, "resumed")[-3000:]
    return read_metrics(out), info


@pytest.mark.parametrize("job", ["sft", "grpo"])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_at_random_step_resumes_bit_equal(tmp_path, runs, job):
    total = SFT_STEPS if job == "sft" else GRPO_STEPS
    after = (
        random.Random(f"{KILL_SEED}-{job}").randint(3, 8)
        if job == "sft"
        else random.Random(KILL_SEED).randint(1, 2)
    )
    got, info = _interrupt_and_resume(tmp_path, runs, job, signal.SIGKILL, after)
    print(
        f"{job}: SIGKILL after step {after} was logged; logged {info['logged']}, committed {info['committed']}"
    )
    assert info["rc"] == -signal.SIGKILL and info["logged"] < total  # killed mid-run, not finished
    assert [r["step"] for r in got] == list(range(1, total + 1))
    assert deterministic(got) == deterministic(runs["refs"][job])  # exact float equality, every non-time key
    if job == "grpo":  # steps 4+ reuse baseline samples cached before the kill
        assert runs["refs"]["grpo"][3]["time/gen_baseline"] == 0.0  # step 4 made no baseline call: all cached


@pytest.mark.parametrize(
    ("job", "sig"), [("sft", signal.SIGTERM), ("grpo", signal.SIGINT)], ids=["sft-SIGTERM", "grpo-SIGINT"]
)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_preemption_signal_checkpoints_exits_0_and_resumes(tmp_path, runs, job, sig):
    total = SFT_STEPS if job == "sft" else GRPO_STEPS
    got, info = _interrupt_and_resume(tmp_path, runs, job, sig, 3 if job == "sft" else 1)
    print(f"{job}: {sig.name} -> exit {info['rc']}, stopped at step {info['committed']}")
    assert info["rc"] == 0, info["log"][-3000:]  # a clean exit
    assert f"{sig.name} received" in info["log"]
    assert info["committed"] == info["logged"] < total  # the last logged step is checkpointed: nothing redone
    assert [r["step"] for r in got] == list(range(1, total + 1))
    assert deterministic(got) == deterministic(runs["refs"][job])


# ---- partial / corrupted step folders (TrainCheckpointer on a real orbax directory) ----


def _state(value: float) -> TrainState:
    params = {
        "w": jax.numpy.full((4, 3), value, jax.numpy.float32),
        "b": jax.numpy.zeros((3,), jax.numpy.float32),
    }
    opt = (jax.numpy.full((4, 3), value * 2, jax.numpy.float32),)
    return TrainState(step=jax.numpy.asarray(int(value), jax.numpy.int32), params=params, opt_state=opt)


def _save_steps(directory, steps):
    ck = TrainCheckpointer(directory, every_steps=1, keep=10, async_save=False)
    for s in steps:
        ck.save(s, _state(float(s)), jax.random.key(s), data_position={"index": s})
    ck.wait()
    ck.close()


def _restore(directory):
    ck = TrainCheckpointer(directory, every_steps=1, keep=10, async_save=False)
    state, _, _, meta = ck.restore(_state(0.0), jax.random.key(0))
    return ck, state, meta


def test_partially_written_step_is_never_restored(tmp_path):
    d = tmp_path / "checkpoints"
    _save_steps(d, [1, 2])
    # A kill mid-write on a file system without atomic renames: step 3 exists but has no commit markers and
    # a truncated array file. And an orbax tmp folder of step 4 that was never renamed.
    shutil.copytree(d / "2", d / "3")
    for marker in (d / "3").rglob("commit_success.txt"):
        marker.unlink()
    for f in (d / "3" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:10])
    shutil.copytree(d / "2", d / "4.orbax-checkpoint-tmp-1234567")
    ck, state, meta = _restore(d)
    assert meta["step"] == 2 and meta["data"] == {"index": 2}
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.full((4, 3), 2.0, np.float32))
    assert not (d / "3").exists() and (d / QUARANTINE / "3-0").is_dir()  # kept aside, not deleted
    assert "incomplete" in (d / QUARANTINE / "3-0" / "REASON.txt").read_text()
    # Saving step 3 again works (the partial folder no longer blocks it) and is then restored.
    assert ck.save(3, _state(3.0), jax.random.key(3), data_position={"index": 3})
    ck.wait()
    _, state, meta = _restore(d)
    assert meta["step"] == 3 and float(state.params["w"][0, 0]) == 3.0


def test_corrupted_step_falls_back_to_the_previous_one(tmp_path):
    d = tmp_path / "checkpoints"
    _save_steps(d, [1, 2, 3])
    for f in (d / "3" / "state").rglob("*"):  # committed, then damaged (bit rot, a bad copy)
        if f.is_file() and f.name not in ("commit_success.txt", "_METADATA", "manifest.ocdbt"):
            f.write_bytes(b"\0" * 7)
    _, state, meta = _restore(d)
    assert meta["step"] == 2 and float(state.params["w"][0, 0]) == 2.0
    assert "unreadable" in (d / QUARANTINE / "3-0" / "REASON.txt").read_text()


def test_checkpoint_from_another_model_config_is_refused(tmp_path):
    d = tmp_path / "checkpoints"
    _save_steps(d, [1])
    other = _state(0.0)
    other = other.replace(params={**other.params, "w": jax.numpy.zeros((5, 3), jax.numpy.float32)})
    ck = TrainCheckpointer(d, every_steps=1, keep=10, async_save=False)
    with pytest.raises(
        ValueError, match=r"checkpoint from another model config: w has shape \(4, 3\), this run \(5, 3\)"
    ):
        ck.restore(other, jax.random.key(0))
    assert (d / "1").is_dir() and not (d / QUARANTINE).exists()  # nothing moved or lost
