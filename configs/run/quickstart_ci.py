"""A shortened quickstart for CI: the same pipeline with a few steps per phase and tiny data.

    python -m launch.train --config=configs/run/quickstart_ci.py --config.output_dir=/tmp/qs_ci

It checks that every phase runs and every output is written; its numbers mean nothing.
"""

import ml_collections

from configs.run.quickstart import get_config as quickstart_config


def get_config() -> ml_collections.ConfigDict:
    c = quickstart_config()
    c.output_dir = "runs/quickstart_ci"
    c.task.student_rows = 512
    c.task.sft_rows = 128
    c.task.rl_problems = 64
    c.task.eval_per_level = 4
    c.student.num_steps = 4
    c.student.batch_size = 16
    c.student.micro_batch_size = 16
    c.sft.num_steps = 3
    c.sft.batch_size = 16
    c.sft.micro_batch_size = 16
    c.grpo.num_steps = 2
    c.grpo.problems_per_step = 4
    c.grpo.num_generations = 4
    c.grpo.micro_batch_size = 16
    c.protocol.num_baseline_samples = 2
    c.protocol.num_student_samples = 2
    c.eval.num_seeds = 3
    c.eval.chunk = 12
    c.eval.bootstrap_resamples = 200
    return c
