"""Decoder building blocks: RMSNorm, RoPE (incl. llama3 scaling), SwiGLU MLP, grouped-query attention.

Shapes use suffixes: B batch, T query length, S key/cache length, D model dim, N query heads, K kv heads,
G = N // K heads per kv head, H head dim, F MLP dim. Kernels are stored in einsum layout (docs/internals.md).
Matmuls run in the compute dtype with float32 accumulation (`preferred_element_type`), because on CPU a plain
bf16 -> bf16 matmul is slower than fp32; softmax and norms always run in float32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from atlas_jax.kernels import amx_matmul, cpu_matmul
from atlas_jax.models import attention
from atlas_jax.models.config import ModelConfig, RopeScaling
from atlas_jax.models.sharding import param

_init_kernel = nnx.initializers.normal(stddev=0.02)


def einsum(spec: str, a: Array, b: Array, dtype: jnp.dtype, out_dtype: jnp.dtype | None = None) -> Array:
    """``einsum(spec, a, b)`` with both operands cast to ``dtype``, accumulated in f32, result cast to
    ``out_dtype`` (default ``dtype``; float32 for the logits).

    The backward pass is the same kind of product: ``∂a = einsum(out,b->a)(ct, b)`` and ``∂b = einsum(a,out->b)
    (a, ct)`` with the cotangent ``ct`` in ``dtype`` and f32 accumulation, each cast to its operand's dtype.
    (JAX's own transpose of an f32-accumulating product keeps ``ct`` in f32, so with a bf16 ``dtype`` every
    backward matmul ran in f32: on XLA:CPU 2-3x slower than the bf16 forward, most of a GRPO update.)

    A `cpu_matmul.PackedWeight` ``b`` (the sampler's rollout copy on an AVX-512 CPU) goes to the packed
    kernel instead (forward only); ``spec`` must then contract ``a``'s trailing axes with ``b``'s leading ones.
    """
    out = jnp.dtype(out_dtype or dtype)
    if isinstance(b, cpu_matmul.PackedWeight):
        return _packed_einsum(spec, a, b).astype(out)
    return _mixed_einsum(spec, jnp.dtype(dtype), jnp.dtype(a.dtype), jnp.dtype(b.dtype), out)(a, b)


def _packed_einsum(spec: str, a: Array, b: cpu_matmul.PackedWeight) -> Array:
    """`cpu_matmul.matmul` for a ``spec`` of the form ``lead+con, con+rest -> lead+rest``; else ValueError."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    c = b.contract
    if len(sb) != len(b.shape) or sa[len(sa) - c :] != sb[:c] or out != sa[: len(sa) - c] + sb[c:]:
        raise ValueError(
            f"einsum {spec!r}: a packed weight needs 'lead+con,con+rest->lead+rest' (contract={c})"
        )
    return cpu_matmul.matmul(a, b)


def _dot(spec: str, x: Array, y: Array, out_dtype: jnp.dtype) -> Array:
    """``einsum(spec, x, y)`` accumulated in f32, returned in ``out_dtype``: on the AMX kernel where
    `amx_matmul.enabled` and it takes the product (bf16 operands, no batch axes, >= 64 rows), else XLA's dot."""
    if x.dtype == y.dtype == jnp.bfloat16 and out_dtype in _KERNEL_OUT and amx_matmul.enabled():
        out = amx_matmul.einsum(spec, x, y, out_dtype)
        if out is not None:
            return out
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32).astype(out_dtype)


