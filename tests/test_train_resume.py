"""Kill-and-resume: 6 SFT steps straight ≡ 3 steps, a new process-like restart, 3 more (params and metrics)."""

import dataclasses

import jax
import numpy as np
import pytest

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
