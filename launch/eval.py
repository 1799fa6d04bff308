"""Evaluate teacher + student against the student alone: ``python -m launch.eval --config=<run config>``.

- ``config.job == "pipeline"`` (e.g. ``configs/run/quickstart.py``): evaluates the run folder
  ``--config.output_dir`` (its student, SFT-only teacher and RL teacher on its held-out split).
- otherwise: the student ``--config.model.student`` (on ``--config.engine.student``) alone and with the
  teacher ``--config.model.teacher`` (an HF folder or exported checkpoint, served with fixed weights on
  the same engine kind as the student) on ``--config.data.eval_path`` (first ``eval.num_problems`` rows).
Both write ``<output_dir>/eval/summary.json``, ``table.md`` and ``plot.png``. Also installed as ``atlas-eval``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/run/*.py).", lock_config=True
)


def evaluate(config) -> dict:
    """Runs the evaluation named by ``config`` (see the module docstring); returns the summary."""
    if config.job == "pipeline":
        from atlas_jax.pipeline import evaluate_run

        return evaluate_run(config, Path(config.output_dir), wall_clock_start=time.perf_counter())
    return _evaluate_models(config)


def _evaluate_models(config) -> dict:
    from atlas_jax import evaluation, plots
    from atlas_jax.data.rl import load_problems
    from atlas_jax.training import rl_setup

    d, e = config.data, config.eval
    missing = [f for f, v in (("model.student", config.model.student), ("model.teacher", config.model.teacher),
                              ("data.eval_path", d.eval_path)) if not v]  # fmt: skip
    if missing:
        raise app.UsageError("launch.eval needs " + ", ".join(f"--config.{m}" for m in missing))
    start = time.perf_counter()
    problems = load_problems(d.eval_path, problem_field=d.problem_field, answer_field=d.answer_field,
                             id_field=d.id_field, weight_field="")  # fmt: skip
    problems = problems[: int(e.num_problems)]
    student = rl_setup.student_engine(config)
    tconf = config.copy_and_resolve_references()
    tconf.model.student = config.model.teacher
    teacher = rl_setup.student_engine(tconf)  # fixed weights: served like a student
    try:
        seeds = [int(config.seed) + i for i in range(int(e.num_seeds))]
        outcomes = evaluation.run_arms(student, {"teacher": teacher}, problems, rl_setup.rollout_settings(config),
                                       seeds, chunk=int(e.chunk), progress=bool(config.logging.progress_bar))  # fmt: skip
    finally:
        student.close()
        teacher.close()
    summary = evaluation.summarize(outcomes, ["all"] * len(problems), num_resamples=int(e.bootstrap_resamples),
                                   confidence=float(e.confidence), seed=int(config.seed))  # fmt: skip
    summary["wall_clock_s"] = time.perf_counter() - start
    summary["seeds"] = seeds
    out = Path(config.output_dir) / "eval"
    evaluation.write_results(out, summary)
    plots.plot_run(summary, Path(config.output_dir) / "metrics.jsonl", out / "plot.png")
    print((out / "table.md").read_text())
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/run/<name>.py is required")
    from atlas_jax.training.engine_setup import apply_jax_memory_config

    apply_jax_memory_config(_CONFIG.value)  # before JAX starts (see launch.train)
    evaluate(_CONFIG.value)


def run() -> None:
    """Console-script entry point (``atlas-eval``)."""
    flags.FLAGS.unparse_flags()
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    app.run(main)
