"""`KVCache`: the per-layer keys/values of a left-padded batch, written in place at a shared slot index."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from atlas_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys/values for every layer; a pytree, so it passes through ``jax.jit`` (donate it to update in place).

    Two layouts of ``k``/``v``: *stacked* arrays with a leading ``[L]`` axis (the layers run under ``lax.scan``),
    or *per-layer* tuples of L arrays (`split_layers`; the layers are unrolled, each updating its own buffer).
    XLA:CPU copies the whole stacked cache (in bf16 through an f32 round trip) when one layer writes its slice,
    at every layer of every decode step, but updates a per-layer buffer in place: the JAX sampler decodes with
    the per-layer layout (~1.5x faster on the benchmark model, `bench/rollout.py`).
    Keys are ``[B, K, S, H]`` and values ``[B, K, H, S]`` per layer (kv-head major, values transposed), so
    both decode-attention products contract each head's block along its last axis and XLA:CPU reads the
    cache in place: with ``[B, S, K, H]`` for both it transposed (and for values, upcast to f32) every
    layer's whole cache at every decode step.

    Attributes:
      k: keys (after RoPE), ``[L, B, K, S, H]`` or L x ``[B, K, S, H]``.
      v: values, ``[L, B, K, H, S]`` or L x ``[B, K, H, S]``.
      mask: ``[B, S]`` True where the slot holds a real (non-padding) token.
      index: int32 scalar, the next slot to write; a call with T tokens writes slots ``[index, index+T)``.
        Writing past ``S`` is not checked inside jit (``dynamic_update_slice`` would clamp): size the cache for
        prompt + generation.
    """

    k: Float[Array, "l b s k h"] | tuple[Float[Array, "b s k h"], ...]
    v: Float[Array, "l b s k h"] | tuple[Float[Array, "b s k h"], ...]
    mask: Bool[Array, "b s"]
    index: Int[Array, ""]

    @classmethod
    def init(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache of ``max_len`` slots (dtype defaults to the compute dtype ``cfg.dtype``)."""
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        lbk = (cfg.num_layers, batch, cfg.num_kv_heads)
        return cls(
            k=jnp.zeros((*lbk, max_len, cfg.head_dim), dtype),
            v=jnp.zeros((*lbk, cfg.head_dim, max_len), dtype),
            mask=jnp.zeros((batch, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def per_layer(self) -> bool:
        """``k``/``v`` are tuples of per-layer buffers."""
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.per_layer else self.k.shape[3]

    def split_layers(self) -> KVCache:
        """The same cache in the per-layer layout (a no-op if it already is)."""
        if self.per_layer:
            return self
        return self.replace(k=tuple(self.k), v=tuple(self.v))

    def sharding_axes(self) -> KVCache:
        """Logical axis names of each field (for `sharding.spec_for`)."""
        k1, v1 = ("batch", "kv_heads", "length", "head_dim"), ("batch", "kv_heads", "head_dim", "length")
        k_axes = tuple(k1 for _ in self.k) if self.per_layer else (None, *k1)
        v_axes = tuple(v1 for _ in self.v) if self.per_layer else (None, *v1)
        return KVCache(  # type: ignore[arg-type]
            k=k_axes,
            v=v_axes,
            mask=("batch", "length"),
            index=(),
        )
