"""Group-relative advantages for GRPO, as pure functions.

Symbol legend: rewards are ``r[N, G]`` — N problems (groups), G teacher samples per problem;
``μ_n = mean_g r_ng``, ``σ_n = std_g r_ng`` (population std, ddof = 0), ``σ_B = std_ng r_ng`` (the
whole batch), ``f`` a floor on the scale (``std_floor``), ``ε`` a small constant.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

AdvantageMode = Literal["grpo", "drgrpo", "rloo"]
ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")
RewardScale = Literal["group", "batch", "none"]
REWARD_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: Float[Array, "N G"],
    mode: AdvantageMode,
    eps: float = 1e-6,
    *,
    scale: RewardScale = "group",
    std_floor: float = 0.0,
) -> Float[Array, "N G"]:
    """Advantages of each sample relative to its group.

    - ``grpo``:   ``A_ng = (r_ng − μ_n) / (s + ε)`` with the scale ``s`` chosen by ``scale``:
      ``group`` → ``s = max(σ_n, f)`` (the GRPO default when f = 0), ``batch`` → ``s = max(σ_B, f)``
      (one scale for the whole batch, as in TRL's ``scale_rewards="batch"``), ``none`` → no division
      (the same as ``drgrpo``). The floor ``f`` keeps a group whose rewards differ only by a tiny term
      (e.g. the efficiency bonus when every teaching had the same Δ) from being blown up to ±1:
      with ``f`` = 0.1 a spread of 0.02 stays an advantage of ~0.1.
    - ``drgrpo``: ``A_ng = r_ng − μ_n`` (Dr. GRPO: no std division, which biases towards easy/hard groups).
    - ``rloo``:   ``A_ng = r_ng − (Σ_g' r_ng' − r_ng) / (G − 1) = G/(G−1)·(r_ng − μ_n)`` (leave-one-out).

    A group whose rewards are all equal gets zero advantages in every mode.

    Raises:
      ValueError: unknown mode or scale, or ``rloo`` with G < 2.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    centred = rewards - mean
    if mode == "grpo":
        if scale == "group":
            return centred / (jnp.maximum(rewards.std(axis=1, keepdims=True), std_floor) + eps)
        if scale == "batch":
            return centred / (jnp.maximum(rewards.std(), std_floor) + eps)
        if scale == "none":
            return centred
        raise ValueError(
            f"unknown reward scale {scale!r}; choose one of {REWARD_SCALES} (--config.grpo.scale_rewards)"
        )
    if mode == "drgrpo":
        return centred
    if mode == "rloo":
        g = rewards.shape[1]
        if g < 2:
            raise ValueError(
                "rloo advantages need at least 2 samples per group (--config.grpo.num_generations)"
            )
        return centred * (g / (g - 1))
    raise ValueError(
        f"unknown advantage mode {mode!r}; choose one of {ADVANTAGE_MODES} (--config.grpo.advantage)"
    )
