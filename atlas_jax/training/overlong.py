"""Over-long teacher completions: loss masking and a soft length penalty (DAPO), as pure functions.

A teacher completion cut off at the budget (finish reason ``"length"``) has a reward that says little
about the teaching it was going to write. Two remedies, usable together:

- **mask** (``grpo.mask_truncated``, applied in ``HostRollout.learner_batch``): a truncated completion
  keeps its place in its group (the group's mean and scale include its reward) but its tokens leave the
  loss: ``m_it = 0`` for every t, so it adds nothing to any numerator or denominator.
- **soft penalty** (``grpo.overlong_buffer`` = b > 0, ``grpo.overlong_penalty`` = κ): with L the completion
  length in tokens and B the budget, the reward gets

      r_len(L) = 0                    if L ≤ B − b
               = −κ·(L − (B − b))/b   if B − b < L ≤ B

  a penalty that grows linearly from 0 to −κ over the last b tokens of the budget (DAPO's "soft
  overlong punishment"), added before the advantages are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def soft_overlong_penalty(lengths: Sequence[int], budget: int, buffer: int, penalty: float) -> np.ndarray:
    """``r_len`` per completion (float32); all zeros when ``buffer`` is 0.

    Raises:
      ValueError: ``buffer`` outside ``[0, budget]`` or a negative ``penalty``.
    """
    if not 0 <= buffer <= budget:
        raise ValueError(
            f"overlong buffer must be in [0, {budget}] (the teaching budget), got {buffer} "
            "(--config.grpo.overlong_buffer)"
        )
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0, got {penalty} (--config.grpo.overlong_penalty)")
    lengths_arr = np.asarray(lengths, np.float32)
    if buffer == 0:
        return np.zeros_like(lengths_arr)
    over = np.clip(lengths_arr - (budget - buffer), 0.0, float(buffer))
    return (-penalty * over / buffer).astype(np.float32)
