"""Bad-input catalogue (docs/reliability.md lists every case and the test that shows it).

The cases here are the ones no other test file covers: extra fields, NaN/inf rewards and NaN losses (skipped,
logged, never checkpointed; N in a row stop the run), a tokenizer that does not match the teacher, a
checkpoint from another model config, an unwritable output dir and a full disk during a checkpoint write.
"""

from __future__ import annotations

import dataclasses
import errno
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from protocol_helpers import make_tokenizer

from atlas_jax.checkpoint import Checkpointer
from atlas_jax.data.rl import load_problems
from atlas_jax.models.config import ModelConfig
from atlas_jax.training.grpo import GRPOLearner, GRPOSpec
from atlas_jax.training.input_checks import check_teacher_tokenizer
from atlas_jax.training.nan_guard import NonFiniteLossError, NonFiniteMonitor
from atlas_jax.training.runtime import make_policy
from atlas_jax.training.sft import train_sft
from atlas_jax.training.writers import read_metrics
from configs.base import get_config

VOCAB = 53
TINY = ModelConfig(
    model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=True, eos_token_id=VOCAB - 1,
)  # fmt: skip


def _config(out, **grpo):
    c = get_config()
    c.output_dir = str(out)
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.mesh.shape = (1, -1, 1)
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    for k, v in grpo.items():
        c.grpo[k] = v
    return c


def _host(tree):
    return {k: np.asarray(v) for k, v in jax.device_get(tree).items()}


# ---- data rows ----


