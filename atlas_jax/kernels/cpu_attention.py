"""Fused attention kernels for XLA:CPU on AVX-512 CPUs (``cpu_attention.cc``): one decode step over a float32 KV
cache, and causal self-attention over T tokens with its backward (training, scoring, prefill).

Decode (`decode_attention`):

    logits[b,k,g,s] = scale · Σ_h q[b,k,g,h] · keys[b,k,h,s]   (-> neg_inf where not allowed[b, s])
    out[b,k,g,:]    = Σ_s softmax_s(logits[b,k,g,:]) · values[b,k,s,:]          all float32

Why: `attention.cached_attention` for one query token is two batched matmuls of G rows (the query heads of a kv
head) per (row, kv head), which XLA:CPU ran at ~15 GFLOP/s: half of a peer-model decode step once the weight
products had their own kernels. This kernel reads each (row, kv head) block of the cache once, with the softmax
in registers between the two products.

Self-attention (`self_attention`, a ``jax.custom_vjp``): with q' = q / sqrt(H) and allowed(t, s) = s <= t and
seg[t] == seg[s],

    p[t,s] = exp(q'_t·k_s - lse_t) where allowed, else 0;   lse_t = log Σ_{s allowed} exp(q'_t·k_s)
    out_t  = Σ_s p[t,s] v_s
    backward: ds = p ⊙ (do·vᵀ - D), D_t = Σ_s p[t,s] (do_t·v_s);  dq = ds·k / sqrt(H),  dk = dsᵀ·q',  dv = pᵀ·do

in float32 from bf16 or float32 operands, p recomputed in the backward from the saved lse (flash-attention's
recurrence without the T x T matrices in memory), only the causal half computed. XLA:CPU ran the same as six
batched matmuls of 144 x 144 x 64 per head and layer at ~50 GFLOP/s plus the softmax/mask fusions: ~1.3 s of a
4.2 s GRPO update on the peer model (2026-12-05, Xeon with AMX).

Availability. ``ATLAS_JAX_CPU_ATTENTION``: ``auto`` (default) uses it when ``/proc/cpuinfo`` lists ``avx512f
avx512bw avx512vl`` and it builds; ``1`` requires it; ``0`` never. `enabled` also needs the CPU backend, one
device (like the matmul kernels) and a head dim that is a multiple of 16.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.cpu_flags import cpu_flag_set, read_cpuinfo
from atlas_jax.kernels import build as _build
from atlas_jax.kernels import placement

ENV = "ATLAS_JAX_CPU_ATTENTION"
SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET, SYMBOL = "atlas_decode_attention", "AtlasDecodeAttention"
SELF_TARGETS = {
    "atlas_self_attention": "AtlasSelfAttentionFwd",
    "atlas_self_attention_bwd": "AtlasSelfAttentionBwd",
}
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma")


def cpu_supports(cpuinfo: str | None) -> bool:
    """``/proc/cpuinfo`` text lists every flag of `CPU_FLAGS` (False without one: not Linux)."""
    return set(CPU_FLAGS) <= cpu_flag_set(cpuinfo or "")


def library_path(cache_dir: Path | None = None) -> Path:
    return _build.library_path(SOURCE, CXX_FLAGS, cache_dir)


@functools.cache
def _register(path: str) -> None:
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in ((TARGET, SYMBOL), *SELF_TARGETS.items()):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def available() -> bool:
    """Wanted here (``ATLAS_JAX_CPU_ATTENTION``, `cpu_supports`), built and registered; cached per process.

    Raises:
      RuntimeError: forced (``=1``) and this CPU lacks a flag or the build fails; under ``auto`` a failed
        build warns once and returns False (XLA's path is used).
    """
    return _build.load(
        ENV, CPU_FLAGS, read_cpuinfo(), SOURCE, CXX_FLAGS, _register,
        "CPU attention kernels unavailable, using XLA",
    )  # fmt: skip


def enabled(head_dim: int) -> bool:
    """Use the kernel: CPU backend, one device (the mesh set with ``jax.set_mesh``, or the process's when none
    is set), ``head_dim % 16 == 0`` and `available`."""
    return head_dim % 16 == 0 and placement.one_cpu_device() and available()


def decode_attention(
    q_bkgh: jax.Array,
    k_bkhs: jax.Array,
    v_bksh: jax.Array,
    allowed_bs: jax.Array,
    scale: float,
    neg_inf: float,
) -> jax.Array:
    """``out[b,k,g,:]`` of the module docstring, float32 ``[B, K, G, H]`` (operands cast to float32)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_bkgh.shape, jnp.float32), vmap_method="sequential")
    f32 = jnp.float32
    return call(
        q_bkgh.astype(f32), k_bkhs.astype(f32), v_bksh.astype(f32), allowed_bs.astype(jnp.bool_),
        scale=np.float32(scale), neg_inf=np.float32(neg_inf),
    )  # fmt: skip


def self_attention_enabled(head_dim: int, dtype: jnp.dtype) -> bool:
    """`self_attention` applies: `enabled` and a bf16 or float32 compute dtype."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) and enabled(head_dim)


def _self_forward(q, k, v, seg):
    b, t, n, _ = q.shape
    call = jax.ffi.ffi_call(
        "atlas_self_attention",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
        vmap_method="sequential",
    )
    return call(q, k, v, seg, scale=np.float32(q.shape[-1] ** -0.5))


@jax.custom_vjp
def self_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, segment_bt: jax.Array
) -> jax.Array:
    """Causal attention within equal segment ids (module docstring), ``[B,T,N,H]`` in q's dtype; q, k, v share
    one dtype (bf16 or float32), N is a multiple of K and H of 16 (the kernel checks)."""
    return _self_forward(q_btnh, k_btkh, v_btkh, segment_bt.astype(jnp.int32))[0]


def _self_fwd(q, k, v, seg):
    seg = seg.astype(jnp.int32)
    out, lse = _self_forward(q, k, v, seg)
    return out, (q, k, v, seg, lse)


def _self_bwd(res, d_out):
    q, k, v, seg, lse = res
    call = jax.ffi.ffi_call(
        "atlas_self_attention_bwd",
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
        vmap_method="sequential",
    )
    dq, dk, dv = call(q, k, v, seg, d_out.astype(q.dtype), lse, scale=np.float32(q.shape[-1] ** -0.5))
    return dq, dk, dv, None


self_attention.defvjp(_self_fwd, _self_bwd)
