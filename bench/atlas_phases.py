"""One full ATLAS GRPO step split by phase, from the trainer's own ``time/*`` metrics.

    python -m bench.atlas_phases [--shape quickstart|peer] [--steps 3] [--warmup 2]

Runs ``train_grpo`` (the loop ``launch.train`` runs) with the quickstart's GRPO and protocol settings
(``configs/run/quickstart.py``: 8 problems × G = 8 teacher samples of ≤ 32 tokens, probe ≤ 8, student
answers ≤ 8, k = m = 4 student samples, β = 0.05, its short templates), on the quickstart's arithmetic
problems (``atlas_jax.data.arith_task``, a fresh problem every time, so the baseline runs every step as
in the quickstart), with random teacher and student models of ``--shape``: ``quickstart`` (its tiny
decoder: hidden 64, 2 layers) or ``peer`` (DESIGN.md's peer model, 23M params, both roles), and the
bench tokenizer. After ``--warmup`` steps (compiles), prints the median seconds of each phase over
``--steps`` steps and its share of ``time/step``:

push (``time/weight_push``) → baseline, probe, teacher, taught (``time/gen_*``), scoring (answer checks,
rewards, tokenisation: the rest of ``time/rollout``) → update (``time/update``: host batch, reference
log-prob pass, optimiser step) → checkpoint; "other" is ``time/step`` minus those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grpo_scaling import quickstart_templates
from bench.soak import tiny_grpo_config

SHAPES = {
    "quickstart": dict(model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=256, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=32, qk_norm=True, tie_word_embeddings=True,
                       rope_theta=1e4),
    "peer": dict(model_type="qwen2", vocab_size=1024, hidden_size=512, intermediate_size=1408, num_layers=8,
                 num_heads=8, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
                 rope_theta=1e4),
}  # fmt: skip
# (label, metric key) in the order of a step; sub-phases are indented and not summed again.
PHASES = (
    ("push", "weight_push"),
    ("baseline (student)", "gen_baseline"),
    ("probe (student)", "gen_probe"),
    ("teacher", "gen_teacher"),
    ("taught (student)", "gen_taught"),
    ("scoring (answers, rewards)", "scoring"),
    ("update", "update"),
    ("  host batch", "update_batch"),
    ("  reference log-probs", "update_logprobs"),
    ("  optimiser step", "update_train"),
    ("checkpoint", "checkpoint"),
)
TOP = (
    "weight_push",
    "gen_baseline",
    "gen_probe",
    "gen_teacher",
    "gen_taught",
    "scoring",
    "update",
    "checkpoint",
)


def configure(out: Path, shape: dict, steps: int) -> tuple[Any, list[Any]]:
    """The quickstart's GRPO/protocol settings on random models of ``shape`` and arithmetic problems."""
    from atlas_jax.data import arith_task
    from atlas_jax.pipeline import rl_problem
    from configs.run.quickstart import get_config as quickstart

    q = quickstart()
    c = tiny_grpo_config(out, steps, model=shape)
    for k in ("problems_per_step", "num_generations", "micro_batch_size", "temperature", "top_p", "beta",
              "logprob_chunk", "learning_rate"):  # fmt: skip
        c.grpo[k] = q.grpo[k]
    c.grpo.ref_update = q.grpo.ref_update
    for k in ("max_probe_tokens", "max_teaching_tokens", "max_student_tokens", "max_prompt_tokens",
              "num_baseline_samples", "num_student_samples", "student_temperature", "empty_teaching", "verifier"):  # fmt: skip
        c.protocol[k] = q.protocol[k]
    quickstart_templates(c)
    c.eval.every_steps, c.eval.num_problems = 0, 8  # one evaluation, after the last step (not in time/step)
    c.checkpoint.every_steps, c.checkpoint.async_save = 0, False  # the quickstart's: only at the end
    c.logging.tensorboard = False
    problems = arith_task.sample_problems(0, 8 * steps + 8, {1: 1, 2: 1, 3: 1}, max_operand=6)
    return c, [rl_problem(p) for p in problems]


def run(shape: str, steps: int, warmup: int) -> tuple[dict[str, float], dict]:
    from atlas_jax.training import rl_setup
    from atlas_jax.training.grpo import GRPOLearner
    from atlas_jax.training.grpo_loop import train_grpo
    from atlas_jax.training.runtime import make_policy

    with tempfile.TemporaryDirectory() as tmp:
        c, problems = configure(Path(tmp), SHAPES[shape], warmup + steps)
        train, evals = problems[8:], problems[:8]
        g = c.grpo
        policy = make_policy(
            c,
            learning_rate=g.learning_rate,
            total_steps=g.num_steps,
            extra_init=GRPOLearner.extra_init(g.beta),
        )
        teacher, student = rl_setup.teacher_engine(c, policy), rl_setup.student_engine(c)
        train_grpo(c, train, evals, teacher, student, policy)
        rows = [json.loads(x) for x in (Path(c.output_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup and "time/step" in r]
    if not timed:
        raise RuntimeError(
            f"no timed step: metrics.jsonl has steps {[r['step'] for r in rows]}, keys {sorted(rows[-1])}"
        )
    keys = [k for _, k in PHASES] + ["step", "rollout"]
    for r in timed:  # what the named phases leave of the step (per step, so the medians stay comparable)
        r["time/other"] = r["time/step"] - sum(r.get(f"time/{k}", 0.0) for k in TOP)
    med = {k: statistics.median(r.get(f"time/{k}", 0.0) for r in timed) for k in [*keys, "other"]}
    settings = {"G": int(g.num_generations), "P": int(g.problems_per_step)}
    settings["teacher_tokens"] = statistics.median(r["teacher_tokens_per_s"] * r["time/step"] for r in timed)
    return med, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="quickstart")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    a = ap.parse_args()
    med, s = run(a.shape, a.steps, a.warmup)
    step = med["step"]
    print(
        f"ATLAS GRPO step, {a.shape} models, {s['P']} problems x G={s['G']} "
        f"({s['teacher_tokens']:.0f} teacher tokens/step), median of {a.steps} steps after {a.warmup} warm-up"
    )
    print(f"{'phase':30} {'seconds':>8} {'of step':>8}")
    for label, k in PHASES:
        print(f"{label:30} {med[k]:8.3f} {med[k] / step:8.1%}")
    other = med["other"]
    print(f"{'other (loop, metrics)':30} {other:8.3f} {other / step:8.1%}")
    print(f"{'step (time/step)':30} {step:8.3f} {1:8.1%}   (medians: the rows need not add up exactly)")
    top = max(TOP, key=lambda k: med[k])
    print(
        f"dominant phase: {dict((k, lbl) for lbl, k in PHASES)[top].strip()} ({med[top] / step:.0%} of the step)"
    )


if __name__ == "__main__":
    main()