def test_extra_fields_are_ignored(tmp_path):
    """Documented: fields other than the configured problem/answer/id fields are ignored."""
    path = tmp_path / "extra.jsonl"
    rows = [{"prompt": "1+1?", "ground_truth": "2", "source": "x", "difficulty": 3, "nested": {"a": [1]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [p] = load_problems(str(path))
    assert (p.question, p.answer) == ("1+1?", "2")


# ---- non-finite rewards and losses ----


@pytest.fixture(scope="module")
def grpo_learner(tmp_path_factory):
    config = _config(
        tmp_path_factory.mktemp("grpo"), learning_rate=1e-2, problems_per_step=2, num_generations=4,
        micro_batch_size=8, temperature=1.0, beta=0.0, num_iterations=1,
    )  # fmt: skip
    config.protocol.max_teaching_tokens = 4
    policy = make_policy(config, learning_rate=1e-2, total_steps=8, model_cfg=TINY)
    return policy, GRPOLearner(policy, GRPOSpec.from_config(config))


def _batch(learner, rewards):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, VOCAB - 1, 5)) for _ in range(8)]
    comps = [list(rng.integers(1, VOCAB - 1, 4)) for _ in range(8)]
    return learner.build_batch(prompts, comps, [[-1.0] * 4] * 8, np.asarray(rewards, np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_reward_skips_the_update_then_training_goes_on(grpo_learner, bad):
    policy, learner = grpo_learner
    before, step_before = _host(policy.params), int(policy.state.step)
    rewards = [[0.0, 1.0, 0.5, bad], [1.0, 0.0, 0.0, 1.0]]
    m = jax.device_get(learner.update(_batch(learner, rewards), 0))
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    after = _host(policy.params)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # the NaN never reached the weights
    assert int(policy.state.step) == step_before  # nor the optimiser's counters
    monitor = NonFiniteMonitor(3)
    assert monitor.observe(1, m) is True
    m = jax.device_get(learner.update(_batch(learner, [[0.0, 1.0, 0.5, 0.2], [1.0, 0.0, 0.0, 1.0]]), 1))
    assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
    assert monitor.observe(2, m) is False and monitor.run == 0  # a finite step resets the count
    assert any(not np.array_equal(_host(policy.params)[k], before[k]) for k in before)


def test_nan_losses_in_a_row_stop_the_run_and_are_never_checkpointed(tmp_path):
    """SFT at lr 1e30: step 1's update blows the weights up, so every later loss is NaN. Those updates are
    skipped (state unchanged, ``skipped`` = 1 in metrics.jsonl); the 3rd in a row stops the run."""

    @dataclasses.dataclass
    class Row:
        input_ids: list
        completion_mask: list

    rng = np.random.default_rng(0)
    rows = [Row(list(map(int, rng.integers(2, VOCAB - 1, 12))), [0] * 6 + [1] * 6) for _ in range(8)]
    c = _config(tmp_path)
    c.job = "sft"
    c.model.teacher_preset = "tiny_qwen3"
    c.sft.num_steps, c.sft.batch_size, c.sft.micro_batch_size, c.sft.max_length = 10, 8, 8, 16
    c.sft.learning_rate = 1e30
    c.optim.max_grad_norm = 0.0
    c.checkpoint.every_steps = 1
    c.reliability.max_nonfinite_steps = 3
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row \(2\.\.4\) had a non-finite loss"):
        train_sft(c, rows)
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    logged_bad = lambda v: v in ("nan", "inf", "-inf")  # noqa: E731 - how metrics.jsonl writes non-finite values
    assert all(logged_bad(r["loss"]) or logged_bad(r["grad_norm"]) for r in records[1:]), records
    with Checkpointer(tmp_path / "checkpoints") as ck:
        steps = ck.complete_steps()
        assert steps and max(steps) <= 5
        for s in steps:
            state = ck.restore(s)
            for k, v in state["params"].items():
                assert np.isfinite(v).all(), (s, k)  # nothing non-finite was ever written


# ---- models, tokenizers, checkpoints, output dirs ----


def test_tokenizer_mismatch_between_teacher_and_engine(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"tokenizer mismatch between teacher and engine: .* has \d+ tokens but "
                                         r"the teacher model has 100 embedding rows"):  # fmt: skip
        check_teacher_tokenizer(tok, 100, source="tok_dir", teacher="", load=None)
    teacher_dir, other_dir = tmp_path / "teacher", tmp_path / "other"
    tok.save_pretrained(teacher_dir)
    other = make_tokenizer(vocab_size=300)
    other.save_pretrained(other_dir)
    from atlas_jax.training.rl_setup import load_tokenizer

    with pytest.raises(
        ValueError, match=r"--config.model.tokenizer=.*other differs from the tokenizer shipped"
    ):
        check_teacher_tokenizer(
            other, 10_000, source=str(other_dir), teacher=str(teacher_dir), load=load_tokenizer
        )
    check_teacher_tokenizer(
        tok, len(tok), source=str(teacher_dir), teacher=str(teacher_dir), load=load_tokenizer
    )


def test_resuming_with_another_model_config_is_refused_and_keeps_the_checkpoint(tmp_path):
    c = _config(tmp_path)
    p = make_policy(c, learning_rate=1e-3, total_steps=2, model_cfg=TINY)
    p.save(1, data_position={}, force=True)
    p.ckpt.wait()
    wider = dataclasses.replace(TINY, hidden_size=64)
    with pytest.raises(
        ValueError, match=r"checkpoint from another model config: .* has shape .*--config.output_dir"
    ):
        make_policy(c, learning_rate=1e-3, total_steps=2, model_cfg=wider)
    assert Checkpointer(tmp_path / "checkpoints").complete_steps() == [1]  # still there, untouched


def test_unwritable_output_dir_names_the_flag(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    c = _config(blocker / "run")  # a path below a regular file can never be created (even as root)
    with pytest.raises(PermissionError, match=r"--config.output_dir=.*a_file/run: cannot write there"):
        make_policy(c, learning_rate=1e-3, total_steps=2, model_cfg=TINY)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_during_a_checkpoint_write(tmp_path, monkeypatch, async_save):
    """ENOSPC while orbax writes step 2: a clear error, step 1 intact, the tmp folder never restored."""
    d = tmp_path / "checkpoints"
    ck = Checkpointer(d, async_save=async_save)
    ck.save(1, {"w": np.ones(3, np.float32)}, meta={"step": 1}, force=True)
    ck.wait()

    async def full_disk(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full_disk)
    with pytest.raises(OSError, match=r"No space left on device.*the complete steps \[1\] are intact") as e:
        ck.save(2, {"w": np.full(3, 2.0, np.float32)}, meta={"step": 2}, force=True)
        ck.wait()
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    fresh = Checkpointer(d)
    assert fresh.complete_steps() == [1] and fresh.restore_meta() == {"step": 1}
    np.testing.assert_array_equal(fresh.restore()["w"], np.ones(3, np.float32))
