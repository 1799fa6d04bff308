"""GRPO step time as the group size G and the completion length double: the slope per doubling.

    python -m bench.grpo_scaling [--size small|tiny] [--gens 2,4,8] [--lengths 32,64,128] [--steps 4]

Runs the real GRPO loop (``train_grpo``: weight push, two-pass rollout on the JAX engines, update) of
``bench/soak.py`` on random teacher/student models of ``--size`` and the quickstart's arithmetic problems
(``atlas_jax.data.arith_task``, a new one each time), 2 problems per step, once per
configuration: G over ``--gens`` at the middle length, then the teaching length (``max_teaching_tokens``;
the teacher ignores EOS, so every completion has exactly that length) over ``--lengths`` at the
middle G. The quickstart's short templates and one prompt bucket (64) keep every program's shapes fixed, so
after ``--warmup`` steps (compiles) nothing recompiles; ``--steps`` are timed and the table holds the
median of the trainer's own ``time/*`` metrics over the timed steps.

Slope: with step time t(x) ≈ c·x^b the ratio per doubling is 2^b, fitted by least squares on
(log2 x, log2 t). 2.0 is linear (all of the step scales with x); 1.0 means fixed costs dominate; above
2 would be super-linear (e.g. attention over the length, recompiles). No peer: the quantity is our
own scaling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.soak import TINY, tiny_grpo_config

SIZES = {
    "tiny": TINY,
    # 3.2M params, 4 layers of the peer model's head layout (head_dim 64, 2 kv heads); vocab = the bench tokenizer.
    "small": dict(model_type="qwen2", vocab_size=300, hidden_size=256, intermediate_size=704, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True),
}  # fmt: skip


def quickstart_templates(c) -> None:
    """The quickstart's short prompt templates (``configs/run/quickstart.py``)."""
    from configs.run.quickstart import get_config as quickstart

    q = quickstart().protocol
    for k in ("baseline_template", "probe_template", "teacher_template", "taught_template"):
        c.protocol[k] = q[k]


PHASES = ("step", "weight_push", "gen_teacher", "gen_taught", "gen_probe", "scoring", "update")


def run_one(
    size: dict, generations: int, length: int, steps: int, warmup: int = 2, bucket: int = 64
) -> dict[str, float]:
    """Median ``time/*`` seconds over the timed steps of one configuration (plus the teacher tokens/step)."""
    from atlas_jax.data import arith_task
    from atlas_jax.engines.jax_sampler import JaxSampler
    from atlas_jax.pipeline import rl_problem
    from atlas_jax.training import rl_setup, train_step
    from atlas_jax.training.engine_setup import load_tokenizer
    from atlas_jax.training.grpo import GRPOLearner
    from atlas_jax.training.grpo_loop import train_grpo
    from atlas_jax.training.runtime import make_policy

    with tempfile.TemporaryDirectory() as tmp:
        c = tiny_grpo_config(
            Path(tmp), steps + 1, model=size, generations=generations, completion_tokens=length
        )
        c.eval.every_steps, c.eval.num_problems = 0, 1  # only the end-of-run eval (outside time/step)
        c.checkpoint.every_steps, c.checkpoint.async_save = 0, False  # only the final save
        quickstart_templates(c)
        # The quickstart's arithmetic problems: with its templates every teacher prompt fits one 64-token bucket,
        # so nothing compiles after the warm-up and the completion is most of each learner row.
        c.engine.jax_prompt_bucket = c.grpo.prompt_bucket = bucket
        g = c.grpo
        problems = arith_task.sample_problems(0, 2 * (warmup + steps) + 2, {1: 1, 2: 1, 3: 1}, max_operand=6)
        problems = [rl_problem(p) for p in problems]
        train, evals = problems[2:], problems[:2]
        policy = make_policy(
            c,
            learning_rate=g.learning_rate,
            total_steps=g.num_steps,
            extra_init=GRPOLearner.extra_init(g.beta),
        )
        # The teacher as engine_setup.teacher_engine builds it, but never stopping at EOS: every completion
        # is exactly `length` tokens, so the completion length is the x of the fit.
        teacher = JaxSampler(
            train_step.merge_model(policy.graphdef, policy.params, policy.rest),
            load_tokenizer(c.model.teacher),
            mesh=policy.mesh,
            prompt_bucket=int(c.engine.jax_prompt_bucket),
            rollout_copy=bool(c.engine.jax_rollout_copy),
            ignore_eos=True,
        )
        student = rl_setup.student_engine(c)
        train_grpo(c, train, evals, teacher, student, policy)
        rows = [json.loads(x) for x in (Path(c.output_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup and "time/step" in r]
    out = {k: statistics.median(r.get(f"time/{k}", 0.0) for r in timed) for k in PHASES}
    out["teacher_tokens"] = statistics.median(
        r["teacher_tokens_per_s"] * r["time/step"] for r in timed
    )  # completion tokens the teacher wrote per step
    return out


def per_doubling(xs: list[int], ts: list[float]) -> float:
    """``2^b`` of the least-squares fit ``log2 t = a + b·log2 x``."""
    b = np.polyfit(np.log2(xs), np.log2(ts), 1)[0]
    return float(2**b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--gens", default="2,4,8", help="G values (num_generations)")
    ap.add_argument("--lengths", default="32,64,128", help="max_teaching_tokens values")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    a = ap.parse_args()
    gens = [int(x) for x in a.gens.split(",")]
    lengths = [int(x) for x in a.lengths.split(",")]
    g_mid, l_mid = gens[len(gens) // 2], lengths[len(lengths) // 2]
    configs = [(g, l_mid) for g in gens] + [(g_mid, n) for n in lengths if n != l_mid]
    t0 = time.perf_counter()
    results = {}
    for cfg in configs:  # each printed when done, so a run cut short still shows what it measured
        results[cfg] = run_one(SIZES[a.size], *cfg, a.steps, a.warmup)
        print(
            f"G={cfg[0]} len={cfg[1]}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[cfg].items()),
            flush=True,
        )
    print(
        f"GRPO step scaling, size {a.size}, 2 problems/step, median of {a.steps} steps ({time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'G':>3} {'len':>4} {'tok':>5} " + " ".join(f"{k:>11}" for k in PHASES) + "   (seconds)")
    for (g, n), r in sorted(results.items()):
        print(f"{g:3d} {n:4d} {r['teacher_tokens']:5.0f} " + " ".join(f"{r[k]:11.3f}" for k in PHASES))
    for name, axis in (
        ("G", [(g, l_mid) for g in gens]),
        ("completion length", [(g_mid, n) for n in lengths]),
    ):
        xs = [c[0] if name == "G" else c[1] for c in axis]
        if len(xs) < 2:  # a single value on this axis (e.g. --lengths 32): no slope
            continue
        for k in ("step", "gen_teacher", "update"):
            ts = [max(results[c][k], 1e-6) for c in axis]
            pairs = ", ".join(f"{ts[i + 1] / ts[i]:.2f}" for i in range(len(ts) - 1))
            print(f"{name} doubling, time/{k}: {per_doubling(xs, ts):.2f}x per doubling (pairwise {pairs})")


if __name__ == "__main__":
    main()
