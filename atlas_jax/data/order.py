"""Weighted, seeded, resumable sampling of training problems (Arc-ATLAS-Teach v1 ``bandit_weight``).

``WeightedOrder`` draws problem indices i.i.d. with replacement, ``P(i) = w_i / Σ_j w_j``. Draw number
``t`` (0-based, counted over the whole run) is entry ``t mod B`` of block ``⌊t / B⌋`` (B =
``BLOCK``), and block ``b`` is ``numpy.random.default_rng([seed, TAG, b]).choice(n, B, p=w/Σw)``. So the
sequence depends only on (seed, weights), not on how many indices each step takes, and the whole state
is the draw counter: ``position == {"kind": "weighted", "draws": t}``, stored in the checkpoint's data
position and passed back on resume. Zero-weight problems are never drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BLOCK = 4096
TAG = 0x57E1  # separates these streams from the epoch shuffles seeded with [seed, epoch]


class WeightedOrder:
    """Seeded i.i.d. sampling by weight; same interface as ``training.sft.EpochOrder`` (take/peek/position).

    Args:
      weights: one non-negative finite weight per problem, not all zero.
      seed: the run seed.
      position: a checkpointed ``position`` to resume from (None/{} = the start).

    Raises:
      ValueError: bad weights, or a ``position`` written by a different order (e.g. an epoch order).
    """

    def __init__(self, weights: Sequence[float], seed: int, position: dict[str, Any] | None = None) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size < 1:
            raise ValueError("WeightedOrder needs at least one weight")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("sampling weights must be finite, >= 0 and not all zero")
        self.n, self.seed = int(w.size), int(seed)
        self._p = w / w.sum()
        position = dict(position or {})
        if position and position.get("kind") != "weighted":
            raise ValueError(
                f"the checkpoint's data position {position} was written by an unweighted (epoch) order, but "
                "these problems carry sampling weights; resume with the same data, set "
                "--config.data.weight_field='' or start a new --config.output_dir"
            )
        self.draws = int(position.get("draws", 0))
        self._block: tuple[int, np.ndarray] | None = None

    def _draw(self, t: int) -> int:
        b = t // BLOCK
        if self._block is None or self._block[0] != b:
            rng = np.random.default_rng([self.seed, TAG, b])
            self._block = (b, rng.choice(self.n, size=BLOCK, p=self._p))
        return int(self._block[1][t % BLOCK])

    def peek(self) -> int:
        """The next index, without taking it."""
        return self._draw(self.draws)

    def take(self, k: int) -> list[int]:
        """The next ``k`` indices."""
        out = [self._draw(t) for t in range(self.draws, self.draws + k)]
        self.draws += k
        return out

    @property
    def position(self) -> dict[str, Any]:
        return {"kind": "weighted", "draws": self.draws}
