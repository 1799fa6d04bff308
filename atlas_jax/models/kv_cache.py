"""`KVCache`: the per-layer keys/values of a left-padded batch, written in place at a shared slot index."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from atlas_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys/values for every layer; a pytree, so it passes through ``jax.jit`` (donate it to update in place).

    Attributes:
      k, v: ``[L, B, S, K, H]`` keys (after RoPE) and values.
      mask: ``[B, S]`` True where the slot holds a real (non-padding) token.
      index: int32 scalar, the next slot to write; a call with T tokens writes slots ``[index, index+T)``.
        Writing past ``S`` is not checked inside jit (``dynamic_update_slice`` would clamp): size the cache for
        prompt + generation.
    """

    k: Float[Array, "l b s k h"]
    v: Float[Array, "l b s k h"]
    mask: Bool[Array, "b s"]
    index: Int[Array, ""]

    @classmethod
    def init(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache of ``max_len`` slots (dtype defaults to the compute dtype ``cfg.dtype``)."""
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def sharding_axes(self) -> KVCache:
        """Logical axis names of each field (for `sharding.spec_for`)."""
        return KVCache(  # type: ignore[arg-type]
            k=(None, "batch", "length", "kv_heads", "head_dim"),
            v=(None, "batch", "length", "kv_heads", "head_dim"),
            mask=("batch", "length"),
            index=(),
        )
