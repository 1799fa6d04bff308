"""Kill-and-resume: 6 SFT steps straight ≡ 3 steps, a new process-like restart, 3 more (params and metrics)."""

import dataclasses

import jax
import numpy as np
import pytest
from run_helpers import model_folders

from atlas_jax.training.sft import train_sft
from atlas_jax.training.writers import read_metrics
from configs.base import get_config


@dataclasses.dataclass
class Row:
    input_ids: list
    completion_mask: list


def _rows(n=13, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(rng.integers(6, 20))
        rows.append(Row(list(map(int, rng.integers(2, 512, k))), [0] * (k // 2) + [1] * (k - k // 2)))
    return rows


def _config(out, **ckpt):
    c = get_config()
    c.job = "sft"
    c.output_dir = str(out)
    c.model.teacher_preset = "tiny_qwen3"
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.sft.num_steps = 6
    c.sft.batch_size = 8
    c.sft.micro_batch_size = 8
    c.sft.max_length = 32
    c.sft.learning_rate = 1e-2
    c.optim.schedule = "cosine"  # the horizon matters: a resumed run must continue the same schedule
    c.optim.warmup_steps = 2
    c.logging.tensorboard = True
    c.logging.progress_bar = False
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = True
    for k, v in ckpt.items():
        c.checkpoint[k] = v
    return c


@pytest.mark.slow
def test_six_steps_equal_three_plus_resume_plus_three(tmp_path):
    rows = _rows()  # 13 rows, batches of 8: the data position crosses an epoch boundary mid-run
    straight = train_sft(_config(tmp_path / "a"), rows)
    first = train_sft(_config(tmp_path / "b", stop_after_steps=3), rows)
    assert first.ckpt.latest_step() == 3
    del first
    resumed = train_sft(_config(tmp_path / "b"), rows)  # same output dir: resumes at step 3
    assert resumed.start_step == 3
    pa, pb = jax.device_get(straight.params), jax.device_get(resumed.params)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bit-identical on CPU
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ma, mb, strict=True):
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert a[key] == b[key], (a["step"], key)
    assert ma[-1]["loss"] < ma[0]["loss"]  # it trained
    oa = jax.device_get(straight.state.opt_state)
    ob = jax.device_get(resumed.state.opt_state)
    for x, y in zip(jax.tree.leaves(oa), jax.tree.leaves(ob), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (tmp_path / "b" / "tensorboard").is_dir()


# -- GRPO: the baseline cache (p0, baseline lengths) travels in the checkpoint -------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    return model_folders(tmp_path_factory.mktemp("models"))


def _rl_file(tmp_path):
    """The v1 fixture (bandit weights: the weighted order is resumed too) plus one over-long problem."""
    import json
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "fixtures" / "arc_atlas_teach" / "rl_v1.jsonl"
    rows = [json.loads(x) for x in fixture.read_text().splitlines()]
    long_row = {
        **rows[0],
        "problem_id": "too-long",
        "prompt": "Count the apples. " * 40,
        "bandit_weight": 5.0,
    }
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, long_row]))
    return str(path)


def _grpo_config(out, folders, rl_path, **ckpt):
    c = get_config()
    c.job = "grpo"
    c.output_dir = str(out)
    c.model.teacher, c.model.student = folders["teacher"], folders["student"]
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.data.rl_path, c.data.eval_fraction = rl_path, 0.1
    c.protocol.baseline_template = "Q: {question}\nA:"
    c.protocol.probe_template = "Q: {question}\nPlan:"
    c.protocol.teacher_template = "Q: {question}\nPlan: {approach}\nTeach:"
    c.protocol.taught_template = "Q: {question}\nHint: {teaching}\nA:"
    c.protocol.max_prompt_tokens = 96
    c.protocol.max_probe_tokens, c.protocol.max_teaching_tokens, c.protocol.max_student_tokens = 6, 12, 6
    c.protocol.num_baseline_samples = c.protocol.num_student_samples = 2
    c.protocol.student_temperature = 1.0  # sampled baselines: recomputing one would change p0
    c.reward.efficiency = "student_shorter"  # rewards read the cached baseline lengths too
    c.grpo.num_steps, c.grpo.problems_per_step, c.grpo.num_generations, c.grpo.micro_batch_size = 4, 4, 2, 8
    c.grpo.learning_rate, c.grpo.beta = 1e-3, 0.0
    c.eval.every_steps, c.eval.num_problems = 2, 3
    c.logging.progress_bar, c.logging.tensorboard = False, False
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    for k, v in ckpt.items():
        c.checkpoint[k] = v
    return c


@pytest.mark.slow
def test_grpo_resume_restores_the_baseline_caches(tmp_path, hf_folders):
    from launch.train import train

    rl = _rl_file(tmp_path)
    train(_grpo_config(tmp_path / "a", hf_folders, rl))
    train(_grpo_config(tmp_path / "b", hf_folders, rl, stop_after_steps=2))
    from atlas_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "b" / "checkpoints") as ck:
        caches = ck.restore_meta()["baseline_cache"]
    assert caches["train"] and caches["eval"]  # both caches are in the checkpoint, keyed by id#hash
    assert all("#" in key for key in caches["train"]) and not set(caches["train"]) & set(caches["eval"])
    train(_grpo_config(tmp_path / "b", hf_folders, rl))  # resumes at step 2
    final = {}
    for run in ("a", "b"):
        with Checkpointer(tmp_path / run / "checkpoints") as ck:
            final[run] = ck.restore_meta()["baseline_cache"]
    # Equal caches at the end: the resumed run neither lost nor re-sampled a baseline of the first half.
    assert final["a"] == final["b"] and set(caches["train"]) < set(final["a"]["train"])
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4]
    assert all(m["overlong_skipped"] == 1 for m in ma + mb)  # the long problem never reached a step
    for a, b in zip(ma, mb, strict=True):
        keys = [k for k in a if not k.startswith("time/") and not k.endswith("_per_s")]
        assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
    assert "eval/reward_mean" in ma[1] and "eval/reward_mean" in ma[3]
