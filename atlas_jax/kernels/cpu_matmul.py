"""Matrix products for XLA:CPU on AVX-512 CPUs, on weights packed once (`PackedWeight`), in bf16 and float32.

    y[m, n] = Σ_k x[m, k] · w[k, n]        x, w in bf16 (or float32); products and sum in float32; y in float32

Why: at decode batch sizes (1-64 rows) XLA:CPU's own dot streams weights at 10-20 GB/s, in bf16 at one row
pathologically slowly (896 x 151,936 unembedding: 209 ms). These kernels (``cpu_matmul.cc``, XLA FFI custom calls)
multiply from a weight stored as contiguous 64-column panels (`pack`; bf16 with k-pairs interleaved for VDPBF16PS,
float32 for FMA), 6 rows x 64 columns of f32 accumulators in registers, panels split over XLA's intra-op threads.
Measured on a 2-core Zen 5 EPYC, weights out of L3 (`python -m bench.cpu_kernel`): bf16 1.4-3.2x XLA's dot at 16
rows, 0.8-2.3x at 64, 27-39x at one row; float32 1.0-1.8x at 16 rows, 1.0-1.4x at 64. Same rounding as XLA (max
error vs a float64 product ~2e-6 relative).

Use. The JAX sampler's rollout copy packs every weight matrix with `pack` where `enabled` (CPU, bf16 or float32
compute, one device) and `Decoder` multiplies a `PackedWeight` operand with `matmul`; the training path never
sees one.

Availability. ``ATLAS_JAX_CPU_KERNEL``: ``auto`` (default) uses the kernels when ``/proc/cpuinfo`` lists
``avx512f avx512bw avx512vl avx512_bf16`` (bf16 only without ``amx_bf16``: `pays`) and they build; ``1`` requires them
(an error says why they cannot be used); ``0`` never. The first use compiles ``cpu_matmul.cc`` with ``$CXX``
(default ``g++``, ~4 s) against jaxlib's FFI headers into ``$XDG_CACHE_HOME/atlas_jax/`` (default ``~/.cache``),
named by a hash of the source, flags, compiler and jax version, written to a temporary file and renamed, so
concurrent processes never load half a file.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from atlas_jax.cpu_flags import cpu_flag_set, read_cpuinfo
from atlas_jax.kernels import amx_matmul
from atlas_jax.kernels import build as _build

ENV = "ATLAS_JAX_CPU_KERNEL"
SOURCE = Path(__file__).with_name("cpu_matmul.cc")
PANEL = 64  # output columns per packed panel (cpu_matmul.cc kPanel)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
TARGETS = {DTYPES[0]: "atlas_cpu_matmul", DTYPES[1]: "atlas_f32_matmul"}  # custom-call names
SYMBOLS = {"atlas_cpu_matmul": "AtlasBf16Matmul", "atlas_f32_matmul": "AtlasF32Matmul"}
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A weight ``w`` of logical ``shape`` whose first ``contract`` axes are contracted, packed for `matmul`.

    With ``W = w.reshape(K, N)`` (``K`` the product of the contracted axes, ``N`` of the rest), zero padded:
    bf16 ``wp[P, K2, 64, 2]`` with ``wp[p, q, j, r] = W[2q + r, 64p + j]`` (k-pairs interleaved for VDPBF16PS),
    float32 ``wp[P, K, 64]`` with ``wp[p, k, j] = W[k, 64p + j]``. A pytree (``wp`` is the leaf; ``shape`` and
    ``contract`` are static).
    """

    wp: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    contract: int = dataclasses.field(default=1, metadata={"static": True})
    amx: bool = dataclasses.field(default=False, metadata={"static": True})  # K2 a multiple of 16: AMX panels

    @property
    def k(self) -> int:
        return math.prod(self.shape[: self.contract])

    @property
    def n(self) -> int:
        return math.prod(self.shape[self.contract :])


