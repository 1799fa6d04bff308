"""Decode attention over a float32 KV cache in one pass, for XLA:CPU on AVX-512 CPUs (``cpu_attention.cc``).

    logits[b,k,g,s] = scale · Σ_h q[b,k,g,h] · keys[b,k,h,s]   (-> neg_inf where not allowed[b, s])
    out[b,k,g,:]    = Σ_s softmax_s(logits[b,k,g,:]) · values[b,k,s,:]          all float32

Why: `attention.cached_attention` for one query token is two batched matmuls of G rows (the query heads of a kv
head) per (row, kv head), which XLA:CPU ran at ~15 GFLOP/s: half of a peer-model decode step once the weight
products had their own kernels. This kernel reads each (row, kv head) block of the cache once, with the softmax
in registers between the two products.

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
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)), platform="cpu")


@functools.cache
def available() -> bool:
    """Wanted here (``ATLAS_JAX_CPU_ATTENTION``, `cpu_supports`), built and registered; cached per process.

    Raises:
      RuntimeError: forced (``=1``) and this CPU lacks a flag or the build fails; under ``auto`` a failed
        build warns once and returns False (XLA's path is used).
    """
    return _build.load(
        ENV, CPU_FLAGS, read_cpuinfo(), SOURCE, CXX_FLAGS, _register,
        "CPU decode-attention kernel unavailable, using XLA",
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
