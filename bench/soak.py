"""Soak: many tiny GRPO steps in one process; resident memory, open file descriptors and threads per step.

``python bench/soak.py --steps 200 --out /tmp/soak`` runs the real GRPO loop (``train_grpo``: two-pass
rollouts on the JAX engines, updates, metrics.jsonl + TensorBoard, async checkpoints every 10 steps with
``keep`` 3, an eval every 50) on two tiny random models and the sample problems. At the start of every step
(the weight push) it records RSS, peak RSS (``ru_maxrss``), open fds (``/proc/self/fd``), Python threads and
OS threads. It prints them at a few steps and the least-squares growth per step over the second half (after
the compile/warm-up steps), and writes every row to ``OUT/soak.json``.

There is no peer here: the quantity is the growth of our own process over time, which should be ~0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sample() -> dict[str, float]:
    import psutil

    p = psutil.Process()
    return {
        "rss_mb": p.memory_info().rss / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fds": len(os.listdir("/proc/self/fd")),
        "py_threads": threading.active_count(),
        "os_threads": p.num_threads(),
    }


SAMPLE_PROBLEMS = Path(__file__).resolve().parents[1] / "atlas_jax/data/samples/rl_sample.jsonl"
TINY = dict(model_type="qwen3", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=16, qk_norm=True, tie_word_embeddings=True)  # fmt: skip


def tiny_grpo_config(
    out: Path,
    steps: int,
    *,
    model: dict | None = None,
    generations: int = 2,
    completion_tokens: int = 8,
    problems: int = 2,
) -> Any:
    """The soak's run config: random teacher and student of shape ``model`` (default `TINY`) written under
    ``out``, the sample problems, ``problems`` × ``generations`` teacher samples of up to
    ``completion_tokens`` teaching tokens per step (probe and student answers 8 tokens), β 0.04 with an
    EMA reference, an eval every 50 steps, async checkpoints every 10 (keep 3)."""
    from bench._setup import bench_model, bench_tokenizer
    from configs.base import get_config

    shape = model or TINY
    teacher, _, _ = bench_model(out / "teacher", seed=0, **shape)
    student, _, _ = bench_model(out / "student", seed=1, **shape)
    bench_tokenizer().save_pretrained(teacher)
    bench_tokenizer().save_pretrained(student)

    c = get_config()
    c.job, c.output_dir = "grpo", str(out / "run")
    c.model.teacher, c.model.student = str(teacher), str(student)
    c.model.compute_dtype, c.model.remat = "float32", False
    c.mesh.shape = (1, -1, 1)
    c.data.rl_path = str(SAMPLE_PROBLEMS)
    g = c.grpo
    g.num_steps, g.problems_per_step, g.num_generations = steps, problems, generations
    g.micro_batch_size = min(4, problems * generations)
    g.learning_rate, g.beta, g.ref_update, g.ref_sync_steps = 1e-3, 0.04, "ema", 1
    p = c.protocol
    p.max_probe_tokens = p.max_student_tokens = 8
    p.max_teaching_tokens = completion_tokens
    p.num_baseline_samples = p.num_student_samples = 1
    c.eval.every_steps, c.eval.num_problems = 50, 2
    c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save = 10, 3, True
    c.checkpoint.resume = False
    c.logging.progress_bar = False
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="/tmp/atlas_soak")
    args = ap.parse_args()

    from atlas_jax.data.loading import train_eval_split
    from atlas_jax.data.rl import load_problems
    from atlas_jax.engines.base import Engine
    from atlas_jax.training import rl_setup
    from atlas_jax.training.grpo import GRPOLearner
    from atlas_jax.training.grpo_loop import train_grpo
    from atlas_jax.training.runtime import make_policy

    out = Path(args.out)
    c = tiny_grpo_config(out, args.steps)
    g = c.grpo

    rows: list[dict] = []

    class Probe(Engine):
        """The teacher engine; each weight push (one per step, plus one per eval) records a sample."""

        def __init__(self, inner):
            self.inner = inner

        def generate(self, prompts, params, n=1):
            return self.inner.generate(prompts, params, n)

        def update_weights(self, params):
            rows.append({"push": len(rows), "t": time.perf_counter(), **sample()})
            self.inner.update_weights(params)

        @property
        def tokenizer(self):
            return self.inner.tokenizer

        def close(self):
            self.inner.close()

    problems = load_problems(c.data.rl_path)
    train, evals = train_eval_split(problems, 0.25, 0)
    policy = make_policy(
        c, learning_rate=g.learning_rate, total_steps=g.num_steps, extra_init=GRPOLearner.extra_init(g.beta)
    )
    teacher_engine, student_engine = Probe(rl_setup.teacher_engine(c, policy)), rl_setup.student_engine(c)
    t0 = time.perf_counter()
    train_grpo(c, train, evals, teacher_engine, student_engine, policy)
    rows.append({"push": len(rows), "t": time.perf_counter(), **sample()})
    wall = time.perf_counter() - t0
    # Eval pushes sit between steps; keep one row per training step (the first push of each step).
    metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    evals_at = {m["step"] for m in metrics if any(k.startswith("eval/") for k in m)}
    per_step, push = [], 0
    for step in range(1, args.steps + 1):
        per_step.append({"step": step, **rows[push]})
        push += 2 if step in evals_at else 1
    per_step.append({"step": "end", **rows[-1]})
    (out / "soak.json").write_text(json.dumps(per_step, indent=1))

    keys = ("rss_mb", "peak_rss_mb", "fds", "py_threads", "os_threads")
    print(f"{args.steps} GRPO steps in {wall:.0f} s (machine shared and loaded; timings are not the point)")
    print("step   " + "  ".join(f"{k:>11}" for k in keys))
    marks = sorted({1, 2, 5, 10, 25, 50, 100, 150, args.steps} & set(range(1, args.steps + 1)))
    for r in [per_step[s - 1] for s in marks] + [per_step[-1]]:
        print(f"{r['step']!s:>5}  " + "  ".join(f"{r[k]:11.1f}" for k in keys))
    half = per_step[len(per_step) // 2 : -1]
    xs = np.array([r["step"] for r in half], float)
    for k in keys:
        slope = np.polyfit(xs, np.array([r[k] for r in half], float), 1)[0]
        print(f"growth of {k} over steps {int(xs[0])}-{int(xs[-1])}: {slope:+.4f} per step")
    if (
        args.steps >= 20
    ):  # issue 14's check: memory after the warm-up (step 10) vs the last step, and the slope
        a, b = per_step[9], per_step[args.steps - 1]
        tail = per_step[9 : args.steps]
        xs = np.array([r["step"] for r in tail], float)
        for k in ("rss_mb", "peak_rss_mb"):
            slope = np.polyfit(xs, np.array([r[k] for r in tail], float), 1)[0]
            print(
                f"{k}: step 10 {a[k]:.0f} MB, step {args.steps} {b[k]:.0f} MB ({b[k] - a[k]:+.0f} MB); "
                f"least-squares slope over steps 10-{args.steps}: {slope:+.3f} MB/step"
            )


if __name__ == "__main__":
    main()
