"""Resource bounds: repeated SFT runs in one process (async checkpoints, TensorBoard, resume) leave the
number of open file descriptors and Python threads where the first run left them.

A leak per step or per run (an unclosed metrics file, event writer, checkpoint manager or its threads)
would make these grow with the 30 steps each later run adds. The per-step RSS / fd / thread curve of 200
GRPO steps is ``bench/soak.py`` (numbers in docs/reliability.md); timings are never asserted.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading

import numpy as np
import pytest

from atlas_jax.training.sft import train_sft
from atlas_jax.training.writers import read_metrics
from configs.base import get_config


@dataclasses.dataclass
class Row:
    input_ids: list
    completion_mask: list


def _config(out, steps):
    c = get_config()
    c.job, c.output_dir = "sft", str(out)
    c.model.teacher_preset, c.model.compute_dtype, c.model.remat = "tiny_qwen3", "float32", False
    c.mesh.shape = (1, -1, 1)
    c.sft.num_steps, c.sft.batch_size, c.sft.micro_batch_size, c.sft.max_length = steps, 8, 8, 16
    c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save = 5, 2, True
    c.logging.progress_bar, c.logging.tensorboard = False, True
    return c


def _open() -> tuple[int, int]:
    gc.collect()
    return len(os.listdir("/proc/self/fd")), threading.active_count()


@pytest.mark.slow
def test_fds_and_threads_do_not_grow_over_runs_and_steps(tmp_path):
    rng = np.random.default_rng(0)
    rows = [Row(list(map(int, rng.integers(2, 500, 12))), [0] * 6 + [1] * 6) for _ in range(8)]
    seen = []
    for steps in (10, 40, 70):  # each run resumes the previous one and adds 30 steps
        train_sft(_config(tmp_path, steps), rows)
        seen.append(_open())
    print("open fds, Python threads after each run:", seen)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 71))
    assert seen[1:] == [seen[0]] * 2, seen
