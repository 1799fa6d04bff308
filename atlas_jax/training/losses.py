"""SFT and GRPO losses as pure functions.

Every loss returns ``(loss_sum, denominator)`` rather than a mean, so that gradient accumulation over
micro-batches is exact: the step sums numerators and denominators separately and divides once.

Symbol legend (arrays are ``[B, C]``: B sequences, C completion positions):
  ``m_it``     completion mask, 1 for real completion tokens, 0 for padding.
  ``n_i``      ``Σ_t m_it``, the length of completion i.
  ``L``        a constant length (Dr. GRPO normalisation; normally the completion budget).
  ``logp_it``  log π_θ(y_it | x_i, y_i<t) at the sampling temperature (current policy).
  ``old_it``   log π_old, the policy that produced the rollout (stored before the first update).
  ``ref_it``   log π_ref, the reference policy.
  ``A_i``      advantage of sequence i (broadcast over its tokens).
  ``ρ_it``     ``exp(logp_it − old_it)``, the token-level importance ratio.
  ``s_i``      ``exp(Σ_t m_it (logp_it − old_it) / n_i)``, the sequence-level (GSPO) ratio.
  ``w_it``     a rollout-correction weight (``training/rollout_correction.py``), 1 when off.
  ``ε_l, ε_h`` lower / upper clip range; ``β`` the KL weight.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

Aggregation = Literal["seq_mean_token_mean", "token_mean", "constant_length"]
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "constant_length")
RatioLevel = Literal["token", "sequence"]
RATIO_LEVELS = ("token", "sequence")


def clipped_surrogate(
    logp: Float[Array, "B C"],
    old_logp: Float[Array, "B C"],
    advantages: Float[Array, " B"],
    epsilon_low: float,
    epsilon_high: float,
    *,
    level: RatioLevel = "token",
    mask: Float[Array, "B C"] | None = None,
) -> tuple[Float[Array, "B C"], Float[Array, "B C"]]:
    """PPO/GRPO clipped surrogate, per token, with a token- or sequence-level ratio.

    ``level="token"``: ``ℓ_it = −min(ρ_it·A_i, clip(ρ_it, 1−ε_l, 1+ε_h)·A_i)``.

    ``level="sequence"`` (GSPO, Zheng et al. 2025): the ratio is the length-normalised sequence
    likelihood ratio ``s_i`` (needs ``mask``), the same for every token of sequence i:
    ``ℓ_it = −min(s_i·A_i, clip(s_i, 1−ε_l, 1+ε_h)·A_i)``, so a sequence is clipped (or not) as a
    whole; ``∇s_i = s_i · Σ_t m_it ∇logp_it / n_i``. GSPO's clip ranges are ~1e3 times narrower than
    the token-level ones (the paper: ε_l = 3e-4, ε_h = 4e-4).

    A token is *clipped* when the clipped branch is the active one and differs from the unclipped one:
    ratio ``> 1+ε_h`` with ``A > 0``, or ``< 1−ε_l`` with ``A < 0`` (its gradient is then zero).

    Returns:
      ``(ℓ[B,C], clipped[B,C] as 0/1 floats)``.

    Raises:
      ValueError: an unknown ``level``, or ``level="sequence"`` without ``mask``.
    """
    adv = advantages[:, None]
    if level == "token":
        ratio = jnp.exp(logp - old_logp)
    elif level == "sequence":
        if mask is None:
            raise ValueError("sequence-level ratios need the completion mask")
        n = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        log_s = ((logp - old_logp) * mask).sum(axis=1, keepdims=True) / n
        ratio = jnp.broadcast_to(jnp.exp(log_s), logp.shape)
    else:
        raise ValueError(
            f"unknown ratio level {level!r}; choose one of {RATIO_LEVELS} (--config.grpo.ratio_level)"
        )
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    is_clipped = ((ratio > 1.0 + epsilon_high) & (adv > 0)) | ((ratio < 1.0 - epsilon_low) & (adv < 0))
    return -jnp.minimum(unclipped, clipped), is_clipped.astype(logp.dtype)


def k3_kl(logp: Float[Array, "B C"], ref_logp: Float[Array, "B C"]) -> Float[Array, "B C"]:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref), per token.

    ``k3_it = exp(ref_it − logp_it) − (ref_it − logp_it) − 1``; non-negative, unbiased under π_θ.
    """
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def aggregate(
    per_token: Float[Array, "B C"], mask: Float[Array, "B C"], mode: Aggregation, constant_length: int
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Reduces a per-token loss to ``(sum, denominator)``; the loss is ``sum / denominator``.

    - ``seq_mean_token_mean`` (GRPO): ``(Σ_i Σ_t ℓ_it m_it / n_i) / #{i: n_i > 0}``.
    - ``token_mean`` (BNPO/DAPO): ``Σ_it ℓ_it m_it / Σ_it m_it``.
    - ``constant_length`` (Dr. GRPO): ``(Σ_it ℓ_it m_it / L) / #{i: n_i > 0}``.

    Sequences with ``n_i = 0`` (batch padding) add nothing to either part.
    """
    masked = per_token * mask
    n = mask.sum(axis=1)
    num_seqs = (n > 0).sum().astype(per_token.dtype)
    if mode == "seq_mean_token_mean":
        return (masked.sum(axis=1) / jnp.maximum(n, 1.0)).sum(), num_seqs
    if mode == "token_mean":
        return masked.sum(), mask.sum()
    if mode == "constant_length":
        return masked.sum() / constant_length, num_seqs
    raise ValueError(
        f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS} (--config.grpo.loss_aggregation)"
    )


def grpo_loss(
    logp: Float[Array, "B C"],
    old_logp: Float[Array, "B C"],
    ref_logp: Float[Array, "B C"] | None,
    advantages: Float[Array, " B"],
    mask: Float[Array, "B C"],
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    aggregation: Aggregation,
    constant_length: int,
    ratio_level: RatioLevel = "token",
    weights: Float[Array, "B C"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""], dict[str, Float[Array, ""]]]:
    """GRPO objective: ``w_it·ℓ_it + β·k3_it`` aggregated with ``aggregation``.

    ``β = 0`` (or ``ref_logp is None``) drops the KL term; no reference log-probs are needed then.
    ``ratio_level`` picks the token- or sequence-level (GSPO) ratio of ``clipped_surrogate``.
    ``weights`` (constants, no gradient) scale the policy-gradient term per token: truncated importance
    weights or a 0/1 mask of the sampler/trainer mismatch correction; ``None`` = all ones. They do not
    change the denominators (a masked token still counts towards ``n_i``).

    Returns:
      ``(loss_sum, denominator, sums)`` where ``sums`` holds token sums for logging: ``clipped``,
      ``kl`` (0 when β = 0) and ``tokens`` (``Σ m``).
    """
    per_token, clipped = clipped_surrogate(
        logp, old_logp, advantages, epsilon_low, epsilon_high, level=ratio_level, mask=mask
    )
    if weights is not None:
        per_token = per_token * weights
    kl = jnp.zeros_like(per_token)
    if beta != 0.0 and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    loss_sum, denom = aggregate(per_token, mask, aggregation, constant_length)
    sums = {"clipped": (clipped * mask).sum(), "kl": (kl * mask).sum(), "tokens": mask.sum()}
    return loss_sum, denom, sums


def sft_loss(
    logp: Float[Array, "B T"], mask: Float[Array, "B T"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Completion-only cross-entropy: ``(−Σ_it logp_it m_it, Σ_it m_it)`` (token mean when divided)."""
    return -(logp * mask).sum(), mask.sum()
