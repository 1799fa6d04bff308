"""Sampling strategies: pure functions of logits and uniform random numbers.

Each strategy is a small frozen (hashable) dataclass with one method, so a combination is a static
argument of a jitted decode step. Everything works on *unnormalised probability weights*
``w = exp(x - max x)`` of the temperature-scaled logits ``x``, computed once per step and shared
by the log-probability (``log p = x - max x - log Σ w``) and the draw, so the full-vocabulary
softmax is never computed twice.

A draw is an inverse-CDF lookup: with ``u ~ U[0, 1)`` the sampled token is the first index ``i``
with ``cumsum(w)_i > u · Σ w``. Only tokens with positive weight can be drawn, which is how
top-k / top-p truncation (weights set to 0) can never leak a token outside the allowed set. On
CPU a flat ``cumsum`` over 32k entries is ~20x slower than a two-level one (block sums, then one
block), so ``draw`` uses blocks for large candidate sets.

Shape suffixes: ``B`` batch rows, ``V`` vocabulary, ``C`` candidates (``V`` or ``k``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_BLOCK = 128  # two-level cumsum block size; larger candidate sets use blocks.


class Candidates(NamedTuple):
    """Tokens still allowed, with their unnormalised probability weights.

    Attributes:
      weights: ``w[b, c] >= 0``; 0 means "not allowed".
      ids: vocabulary id of candidate ``c`` (``None``: the identity, ``C == V``).
    """

    weights: Float[Array, "B C"]
    ids: Int[Array, "B C"] | None


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Divides logits by ``value`` (> 0): ``x = logits / T``."""

    value: float

    def apply(self, logits: Float[Array, "B V"]) -> Float[Array, "B V"]:
        return logits if self.value == 1.0 else logits / jnp.float32(self.value)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Keeps the ``k`` highest-weight candidates (ties broken by lower index)."""

    k: int

    def apply(self, cands: Candidates) -> Candidates:
        k = min(self.k, cands.weights.shape[-1])
        weights_BxK, idx_BxK = jax.lax.top_k(cands.weights, k)
        ids = idx_BxK if cands.ids is None else jnp.take_along_axis(cands.ids, idx_BxK, axis=-1)
        return Candidates(weights_BxK, ids)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus: keeps the most probable tokens whose mass first reaches ``p``.

    A token with probability ``q`` is kept iff the mass of tokens strictly more probable than it is
    ``< p`` (equivalently: keep ``w >= τ`` with ``τ`` the largest threshold whose kept mass is
    ``>= p · Σ w``; tokens tied with the boundary token are all kept). The threshold comes from the
    ``fast_k`` largest weights when they already hold mass ``p`` for every row (the usual case for a
    trained model, one cheap ``top_k``); otherwise from an exact bisection over the float bit
    patterns of the weights (31 masked sums over the vocabulary, no full sort: a 32k-wide sort is
    ~100x slower than a top-k on CPU).
    """

    p: float
    fast_k: int = 64

    def apply(self, cands: Candidates) -> Candidates:
        w_BxC = cands.weights
        target_Bx1 = jnp.float32(self.p) * jnp.sum(w_BxC, axis=-1, keepdims=True)
        k = min(self.fast_k, w_BxC.shape[-1])
        top_BxK, _ = jax.lax.top_k(w_BxC, k)
        exclusive_BxK = jnp.cumsum(top_BxK, axis=-1) - top_BxK
        n_keep_Bx1 = jnp.sum(exclusive_BxK < target_Bx1, axis=-1, keepdims=True)
        tau_fast_Bx1 = jnp.take_along_axis(top_BxK, n_keep_Bx1 - 1, axis=-1)
        if k == w_BxC.shape[-1]:
            tau_Bx1 = tau_fast_Bx1
        else:
            covered = jnp.all(jnp.sum(top_BxK, axis=-1, keepdims=True) >= target_Bx1)
            tau_Bx1 = jax.lax.cond(
                covered, lambda: tau_fast_Bx1, lambda: nucleus_threshold(w_BxC, target_Bx1)
            )
        return Candidates(jnp.where(w_BxC >= tau_Bx1, w_BxC, 0.0), cands.ids)


def nucleus_threshold(w_BxC: Float[Array, "B C"], target_Bx1: Float[Array, "B 1"]) -> Float[Array, "B 1"]:
    """Largest ``τ`` with ``Σ_{w >= τ} w >= target`` (exact; ``w >= 0``, ``0 < target <= Σ w``).

    Bisection on the int32 bit patterns of non-negative floats, which are ordered like the floats.
    Invariant: ``mass(bits=lo) >= target > mass(bits=hi)``; 31 halvings of ``[0, 2^31)`` reach
    ``hi = lo + 1``, so ``lo`` is the answer among representable floats.
    """

    def mass_ok(bits_Bx1):
        tau = jax.lax.bitcast_convert_type(bits_Bx1, jnp.float32)
        return jnp.sum(jnp.where(w_BxC >= tau, w_BxC, 0.0), axis=-1, keepdims=True) >= target_Bx1

    max_bits = jax.lax.bitcast_convert_type(jnp.max(w_BxC, axis=-1, keepdims=True), jnp.int32)

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = mass_ok(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.zeros_like(max_bits), max_bits + 1))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _last_positive(w_BxC: Float[Array, "B C"]) -> Int[Array, " B"]:
    """Index of the last positive entry per row (0 if none)."""
    idx = jnp.arange(w_BxC.shape[-1], dtype=jnp.int32)
    return jnp.maximum(jnp.max(jnp.where(w_BxC > 0, idx, -1), axis=-1), 0)