def packed_shape(k: int, n: int, dtype: jnp.dtype | str = jnp.bfloat16, amx: bool = False) -> tuple[int, ...]:
    """``wp``'s shape for a ``[k, n]`` weight in ``dtype`` (bf16 or float32; ``amx``: bf16 with K padded to a
    multiple of 32, the panels `amx_matmul.packed_matmul` reads)."""
    p = -(-n // PANEL)
    if jnp.dtype(dtype) != jnp.bfloat16:
        return (p, k, PANEL)
    return (p, 16 * -(-k // 32) if amx else -(-k // 2), PANEL, 2)


def pack(
    w: jax.Array, contract: int = 1, dtype: jnp.dtype | str = jnp.bfloat16, amx: bool = False
) -> PackedWeight:
    """``w`` cast to ``dtype`` (bf16 or float32) and packed for `matmul`, its first ``contract`` axes contracted
    (``amx``: bf16 panels for the AMX kernel, `uses_amx`).

    Traceable (the rollout copy packs inside its jitted program).
    """
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"pack: dtype {dtype} is not one of {[str(d) for d in DTYPES]}")
    if amx and dtype != jnp.bfloat16:
        raise ValueError(f"pack: amx=True needs bfloat16, got {dtype}")
    shape = tuple(int(d) for d in w.shape)
    if not 1 <= contract < len(shape):
        raise ValueError(
            f"pack: contract={contract} must leave at least one axis of a weight of shape {shape}"
        )
    k, n = math.prod(shape[:contract]), math.prod(shape[contract:])
    ps = packed_shape(k, n, dtype, amx)
    w2 = w.reshape(k, n).astype(dtype)
    if dtype == jnp.bfloat16:
        w2 = jnp.pad(w2, ((0, 2 * ps[1] - k), (0, ps[0] * PANEL - n)))
        wp = w2.reshape(ps[1], 2, ps[0], PANEL).transpose(2, 0, 3, 1)
    else:
        wp = jnp.pad(w2, ((0, 0), (0, ps[0] * PANEL - n))).reshape(k, ps[0], PANEL).transpose(1, 0, 2)
    return PackedWeight(wp, shape, contract, amx)


def unpack(p: PackedWeight) -> jax.Array:
    """The weight `pack` packed, in its packed dtype (exact inverse; for tests)."""
    if p.wp.ndim == 4:
        w2 = p.wp.transpose(1, 3, 0, 2).reshape(p.wp.shape[1] * 2, p.wp.shape[0] * PANEL)
    else:
        w2 = p.wp.transpose(1, 0, 2).reshape(p.wp.shape[1], p.wp.shape[0] * PANEL)
    return w2[: p.k, : p.n].reshape(p.shape)


def columns(p: PackedWeight, ids: jax.Array) -> jax.Array:
    """``W[:, ids]`` with the ids' axes first: ``[*ids.shape, K]``, for a 2-D packed ``[K, N]`` weight.

    The embedding lookup of a tied table packed as ``Eᵀ`` (rows of ``E`` are columns of ``Eᵀ``).
    """
    if len(p.shape) != 2:
        raise ValueError(f"columns: needs a 2-D packed weight, got shape {p.shape}")
    if p.wp.ndim == 4:
        cols = p.wp[ids // PANEL, :, ids % PANEL, :]  # [*ids.shape, K2, 2]
        return cols.reshape(*ids.shape, -1)[..., : p.k]
    return p.wp[ids // PANEL, :, ids % PANEL]  # [*ids.shape, K]


def matmul(x: jax.Array, p: PackedWeight) -> jax.Array:
    """``x[..., c₁..c_j] · w[c₁..c_j, o₁..]`` in float32, ``[..., o₁..]``: x's trailing axes are w's contracted ones.

    ``x`` is cast to the packed dtype. Needs `available` (the custom calls must be registered).
    """
    lead, con = x.shape[: x.ndim - p.contract], x.shape[x.ndim - p.contract :]
    if tuple(con) != p.shape[: p.contract]:
        raise ValueError(
            f"matmul: x's trailing axes {tuple(con)} != the weight's contracted {p.shape[: p.contract]}"
        )
    m = math.prod(lead)
    if p.amx:
        y = amx_matmul.packed_matmul(x.reshape(m, p.k), p.wp, p.n)
        return y.reshape(*lead, *p.shape[p.contract :])
    target = TARGETS[jnp.dtype(p.wp.dtype)]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, p.n), jnp.float32))
    y = call(x.reshape(m, p.k).astype(p.wp.dtype), p.wp)
    return y.reshape(*lead, *p.shape[p.contract :])


def choice(env: Mapping[str, str]) -> str:
    """``env[ENV]`` as "0", "1" or "auto" (`build.switch`; ValueError naming the variable otherwise)."""
    return _build.switch(ENV, env)


def cpu_supports(cpuinfo: str | None) -> bool:
    """``/proc/cpuinfo`` text lists every flag of `CPU_FLAGS` (False without one: not Linux)."""
    return set(CPU_FLAGS) <= cpu_flag_set(cpuinfo or "")


def pays(cpuinfo: str | None, dtype: jnp.dtype | str) -> bool:
    """Where ``auto`` packs for these kernels: `cpu_supports`, and for bf16 no AMX (``amx_bf16``).

    Measured: on a Zen 5 EPYC (avx512_bf16, no AMX) both beat XLA's dot (bf16 1.4-3.2x at 16 rows); on a Xeon
    with AMX (2026-12-04) the float32 kernel still did (decode 1.08x on the peer model, 1.25x at 0.5B) but
    XLA's bf16 dot was as fast at 16 rows and 2-3x faster at 64 (bf16 goes to `amx_matmul` there).
    """
    if not cpu_supports(cpuinfo):
        return False
    return jnp.dtype(dtype) != jnp.bfloat16 or "amx_bf16" not in cpu_flag_set(cpuinfo or "")


def library_path(cache_dir: Path | None = None) -> Path:
    """Where the built kernel lives (`build.library_path` of `SOURCE` and `CXX_FLAGS`)."""
    return _build.library_path(SOURCE, CXX_FLAGS, cache_dir)


def build(out: Path) -> Path:
    """Compiles `SOURCE` to ``out`` (`build.build`; RuntimeError naming the compiler or its stderr)."""
    return _build.build(SOURCE, CXX_FLAGS, out, ENV)


@functools.cache
def _register(path: str) -> None:
    lib = ctypes.cdll.LoadLibrary(path)
    for target, symbol in SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def available() -> bool:
    """The kernel is wanted here (`choice`, `cpu_supports`), built and registered; cached per process.

    Raises:
      RuntimeError: ``ATLAS_JAX_CPU_KERNEL=1`` and this CPU lacks a flag, or the build fails. Under ``auto``
        a failed build warns once and returns False (XLA's dot is used).
    """
    return _build.load(
        ENV, CPU_FLAGS, read_cpuinfo(), SOURCE, CXX_FLAGS, _register,
        "CPU matmul kernel unavailable, using XLA's dot",
    )  # fmt: skip


def uses_amx(dtype: jnp.dtype | str) -> bool:
    """bf16 weights are packed for the AMX kernel (`amx_matmul.available`) rather than for VDPBF16PS."""
    return jnp.dtype(dtype) == jnp.bfloat16 and amx_matmul.available()


def enabled(platform: str, dtype: jnp.dtype | str, num_devices: int) -> bool:
    """Pack the rollout copy: CPU, bf16 or float32 compute, one device (a custom call cannot be partitioned),
    and a kernel for it: AMX for bf16 (`uses_amx`), else `available` (under ``auto`` only where it `pays`)."""
    if platform != "cpu" or jnp.dtype(dtype) not in DTYPES or num_devices != 1:
        return False
    if uses_amx(dtype):
        return True
    if choice(os.environ) == "auto" and not pays(read_cpuinfo(), dtype):
        return False
    return available()