_KERNEL_OUT = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def _mixed_einsum(spec: str, dtype: jnp.dtype, a_dtype: jnp.dtype, b_dtype: jnp.dtype, out_dtype: jnp.dtype):
    """``f(a, b)`` of `einsum` for one spec and dtypes, with the backward pass above as its custom VJP."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    if not (set(sa) <= set(out) | set(sb) and set(sb) <= set(out) | set(sa)):
        return lambda a, b: _dot(spec, a.astype(dtype), b.astype(dtype), out_dtype)  # no einsum transpose

    @jax.custom_vjp
    def f(a, b):
        return _dot(spec, a.astype(dtype), b.astype(dtype), out_dtype)

    def fwd(a, b):
        a, b = a.astype(dtype), b.astype(dtype)
        return _dot(spec, a, b, out_dtype), (a, b)

    def bwd(res, ct):
        a, b = res
        ct = ct.astype(dtype)
        return _dot(f"{out},{sb}->{sa}", ct, b, a_dtype), _dot(f"{sa},{out}->{sb}", a, ct, b_dtype)

    f.defvjp(fwd, bwd)
    return f


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x², last axis) + eps) · scale, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = param(nnx.initializers.ones, None, (dim,), param_dtype, ("norm",))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies ω_i = θ^(-2i/H), i < H/2, in float32; llama3 scaling as in Llama 3.1.

    llama3: with wavelength λ_i = 2π/ω_i, L0 = original_max_position_embeddings, factor s, low/high factors a/b:
    λ_i > L0/a -> ω_i / s;  λ_i < L0/b -> ω_i;  otherwise (1-μ)·ω_i/s + μ·ω_i with μ = (L0/λ_i - a)/(b - a).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type={scaling.rope_type!r} is not supported")
    s, a, b = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / a, old_len / b
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s, inv_freq)
    mu = (old_len / wavelen - a) / (b - a)
    smoothed = (1 - mu) * scaled / s + mu * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    positions: Int[Array, "b t"], inv_freq: np.ndarray
) -> tuple[Float[Array, "b t h"], Float[Array, "b t h"]]:
    """cos/sin tables (float32) for angles p·ω, duplicated over both halves (transformers' rotate_half layout).

    Computed once per forward on the half width and materialised (``optimization_barrier``): left to itself
    XLA:CPU fuses the (scalar libm) cos/sin into every layer's RoPE fusion, 2 x layers recomputations of the
    full width per pass (0.2-0.4 CPU-s of a GRPO update of the 8-layer bench model).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jax.lax.optimization_barrier((jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)))


def apply_rope(
    x: Float[Array, "b t n h"], cos: Float[Array, "b t h"], sin: Float[Array, "b t h"]
) -> Float[Array, "b t n h"]:
    """x·cos + rotate_half(x)·sin, rotate_half([x1, x2]) = [-x2, x1] (halves of the head dim); f32 maths."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x·W_gate) ⊙ (x·W_up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = _Kernel(rngs, (d, f), pd, ("embed", "mlp"))
        self.up_proj = _Kernel(rngs, (d, f), pd, ("embed", "mlp"))
        self.down_proj = _Kernel(rngs, (f, d), pd, ("mlp", "embed"))

    def __call__(self, x_btd: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        gate_btf = einsum("btd,df->btf", x_btd, self.gate_proj.kernel.get_value(), self.dtype)
        up_btf = einsum("btd,df->btf", x_btd, self.up_proj.kernel.get_value(), self.dtype)
        h_btf = (jax.nn.silu(gate_btf.astype(jnp.float32)) * up_btf.astype(jnp.float32)).astype(self.dtype)
        return einsum("btf,fd->btd", h_btf, self.down_proj.kernel.get_value(), self.dtype)


class _Kernel(nnx.Module):
    """A projection holding ``kernel`` (and optionally ``bias``) so parameter paths read ``.../q_proj/kernel``."""

    def __init__(self, rngs: nnx.Rngs, shape, param_dtype, axes, bias_shape=None, bias_axes=None):
        self.kernel = param(_init_kernel, rngs.params(), shape, param_dtype, axes)
        if bias_shape is not None:
            self.bias = param(nnx.initializers.zeros, None, bias_shape, param_dtype, bias_axes)


class Attention(nnx.Module):
    """Grouped-query self-attention with optional q/k/v bias and q/k RMSNorm, optionally writing into a KV cache.

    Without a cache the T tokens attend causally to each other within equal segment ids (`attention`). With a
    cache, their keys/values are written into layer ``layer`` of the stacked buffers (`KVCache` layout) at slots
    [index, index+T) (in place under jit); a prefill of an empty cache attends over the new tokens only, any
    other call over the filled cache slots (``slot_mask`` already includes the new tokens).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.impl = cfg.attention
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        qb = (n, h) if cfg.qkv_bias else None
        kb = (k, h) if cfg.qkv_bias else None
        self.q_proj = _Kernel(rngs, (d, n, h), pd, ("embed", "heads", "head_dim"), qb, ("heads", "head_dim"))
        self.k_proj = _Kernel(
            rngs, (d, k, h), pd, ("embed", "kv_heads", "head_dim"), kb, ("kv_heads", "head_dim")
        )
        self.v_proj = _Kernel(
            rngs, (d, k, h), pd, ("embed", "kv_heads", "head_dim"), kb, ("kv_heads", "head_dim")
        )
        self.o_proj = _Kernel(rngs, (n, h, d), pd, ("heads", "head_dim", "embed"))
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)

    def _project(self, x_btd, proj: _Kernel):
        out = einsum("btd,dkh->btkh", x_btd, proj.kernel.get_value(), self.dtype)
        if hasattr(proj, "bias"):
            out = out + proj.bias.get_value().astype(self.dtype)
        return out

    def __call__(
        self,
        x_btd: Float[Array, "b t d"],
        cos: Float[Array, "b t h"],
        sin: Float[Array, "b t h"],
        ctx: AttentionContext,
        kv: tuple[Array, Array] | None = None,
        layer: Int[Array, ""] | int | None = 0,
    ) -> tuple[Float[Array, "b t d"], tuple[Array, Array] | None]:
        """Returns ``(output [B,T,D], kv)``; ``kv`` = the ``(k, v)`` cache buffers, updated (or None): stacked
        (`KVCache` layout) with ``layer`` its index, or this layer's own buffers with ``layer=None``."""
        q_btnh = self._project(x_btd, self.q_proj)
        k_btkh = self._project(x_btd, self.k_proj)
        v_btkh = self._project(x_btd, self.v_proj)
        if self.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh, k_btkh = apply_rope(q_btnh, cos, sin), apply_rope(k_btkh, cos, sin)
        kw = {"impl": self.impl, "dtype": self.dtype}
        if kv is not None:
            k_all, v_all = kv
            zero = jnp.zeros((), jnp.int32)
            k_new, v_new = k_btkh.transpose(0, 2, 3, 1), v_btkh.transpose(0, 2, 1, 3)  # [B,K,H,T], [B,K,T,H]
            index = ctx.index.astype(jnp.int32)
            k_start, v_start = (zero, zero, zero, index), (zero, zero, index, zero)
            if layer is not None:  # stacked buffers: write layer ``layer``'s slice
                layer_i = jnp.asarray(layer, jnp.int32)
                k_start, v_start = (layer_i, *k_start), (layer_i, *v_start)
                k_new, v_new = k_new[None], v_new[None]
            k_all, v_all = write_slots(k_all, k_new, k_start), write_slots(v_all, v_new, v_start)
            kv = (k_all, v_all)
        if kv is None or ctx.prefill:
            out_btnh = attention.self_attention(q_btnh, k_btkh, v_btkh, ctx.segment_bt, **kw)
        elif layer is None:
            out_btnh = attention.cached_attention(q_btnh, kv[0], kv[1], ctx.slot_mask_bs, ctx.index, **kw)
        else:
            k_bkhs = jax.lax.dynamic_index_in_dim(kv[0], layer, axis=0, keepdims=False)
            v_bksh = jax.lax.dynamic_index_in_dim(kv[1], layer, axis=0, keepdims=False)
            out_btnh = attention.cached_attention(q_btnh, k_bkhs, v_bksh, ctx.slot_mask_bs, ctx.index, **kw)
        return einsum("btnh,nhd->btd", out_btnh, self.o_proj.kernel.get_value(), self.dtype), kv


