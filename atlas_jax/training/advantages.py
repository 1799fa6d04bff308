"""Group-relative advantages for GRPO, as pure functions.

Symbol legend: rewards are ``r[N, G]`` — N problems (groups), G teacher samples per problem;
``μ_n = mean_g r_ng``, ``σ_n = std_g r_ng`` (population std, ddof = 0), ``ε`` a small constant.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

AdvantageMode = Literal["grpo", "drgrpo", "rloo"]
ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")


def group_advantages(
    rewards: Float[Array, "N G"], mode: AdvantageMode, eps: float = 1e-6
) -> Float[Array, "N G"]:
    """Advantages of each sample relative to its group.

    - ``grpo``:   ``A_ng = (r_ng − μ_n) / (σ_n + ε)`` (group-normalised).
    - ``drgrpo``: ``A_ng = r_ng − μ_n`` (Dr. GRPO: no std division, which biases towards easy/hard groups).
    - ``rloo``:   ``A_ng = r_ng − (Σ_g' r_ng' − r_ng) / (G − 1) = G/(G−1)·(r_ng − μ_n)`` (leave-one-out).

    A group whose rewards are all equal gets zero advantages in every mode.

    Raises:
      ValueError: unknown mode, or ``rloo`` with G < 2.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    centred = rewards - mean
    if mode == "grpo":
        return centred / (rewards.std(axis=1, keepdims=True) + eps)
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
