"""Attention kernels behind two functions: causal self-attention over the new tokens, and attention over a cache.

``self_attention`` (training, scoring, prefill): query t attends to key s iff s <= t and both carry the same
segment id (packed rows: 1, 2, … per example; left/right padding: -1, so real tokens never see pads and a pad
query sees only pads, which keeps every softmax row non-empty). ``cached_attention`` (one-token decode): the query
at cache slot ``index + t`` attends to the filled slots s <= index + t that hold a real token.

Implementations (``impl``; `config.ATTENTION_IMPLS`):
  - "dense": the reference einsum path: f32 logits ``[B,K,G,T,S]``, masked with a finite -inf, f32 softmax.
  - "xla": ``jax.nn.dot_product_attention(implementation="xla")`` (same maths; XLA fuses it).
  - "cudnn": ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention (GPU, 16-bit compute);
    causal in the kernel, the segment/padding mask passed as a boolean mask (cuDNN turns it into a bias).
  - "splash": Pallas splash attention (TPU; ``jax.experimental.pallas.ops.tpu``) with ``SegmentIds`` and a causal
    mask; T is padded to a multiple of 128 with segment -2 (seen by nothing real). Under a mesh it runs in a
    ``shard_map`` over batch and kv heads (a Pallas call cannot be partitioned automatically).
  - "auto": splash on TPU, cuDNN on GPU with a 16-bit compute dtype, XLA otherwise; on a single-device CPU with
    AVX-512 (bf16 or f32 compute, head dim % 16 == 0) the fused kernel of `cpu_attention` (forward and backward,
    ``ATLAS_JAX_CPU_ATTENTION``). Decode (``cached_attention``) uses XLA for every fused choice (one query
    token; the kernels are for long queries), and `cpu_attention`'s decode kernel on a single CPU device.
All paths take q/k/v in the compute dtype and accumulate logits and softmax in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from atlas_jax.kernels import cpu_attention
from atlas_jax.models.sharding import spec_for

NEG_INF = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully-masked rows (pads) stay NaN-free
PAD_SEGMENT = -1  # segment id of padding positions (see module docstring)
_SPLASH_BLOCK = 128  # splash needs T a multiple of its block sizes; we pad to this and use up to 512


def resolve(impl: str, dtype: jnp.dtype, platform: str | None = None) -> str:
    """The implementation ``impl`` means on ``platform`` (default: the default backend) for ``dtype``."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _dense(q_btnh, k_bskh, v_bskh, allowed_bts, dtype) -> Float[Array, "b t n h"]:
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q_btkgh.astype(dtype), k_bskh.astype(dtype), preferred_element_type=jnp.float32
    ) * (h**-0.5)
    logits = jnp.where(allowed_bts[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs.astype(dtype), v_bskh.astype(dtype), preferred_element_type=jnp.float32
    )
    return out.astype(dtype).reshape(b, t, n, h)


def _nn_attention(q, k, v, mask_bts, dtype, implementation, is_causal=False):
    out = jax.nn.dot_product_attention(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        mask=mask_bts[:, None, :, :],
        is_causal=is_causal,
        implementation=implementation,
    )
    return out.astype(dtype)


def self_attention(
    q_btnh: Float[Array, "b t n h"],
    k_btkh: Float[Array, "b t k h"],
    v_btkh: Float[Array, "b t k h"],
    segment_bt: Int[Array, "b t"],
    *,
    impl: str,
    dtype: jnp.dtype,
) -> Float[Array, "b t n h"]:
    """Causal attention of T queries over the same T keys within equal segment ids; ``[B,T,N,H]`` in ``dtype``."""
    fused_cpu = impl == "auto" and cpu_attention.self_attention_enabled(q_btnh.shape[-1], dtype)
    impl = resolve(impl, dtype)
    t = q_btnh.shape[1]
    if fused_cpu and impl == "xla":  # single-device CPU: the fused kernel (forward and backward)
        q, k, v = (x.astype(dtype) for x in (q_btnh, k_btkh, v_btkh))
        return cpu_attention.self_attention(q, k, v, segment_bt)
    if impl == "splash":
        return _splash(q_btnh, k_btkh, v_btkh, segment_bt, dtype)
    causal_ts = jnp.tril(jnp.ones((t, t), jnp.bool_))
    same_bts = segment_bt[:, :, None] == segment_bt[:, None, :]
    if impl == "dense":
        return _dense(q_btnh, k_btkh, v_btkh, same_bts & causal_ts[None], dtype)
    if impl == "cudnn":
        return _nn_attention(q_btnh, k_btkh, v_btkh, same_bts, dtype, "cudnn", is_causal=True)
    if impl == "xla":
        return _nn_attention(q_btnh, k_btkh, v_btkh, same_bts & causal_ts[None], dtype, "xla")
    raise ValueError(f"attention impl {impl!r} is not one of dense, xla, cudnn, splash, auto")


def cached_attention(
    q_btnh: Float[Array, "b t n h"],
    k_bkhs: Float[Array, "b k h s"],
    v_bksh: Float[Array, "b k s h"],
    slot_mask_bs: Array,
    index: Int[Array, ""],
    *,
    impl: str,
    dtype: jnp.dtype,
) -> Float[Array, "b t n h"]:
    """Queries at slots ``index + t`` over the cache: slots s <= index + t with ``slot_mask[b, s]``.

    With the cache layout (`KVCache`: keys ``[B,K,H,S]``, values ``[B,K,S,H]``) both products are batched
    matmuls over ``(b, k)`` on each head's block as it lies in the cache, with the T x G queries of a kv head
    as the rows of one matrix (q = (t, g)): ``logits[b,k,q,s] = Σ_h q[b,k,q,h]·k[b,k,h,s] / sqrt(H)``, a float32
    softmax over the allowed slots, then ``out[b,k,q,:] = Σ_s p[b,k,q,s]·v[b,k,s,:]``, float32 accumulation.
    The operands are in ``promote(cache dtype, dtype)``, so the float32 cache the sampler keeps for 16-bit
    compute on the CPU (`KVCache.storage_dtype`) is read as it is. ``impl="dense"`` is the reference path
    (`_dense` on the ``[B,S,K,H]`` transposes); every other choice uses this one, and for one query token on
    a single-device CPU with a float32 cache the same math runs as one fused kernel (`cpu_attention`).
    """
    t, s = q_btnh.shape[1], k_bkhs.shape[3]
    q_slot_t = index + jnp.arange(t, dtype=jnp.int32)
    filled_ts = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot_t[:, None]
    allowed_bts = filled_ts[None, :, :] & slot_mask_bs.astype(jnp.bool_)[:, None, :]
    if resolve(impl, dtype) == "dense":
        k_bskh, v_bskh = k_bkhs.transpose(0, 3, 1, 2), v_bksh.transpose(0, 2, 1, 3)
        return _dense(q_btnh, k_bskh, v_bskh, allowed_bts, dtype)
    b, _, n, h = q_btnh.shape
    kh = k_bkhs.shape[1]
    g = n // kh
    cdt = jnp.promote_types(k_bkhs.dtype, dtype)  # an f32 cache (`KVCache.storage_dtype`) is read as f32
    q_bkqh = q_btnh.astype(cdt).reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    if t == 1 and cdt == jnp.float32 and cpu_attention.enabled(h):  # one decode token: the fused CPU kernel
        out = cpu_attention.decode_attention(q_bkqh, k_bkhs, v_bksh, allowed_bts[:, 0], h**-0.5, NEG_INF)
        return out.reshape(b, 1, n, h).astype(dtype)
    scores = jnp.einsum("bkqh,bkhs->bkqs", q_bkqh, k_bkhs.astype(cdt), preferred_element_type=jnp.float32)
    logits = scores * (h**-0.5)
    allowed_bkqs = jnp.broadcast_to(allowed_bts[:, None, :, None, :], (b, 1, t, g, s)).reshape(b, 1, t * g, s)
    logits = jnp.where(allowed_bkqs, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(cdt)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v_bksh.astype(cdt), preferred_element_type=jnp.float32)
    return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(dtype)


# ------------------------------------------------------------------------------------------------ splash (TPU)
@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, groups: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = max(b for b in (512, 256, 128) if t % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(groups)])
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes), sk.SegmentIds


