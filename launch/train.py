"""Train a teacher: ``python -m launch.train --config=configs/run/<name>.py [--config.key=value ...]``.

``config.job`` selects what runs: "sft" (teacher warm-up), "grpo" (two-pass GRPO) or "pipeline"
(the quickstart: data → student → SFT → GRPO → eval, ``atlas_jax.pipeline.run_pipeline``). The config is
validated first; every problem is reported with the flag to change. Also installed as ``atlas-train``.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/run/*.py).", lock_config=True
)


def train(config) -> None:
    """Validates ``config`` and runs its job."""
    from atlas_jax.training.validate import validate_config

    validate_config(config)
    from atlas_jax import compile_cache

    compile_cache.enable(str(config.mesh.get("compilation_cache", "run")), config.output_dir)
    if config.job == "sft":
        from atlas_jax.training.sft import run_sft

        run_sft(config)
    elif config.job == "grpo":
        from atlas_jax.training.grpo_loop import run_grpo

        run_grpo(config)
    else:
        from atlas_jax.pipeline import run_pipeline

        run_pipeline(config)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/run/<name>.py is required")
    # JAX's memory share beside in-process vLLM engines (--config.engine.jax_memory_fraction): read by
    # XLA when its backend starts, so it is set before JAX is imported.
    from atlas_jax.training.engine_setup import apply_jax_memory_config

    apply_jax_memory_config(_CONFIG.value)
    # Joins a multi-process run when ATLAS_COORDINATOR/... (or SLURM/TPU pod settings) say so; a
    # no-op for a single process. Must run before anything touches a JAX device.
    from atlas_jax import distributed

    distributed.initialize()
    train(_CONFIG.value)


def run() -> None:
    """Console-script entry point (``atlas-train``)."""
    flags.FLAGS.unparse_flags()
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    app.run(main)
