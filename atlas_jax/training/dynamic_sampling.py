"""Dynamic sampling (DAPO, Yu et al. 2025): keep only groups whose rewards differ, as pure functions.

A group whose G rewards are all equal has zero advantages in every mode: it adds no policy gradient,
only KL and noise in the loss normalisation. In ATLAS this is common: a teaching that does not change
the student's outcome gives every sample the same Δ. Dynamic sampling rolls out more problems until
the step has ``target`` informative groups or ``max_rounds`` rollout calls were made.

Symbols: ``r[N, G]`` rewards of N groups, ``ε`` the tolerance; group n is *informative* when
``max_g r_ng − min_g r_ng > ε``.
"""

from __future__ import annotations

import numpy as np


def informative_groups(rewards: np.ndarray, eps: float) -> np.ndarray:
    """``bool[N]``: ``max_g r_ng − min_g r_ng > ε``.

    Raises:
      ValueError: ``rewards`` is not 2-D or ``eps`` is negative.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [groups, samples], got shape {r.shape}")
    if eps < 0:
        raise ValueError(f"dynamic sampling eps must be >= 0, got {eps} (--config.grpo.dynamic_sampling_eps)")
    if r.shape[0] == 0:
        return np.zeros((0,), bool)
    return (r.max(axis=1) - r.min(axis=1)) > eps


def select(kept: list[int], informative: np.ndarray, offset: int, target: int) -> list[int]:
    """Appends to ``kept`` the indices (``offset + n``) of informative groups, up to ``target`` in all."""
    out = list(kept)
    for n in np.flatnonzero(informative):
        if len(out) >= target:
            break
        out.append(offset + int(n))
    return out


def stats(
    num_generated: int, num_informative: int, num_kept: int, rounds: int, target: int
) -> dict[str, float]:
    """Logged per step: ``dynamic/kept_fraction`` = informative / generated groups, ``dynamic/rounds``,
    ``dynamic/extra_groups`` (groups rolled out beyond the target), ``dynamic/groups_kept`` and
    ``dynamic/target_met`` (1 when the step reached its target)."""
    return {
        "dynamic/kept_fraction": num_informative / max(num_generated, 1),
        "dynamic/rounds": float(rounds),
        "dynamic/extra_groups": float(max(num_generated - target, 0)),
        "dynamic/groups_kept": float(num_kept),
        "dynamic/target_met": float(num_kept >= target),
    }
