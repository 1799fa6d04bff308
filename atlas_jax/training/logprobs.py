"""Per-token log-probabilities of given tokens, computed in sequence chunks with rematerialisation.

The decoder's final hidden states ``h[B,S,D]`` are cheap; the logits ``[B,S,V]`` are not (V ~ 150k).
``chunked_logprobs`` scans over chunks of ``chunk`` positions, computing each chunk's logits, its
log-softmax and the target log-prob inside ``jax.checkpoint``: the backward pass recomputes one chunk's
logits at a time, so peak logits memory is ``[B, chunk, V]`` regardless of S.

Sequence layouts (built by ``training/batching.py``):
  - GRPO: ``tokens = [left-padded prompt (P) | right-padded completion (C)]``; the completion token at
    ``P + c`` is predicted by the hidden state at ``P + c − 1``.
  - SFT: ``tokens[B,T]`` with a loss mask; token ``t`` is predicted by position ``t − 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

Unembed = Callable[[Array], Array]


def chunked_logprobs(
    unembed: Unembed,
    hidden: Float[Array, "B S D"],
    targets: Int[Array, "B S"],
    *,
    temperature: float = 1.0,
    chunk: int = 128,
    with_entropy: bool = False,
) -> tuple[Float[Array, "B S"], Float[Array, "B S"] | None]:
    """``logp[b,s] = log softmax(unembed(h[b,s]) / τ)[targets[b,s]]``, chunk by chunk.

    Args:
      unembed: hidden ``[B,c,D]`` → logits ``[B,c,V]`` (float32).
      hidden: final hidden states of the positions that *predict* ``targets``.
      targets: the token predicted at each position.
      temperature: τ, the sampling temperature (τ ≤ 0 is treated as 1, the greedy convention).
      chunk: positions per chunk (S is padded up to a multiple; padding is sliced off).
      with_entropy: also return the entropy of each position's distribution.

    Returns:
      ``(logp[B,S] float32, entropy[B,S] or None)``.
    """
    b, s, d = hidden.shape
    tau = temperature if temperature > 0 else 1.0
    chunk = max(1, min(chunk, s))
    n = -(-s // chunk)
    pad = n * chunk - s
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_c, y_c):
        logits = unembed(h_c).astype(jnp.float32) / tau
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        if not with_entropy:
            return picked - logz, jnp.zeros_like(logz)
        probs = jax.nn.softmax(logits, axis=-1)
        return picked - logz, logz - (probs * logits).sum(-1)

    def body(carry, xs):
        return carry, one_chunk(*xs)

    _, (lp, ent) = jax.lax.scan(body, None, (h, y))
    lp = lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]
    ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :s] if with_entropy else None
    return lp, ent


def completion_logprobs(
    model,
    tokens: Int[Array, "B T"],
    attention_mask: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    prompt_len: int,
    *,
    temperature: float,
    chunk: int,
    with_entropy: bool = False,
) -> tuple[Float[Array, "B C"], Float[Array, "B C"] | None]:
    """Log-probs of the completion tokens ``tokens[:, P:]`` given everything before them.

    Args:
      model: a ``Decoder`` (``hidden_states`` + ``unembed``).
      tokens: ``[left-padded prompt (P = prompt_len) | right-padded completion (C)]``.
      attention_mask: 1 on real tokens.
      positions: position ids of real tokens (counting from 0 at the first real prompt token).
      prompt_len: P (static).
      temperature, chunk, with_entropy: see ``chunked_logprobs``.
    """
    hidden, _ = model.hidden_states(tokens, positions, attention_mask)
    h = hidden[:, prompt_len - 1 : -1]
    return chunked_logprobs(
        model.unembed,
        h,
        tokens[:, prompt_len:],
        temperature=temperature,
        chunk=chunk,
        with_entropy=with_entropy,
    )


def sequence_logprobs(
    model,
    tokens: Int[Array, "B T"],
    attention_mask: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    *,
    chunk: int,
    segment_ids: Int[Array, "B T"] | None = None,
) -> Float[Array, "B T"]:
    """SFT: ``out[:, t] = log p(tokens[:, t] | tokens[:, :t])`` for t ≥ 1; ``out[:, 0] = 0``."""
    if segment_ids is None:
        hidden, _ = model.hidden_states(tokens, positions, attention_mask)
    else:
        hidden, _ = model.hidden_states(tokens, positions, attention_mask, segment_ids=segment_ids)
    lp, _ = chunked_logprobs(model.unembed, hidden[:, :-1], tokens[:, 1:], chunk=chunk)
    return jnp.pad(lp, ((0, 0), (1, 0)))