def _splash(q_btnh, k_btkh, v_btkh, segment_bt, dtype):
    b, t, n, h = q_btnh.shape
    kh = k_btkh.shape[2]
    g = n // kh
    pad = (-t) % _SPLASH_BLOCK
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_btnh, k_btkh, v_btkh = (jnp.pad(x, widths) for x in (q_btnh, k_btkh, v_btkh))
        segment_bt = jnp.pad(segment_bt, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT - 1)
    tp = t + pad
    q_bkgth = (q_btnh.astype(dtype) * jnp.asarray(h**-0.5, dtype)).reshape(b, tp, kh, g, h)
    q_bkgth = q_bkgth.transpose(0, 2, 3, 1, 4)
    k_bkth = k_btkh.astype(dtype).transpose(0, 2, 1, 3)
    v_bkth = v_btkh.astype(dtype).transpose(0, 2, 1, 3)
    kernel, segment_ids = _splash_kernel(tp, g)

    def local(q, k, v, seg):  # q [b,k,g,t,h], k/v [b,k,t,h], seg [b,t] (one shard)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads, same segments
        return jax.vmap(lambda q1, k1, v1, s1: per_head(q1, k1, v1, segment_ids(q=s1, kv=s1)))(q, k, v, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        out = local(q_bkgth, k_bkth, v_bkth, segment_bt.astype(jnp.int32))
    else:
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
        spec = spec_for(("batch", "kv_heads"), (b, kh), sizes)
        batch_ax, head_ax = tuple(spec)
        out = jax.shard_map(
            local,
            in_specs=(
                PartitionSpec(batch_ax, head_ax),
                PartitionSpec(batch_ax, head_ax),
                PartitionSpec(batch_ax, head_ax),
                PartitionSpec(batch_ax),
            ),
            out_specs=PartitionSpec(batch_ax, head_ax),
            check_vma=False,
        )(q_bkgth, k_bkth, v_bkth, segment_bt.astype(jnp.int32))
    out_btnh = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]
    return out_btnh.astype(dtype)
