"""Non-finite losses: the update of such a step is skipped (inside the jitted step), and N in a row stop the run.

``keep_if_finite`` runs inside the train step: with ``ok = isfinite(loss) ∧ isfinite(‖g‖)`` the new state
is ``ok ? new : old`` leaf by leaf (params, optimiser moments and counters), so a NaN/inf never reaches
the weights, the optimiser state or a checkpoint; the step's ``skipped`` metric is ``1 - ok``.

``NonFiniteMonitor`` runs on the host after the metrics of a step are fetched: it logs each skipped step
and raises ``NonFiniteLossError`` once ``max_consecutive`` steps in a row were skipped
(``--config.reliability.max_nonfinite_steps``; 0 never stops). Checkpoints already written are kept.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from absl import logging


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def keep_if_finite(new: Any, old: Any, *values: jax.Array) -> tuple[Any, jax.Array]:
    """``(new if every value is finite else old, skipped)`` for two pytrees of the same structure (jit-able)."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return kept, 1.0 - ok.astype(jnp.float32)


class NonFiniteMonitor:
    """Counts consecutive skipped steps (see the module docstring).

    Args:
      max_consecutive: stop after this many skipped steps in a row; 0 never stops.
    """

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = int(max_consecutive)
        self.run = 0
        self.skipped_steps: list[int] = []

    def observe(self, step: int, metrics: dict[str, Any]) -> bool:
        """Records step ``step``'s fetched metrics; returns whether its update was skipped.

        Raises:
          NonFiniteLossError: ``max_consecutive`` skipped steps in a row.
        """
        skipped = float(metrics.get("skipped", 0.0)) > 0
        if not skipped:
            self.run = 0
            return False
        self.run += 1
        self.skipped_steps.append(int(step))
        logging.warning(
            "step %d: non-finite loss (%s) or gradient norm (%s): update skipped (%d in a row)",
            step, metrics.get("loss"), metrics.get("grad_norm"), self.run,
        )  # fmt: skip
        if self.max_consecutive and self.run >= self.max_consecutive:
            first = self.skipped_steps[-self.run]
            raise NonFiniteLossError(
                f"{self.run} steps in a row ({first}..{step}) had a non-finite loss or gradient: stopping the run "
                "(their updates were skipped; the checkpoints written so far are intact). Lower the learning rate "
                "or check the data/rewards, or raise --config.reliability.max_nonfinite_steps (0 = never stop)"
            )
        return True