def write_slots(buf: Array, new: Array, start: tuple[Array, ...]) -> Array:
    """``dynamic_update_slice(buf, new, start)`` in ``buf``'s dtype, in place under jit for 16-bit floats too.

    XLA:CPU has no bf16 ``dynamic-update-slice``: it rewrites one as convert-to-f32, update, convert back,
    which copies the whole cache buffer at every layer of every decode step. The same bits updated as
    ``uint16`` (a free bitcast either way) stay in place, unless the bitcast back fuses into a consumer that
    then writes a fresh buffer; the sampler avoids both by storing a float32 cache on the CPU
    (`KVCache.storage_dtype`).
    """
    new = new.astype(buf.dtype)
    if buf.dtype.itemsize != 2 or not jnp.issubdtype(buf.dtype, jnp.floating):
        return jax.lax.dynamic_update_slice(buf, new, start)
    bits = jax.lax.dynamic_update_slice(
        jax.lax.bitcast_convert_type(buf, jnp.uint16), jax.lax.bitcast_convert_type(new, jnp.uint16), start
    )
    return jax.lax.bitcast_convert_type(bits, buf.dtype)


class AttentionContext(NamedTuple):
    """What every layer's attention needs besides its inputs (shared by all layers of one call).

    Attributes:
      segment_bt: ``[B,T]`` segment id of each new token (`attention.PAD_SEGMENT` for padding).
      slot_mask_bs: ``[B,S]`` cache slots holding a real token, new ones included (None without a cache).
      index: int32 scalar, the cache slot of the first new token (0 without a cache).
      prefill: static; the cache is empty (index 0), so the new tokens attend over themselves only.
    """

    segment_bt: Array
    slot_mask_bs: Array | None
    index: Array
    prefill: bool
