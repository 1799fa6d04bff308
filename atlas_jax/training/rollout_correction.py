"""Rollout correction: importance weights for the sampler/trainer mismatch, as pure functions.

The engine that sampled a rollout (vLLM in bf16, the JAX sampler, or the policy of one step earlier
with asynchronous rollouts) is not exactly the policy the learner differentiates. Each engine returns
the log-prob of every token it sampled (``log q``); the learner's own log-prob before the update is
``log π_old`` (``stop_gradient`` of the current one when μ = 1, the stored old log-probs when μ > 1).
The policy-gradient term of every token is scaled by a weight ``w`` built from their difference
(Yao et al. 2025 "truncated importance sampling"; verl / TRL rollout correction):

Symbols (``[B, C]`` arrays): ``d_it = log π_old(y_it) − log q(y_it)``, ``m_it`` the completion mask,
``n_i = Σ_t m_it``, ``C`` the threshold (> 1).

- ``mode="none"``: ``w = 1``.
- ``mode="tis"`` (truncated importance sampling): ``level="token"`` → ``w_it = min(exp(d_it), C)``;
  ``level="sequence"`` → ``w_it = min(r_i, C)`` with ``r_i = exp(Σ_t m_it d_it / n_i)`` the
  geometric-mean sequence ratio (length-normalised, so one threshold fits every length).
- ``mode="mis"`` (masked importance sampling): ``w = 1`` where the ratio lies in ``[1/C, C]``, else 0
  (the token, or with ``level="sequence"`` the whole sequence, leaves the policy-gradient term).

``w`` is a constant (no gradient flows through it).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

CorrectionMode = Literal["none", "tis", "mis"]
CORRECTION_MODES = ("none", "tis", "mis")
CorrectionLevel = Literal["token", "sequence"]
CORRECTION_LEVELS = ("token", "sequence")


def log_ratios(
    trainer_logp: Float[Array, "B C"],
    sampler_logp: Float[Array, "B C"],
    mask: Float[Array, "B C"],
    level: CorrectionLevel,
) -> Float[Array, "B C"]:
    """``d_it`` (token) or ``log r_i`` broadcast over the sequence's tokens (sequence); 0 on padding."""
    d = (trainer_logp - sampler_logp) * mask
    if level == "token":
        return d
    if level == "sequence":
        n = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        return jnp.broadcast_to(d.sum(axis=1, keepdims=True) / n, d.shape) * mask
    raise ValueError(
        f"unknown rollout correction level {level!r}; choose one of {CORRECTION_LEVELS} "
        "(--config.grpo.rollout_correction_level)"
    )


def correction_weights(
    trainer_logp: Float[Array, "B C"],
    sampler_logp: Float[Array, "B C"],
    mask: Float[Array, "B C"],
    *,
    mode: CorrectionMode,
    level: CorrectionLevel,
    threshold: float,
) -> tuple[Float[Array, "B C"], dict[str, Float[Array, ""]]]:
    """Per-token weights of the policy-gradient term (see the module docstring for the math).

    Returns:
      ``(w[B,C], sums)``; ``sums`` holds token sums for logging: ``rc_weight`` (``Σ w·m``),
      ``rc_masked`` (tokens with ``w = 0``) and ``rc_truncated`` (tokens whose ratio exceeded ``C``).

    Raises:
      ValueError: unknown mode or level, or a threshold ≤ 1 when a correction is on.
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(
            f"unknown rollout correction {mode!r}; choose one of {CORRECTION_MODES} (--config.grpo.rollout_correction)"
        )
    if mode == "none":
        w = jnp.ones_like(mask)
        zero = jnp.zeros((), mask.dtype)
        return w, {"rc_weight": mask.sum(), "rc_masked": zero, "rc_truncated": zero}
    if not threshold > 1.0:
        raise ValueError(
            f"rollout correction threshold must be > 1, got {threshold} (--config.grpo.rollout_correction_threshold)"
        )
    log_r = jax.lax.stop_gradient(log_ratios(trainer_logp, sampler_logp, mask, level))
    ratio = jnp.exp(log_r)
    over = (ratio > threshold).astype(mask.dtype) * mask
    if mode == "tis":
        w = jnp.minimum(ratio, threshold)
    else:
        w = ((ratio <= threshold) & (ratio >= 1.0 / threshold)).astype(mask.dtype)
    w = w * mask
    sums = {"rc_weight": w.sum(), "rc_masked": ((w == 0) * mask).sum(), "rc_truncated": over.sum()}
    return w, sums
