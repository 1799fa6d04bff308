"""`KVCache`: the per-layer keys/values of a left-padded batch, written in place at a shared slot index."""

from __future__ import annotations

import jax
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
    Per layer, keys are ``[B, K, H, S]`` and values ``[B, K, S, H]`` (kv-head major), so each kv head's block is
    one contiguous matrix that a decode-attention product reads in place as its right-hand operand in the
    plain ``[contract, out]`` form (``q·K`` over ``H``, ``p·V`` over ``S``). With ``[B, S, K, H]`` XLA:CPU
    transposed every layer's whole cache at every decode step, and with keys ``[B, K, S, H]`` its ``q·Kᵀ``
    product was ~3.6x slower than the same-sized ``p·V`` one in the decode profile of the peer model.

    Storage dtype (`storage_dtype`): the compute dtype, except 16-bit compute on the CPU, where the cache is
    float32. XLA:CPU has no in-place bf16 ``dynamic-update-slice`` (it converts the whole buffer to f32 and
    back, or, updated as ``uint16`` bits, still copies the buffer in the fusion that feeds attention) and no
    bf16 x bf16 -> f32 product contracting the slot axis (values times probabilities); an f32 buffer is
    updated in place and read by f32 matmuls (with the layout above: bf16 decode 1.12x faster, median of a
    paired A/B on the benchmark model, `bench/rollout.py`), at twice the cache bytes (small next to the
    weights on a CPU).

    Attributes:
      k: keys (after RoPE), ``[L, B, K, H, S]`` or L x ``[B, K, H, S]``.
      v: values, ``[L, B, K, S, H]`` or L x ``[B, K, S, H]``.
      mask: ``[B, S]`` True where the slot holds a real (non-padding) token.
      index: int32 scalar, the next slot to write; a call with T tokens writes slots ``[index, index+T)``.
        Writing past ``S`` is not checked inside jit (``dynamic_update_slice`` would clamp): size the cache for
        prompt + generation.
    """

    k: Float[Array, "l b k h s"] | tuple[Float[Array, "b k h s"], ...]
    v: Float[Array, "l b k s h"] | tuple[Float[Array, "b k s h"], ...]
    mask: Bool[Array, "b s"]
    index: Int[Array, ""]

    @classmethod
    def init(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None
    ) -> KVCache:
        """An empty cache of ``max_len`` slots (dtype defaults to the compute dtype ``cfg.dtype``)."""
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        k_shape = (cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, max_len)
        return cls(
            k=jnp.zeros(k_shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
        )

    @staticmethod
    def storage_dtype(dtype: jnp.dtype | str, platform: str | None = None) -> jnp.dtype:
        """The dtype to store a cache in for compute ``dtype`` on ``platform`` (default: the default backend):
        float32 for 16-bit compute on the CPU (see the class docstring), else ``dtype`` itself."""
        dtype = jnp.dtype(dtype)
        platform = platform or jax.default_backend()
        if platform == "cpu" and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
            return jnp.dtype(jnp.float32)
        return dtype

    @property
    def per_layer(self) -> bool:
        """``k``/``v`` are tuples of per-layer buffers."""
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def split_layers(self) -> KVCache:
        """The same cache in the per-layer layout (a no-op if it already is)."""
        if self.per_layer:
            return self
        return self.replace(k=tuple(self.k), v=tuple(self.v))

    def sharding_axes(self) -> KVCache:
        """Logical axis names of each field (for `sharding.spec_for`)."""
        k_one = ("batch", "kv_heads", "head_dim", "length")
        v_one = ("batch", "kv_heads", "length", "head_dim")
        k_axes = tuple(k_one for _ in self.k) if self.per_layer else (None, *k_one)
        v_axes = tuple(v_one for _ in self.v) if self.per_layer else (None, *v_one)
        return KVCache(  # type: ignore[arg-type]
            k=k_axes,
            v=v_axes,
            mask=("batch", "length"),
            index=(),
        )