def _inverse_cdf(w_BxC: Float[Array, "B C"], thr_B: Float[Array, " B"]) -> Int[Array, " B"]:
    """First index with ``cumsum(w) > thr``, clamped to the last positive weight (rounding)."""
    cdf_BxC = jnp.cumsum(w_BxC, axis=-1)
    idx_B = jnp.sum(cdf_BxC <= thr_B[:, None], axis=-1, dtype=jnp.int32)
    return jnp.minimum(idx_B, _last_positive(w_BxC))


def draw(cands: Candidates, u_B: Float[Array, " B"]) -> Int[Array, " B"]:
    """Samples one token per row: the first ``c`` with ``Σ_{c' <= c} w_c' > u · Σ w`` (inverse CDF).

    Args:
      cands: candidate weights (at least one positive per row) and ids.
      u_B: uniforms in ``[0, 1)``.

    Returns:
      Vocabulary ids; only candidates with positive weight are ever returned.
    """
    w_BxC = cands.weights
    b, c = w_BxC.shape
    if c <= 4 * _BLOCK:
        idx_B = _inverse_cdf(w_BxC, u_B * jnp.sum(w_BxC, axis=-1))
    else:
        nb = -(-c // _BLOCK)
        blocks_BxNxK = jnp.pad(w_BxC, ((0, 0), (0, nb * _BLOCK - c))).reshape(b, nb, _BLOCK)
        block_mass_BxN = jnp.sum(blocks_BxNxK, axis=-1)
        block_cdf_BxN = jnp.cumsum(block_mass_BxN, axis=-1)
        thr_B = u_B * block_cdf_BxN[:, -1]
        blk_B = jnp.sum(block_cdf_BxN <= thr_B[:, None], axis=-1, dtype=jnp.int32)
        blk_B = jnp.minimum(blk_B, _last_positive(block_mass_BxN))
        before_B = jnp.where(
            blk_B > 0, jnp.take_along_axis(block_cdf_BxN, jnp.maximum(blk_B - 1, 0)[:, None], -1)[:, 0], 0.0
        )
        inner_BxK = jnp.take_along_axis(blocks_BxNxK, blk_B[:, None, None], axis=1)[:, 0]
        idx_B = blk_B * _BLOCK + _inverse_cdf(inner_BxK, thr_B - before_B)
    if cands.ids is None:
        return idx_B
    return jnp.take_along_axis(cands.ids, idx_B[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A full sampling recipe: greedy (``temperature is None``) or temperature + optional truncation.

    ``sample`` returns the token and its log-probability under the engine convention
    (``log softmax(logits / T)[token]`` before truncation, ``T = 1`` for greedy).
    """

    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None

    @classmethod
    def from_params(cls, temperature: float, top_p: float, top_k: int) -> Strategy:
        """Builds the strategy for ``SamplingParams``-style values (top_p 1 / top_k 0 disable)."""
        if temperature == 0.0:
            return cls()
        return cls(
            temperature=Temperature(float(temperature)),
            top_k=TopK(int(top_k)) if top_k > 0 else None,
            top_p=TopP(float(top_p)) if top_p < 1.0 else None,
        )

    def sample(
        self, logits_BxV: Float[Array, "B V"], u_B: Float[Array, " B"]
    ) -> tuple[Int[Array, " B"], Float[Array, " B"]]:
        x_BxV = logits_BxV.astype(jnp.float32)
        if self.temperature is not None:
            x_BxV = self.temperature.apply(x_BxV)
        max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
        w_BxV = jnp.exp(x_BxV - max_Bx1)
        log_z_B = max_Bx1[:, 0] + jnp.log(jnp.sum(w_BxV, axis=-1))
        if self.temperature is None:
            # First index attaining the max (same tie rule as argmax), via the shared max.
            v = x_BxV.shape[-1]
            idx = jnp.arange(v, dtype=jnp.int32)
            tokens_B = jnp.min(jnp.where(x_BxV == max_Bx1, idx, v), axis=-1)
        else:
            cands = Candidates(w_BxV, None)
            if self.top_k is not None:
                cands = self.top_k.apply(cands)
            if self.top_p is not None:
                cands = self.top_p.apply(cands)
            tokens_B = draw(cands, u_B)
        logprobs_B = jnp.take_along_axis(x_BxV, tokens_B[:, None], axis=-1)[:, 0] - log_z_B
        return tokens_B, logprobs_B
