"""bf16 matrix products on Intel AMX for XLA:CPU: ``einsum`` of two bf16 operands with float32 accumulation.

    c[m, n] = Σ_k a[m, k] · b[k, n]        a, b in bf16; products exact in f32, sums in f32; c in float32

Why: XLA:CPU does not use AMX. On a 2-core Xeon with AMX (2026-12-04) its bf16 dot (``preferred_element_type=
float32``) ran the forward products of a training step at 400-1,000 GFLOP/s and the weight gradients (``xᵀ·dy``,
contracting the 2,304 rows of a micro-batch) at 150-180, while torch's oneDNN (TRL's update) uses AMX.
``amx_matmul.cc`` holds XLA FFI custom calls: four 16 x 16 f32 accumulator tiles, two tiles of ``a``, two of ``b``
as VNNI pairs per 64-column panel, tasks split over XLA's intra-op threads; each operand may be passed in its
stored layout or transposed (`matmul`'s ``a_t``/``b_t``) and the result may be rounded to bf16 in the kernel.

`einsum` maps any two-operand einsum without batch axes (every axis is in exactly one operand and the output,
or contracted) onto ``[M, K] · [K, N]`` with reshapes only where the operands' stored layouts allow (the
model's forward and backward products all do), and pads M, K to multiples of 32 and N to a multiple of 64 with
zeros (no effect on the sum). `layers.einsum` sends its forward and backward products here where `enabled`
(CPU, one device, bf16, >= `MIN_ROWS` rows). `packed_matmul` multiplies by weights packed once
(`cpu_matmul.pack(..., amx=True)`, the sampler's rollout copy). Measured on a 2-core Xeon with AMX
(2026-12-04): the training products 0.96-2.8x XLA's dot (weight gradients 1.9-2.8x), a GRPO update of the peer
model 7.1 -> 5.5-6.2 s; decode with packed weights 2,564 -> 2,946 tok/s.

Availability. ``ATLAS_JAX_AMX``: ``auto`` (default) uses it when ``/proc/cpuinfo`` lists ``amx_tile amx_bf16
avx512f avx512bw``, the kernel grants this process AMX state (``arch_prctl``) and it builds; ``1`` requires it
(the error says why it cannot be used); ``0`` never. Built by `build.build` on first use (~3 s).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from atlas_jax.cpu_flags import cpu_flag_set, read_cpuinfo
from atlas_jax.kernels import build as _build
from atlas_jax.kernels import placement

ENV = "ATLAS_JAX_AMX"
SOURCE = Path(__file__).with_name("amx_matmul.cc")
TARGET, TARGET_BF16 = "atlas_amx_matmul", "atlas_amx_matmul_bf16"  # f32 / bf16 output
TARGET_PACKED = "atlas_amx_packed_matmul"  # b given as `cpu_matmul.pack(..., amx=True)` panels
SYMBOLS = {TARGET: "AtlasAmxMatmul", TARGET_BF16: "AtlasAmxMatmulBf16", TARGET_PACKED: "AtlasAmxPackedMatmul"}
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512_bf16")
CXX_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-mamx-tile",
    "-mamx-bf16",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512bf16",
)
ROW_MULTIPLE, K_MULTIPLE, COL_MULTIPLE = 32, 32, 64  # what amx_matmul.cc requires (it checks)
MIN_ROWS = 64  # below this a product stays with XLA (decode-sized: the per-call re-layout of b does not pay)


def choice(env: Mapping[str, str]) -> str:
    """``env[ENV]`` as "0", "1" or "auto" (`build.switch`; ValueError naming the variable otherwise)."""
    return _build.switch(ENV, env)


def cpu_supports(cpuinfo: str | None) -> bool:
    """``/proc/cpuinfo`` text lists every flag of `CPU_FLAGS` (False without one: not Linux)."""
    return set(CPU_FLAGS) <= cpu_flag_set(cpuinfo or "")


def library_path(cache_dir: Path | None = None) -> Path:
    return _build.library_path(SOURCE, CXX_FLAGS, cache_dir)


@functools.cache
def _register(path: str) -> None:
    lib = ctypes.cdll.LoadLibrary(path)
    status = lib.AtlasAmxInit()
    if status != 0:
        raise RuntimeError(
            f"{ENV}: the kernel refused this process AMX tile state (arch_prctl errno {status})"
        )
    for target, symbol in SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def available() -> bool:
    """AMX is wanted here (`choice`, `cpu_supports`), granted, built and registered; cached per process.

    Raises:
      RuntimeError: ``ATLAS_JAX_AMX=1`` and this CPU lacks a flag, the kernel refuses AMX state or the build
        fails. Under ``auto`` a failure warns once and returns False (XLA's dot is used).
    """
    return _build.load(
        ENV, CPU_FLAGS, read_cpuinfo(), SOURCE, CXX_FLAGS, _register,
        "AMX matmul kernel unavailable, using XLA's dot",
    )  # fmt: skip


def enabled() -> bool:
    """Route bf16 products here: the default backend is the CPU, the computation runs on one device (the mesh
    set with ``jax.set_mesh`` has one device, or none is set and the process has one: a custom call cannot be
    partitioned over a mesh) and `available`."""
    return placement.one_cpu_device() and available()


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def matmul(
    a: jax.Array,
    b: jax.Array,
    *,
    a_t: bool = False,
    b_t: bool = False,
    out_dtype: jnp.dtype | str = jnp.float32,
) -> jax.Array:
    """``A[M, K] · B[K, N]`` of two bf16 matrices, summed in float32, returned in ``out_dtype`` (f32 or bf16,
    rounded to nearest even).

    ``a`` is ``A`` (``a_t`` False) or ``Aᵀ`` stored ``[K, M]``; ``b`` is ``B`` or ``Bᵀ`` stored ``[N, K]``: the
    kernel reads either layout, so the products of a backward pass need no transposed copies. Operands are
    zero-padded to what the kernel needs (M, K multiples of 32, N of 64).
    """
    out_dtype = jnp.dtype(out_dtype)
    if a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16 or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul: needs two bf16 matrices, got {a.dtype}{a.shape} and {b.dtype}{b.shape}")
    if out_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"matmul: out_dtype {out_dtype} is not float32 or bfloat16")
    (m, k), (k2, n) = a.shape[:: -1 if a_t else 1], b.shape[:: -1 if b_t else 1]
    if k != k2:
        raise ValueError(f"matmul: contracted sizes differ ({k} vs {k2}; a_t={a_t}, b_t={b_t})")
    a = _pad_to(_pad_to(a, int(a_t), ROW_MULTIPLE), 1 - int(a_t), K_MULTIPLE)
    b = _pad_to(_pad_to(b, int(b_t), K_MULTIPLE), 1 - int(b_t), COL_MULTIPLE)
    mp, np_ = a.shape[1 if a_t else 0], b.shape[0 if b_t else 1]
    target = TARGET if out_dtype == jnp.float32 else TARGET_BF16
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((mp, np_), out_dtype), vmap_method="sequential")
    c = call(a, b, a_t=bool(a_t), b_t=bool(b_t))
    return c[:m, :n] if c.shape != (m, n) else c


def packed_matmul(a: jax.Array, wp: jax.Array, n: int) -> jax.Array:
    """``a[M, K] · W[K, :n]`` in float32 for a bf16 ``W`` packed as ``wp[P, K2, 64, 2]`` with ``2·K2`` a multiple
    of 32 (`cpu_matmul.pack` with ``amx=True``: the panels the kernel otherwise builds per call)."""
    k2 = wp.shape[1]
    if a.ndim != 2 or a.shape[1] > 2 * k2 or wp.ndim != 4 or (2 * k2) % K_MULTIPLE:
        raise ValueError(f"packed_matmul: a{a.shape} does not fit packed panels {wp.shape}")
    m = a.shape[0]
    a = _pad_to(a.astype(jnp.bfloat16), 0, ROW_MULTIPLE)
    a = jnp.pad(a, ((0, 0), (0, 2 * k2 - a.shape[1]))) if a.shape[1] != 2 * k2 else a
    call = jax.ffi.ffi_call(
        TARGET_PACKED, jax.ShapeDtypeStruct((a.shape[0], wp.shape[0] * wp.shape[2]), jnp.float32),
        vmap_method="sequential",
    )  # fmt: skip
    return call(a, wp)[:m, :n]


def plan(spec: str) -> tuple[str, str, str] | None:
    """``(free_a, contracted, free_b)`` axis letters of ``spec`` (free ones in output order), or None for a
    spec `einsum` does not take (batch axes shared by both operands and the output, an axis of one operand
    summed away, repeated letters, ellipses)."""
    if "." in spec or "->" not in spec:
        return None
    ins, out = spec.split("->")
    if ins.count(",") != 1:
        return None
    sa, sb = ins.split(",")
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(out)) != len(out):
        return None
    con = "".join(c for c in sa if c in sb)
    if any(c in out for c in con) or any(c not in out for c in sa + sb if c not in con):
        return None
    free_a = "".join(c for c in out if c in sa)
    free_b = "".join(c for c in out if c in sb)
    return free_a, con, free_b


def _as_matrix(x: jax.Array, letters: str, rows: str, cols: str) -> tuple[jax.Array, bool]:
    """``x`` (axes ``letters``) as a ``[rows, cols]`` matrix, or as its transpose ``[cols, rows]`` when that is
    how it is stored (second value True); a transposed copy only when neither layout is a reshape."""
    sizes = dict(zip(letters, x.shape, strict=True))
    r, c = math.prod(sizes[x_] for x_ in rows), math.prod(sizes[x_] for x_ in cols)
    if letters == rows + cols:
        return x.reshape(r, c), False
    if letters == cols + rows:
        return x.reshape(c, r), True
    return jnp.transpose(x, [letters.index(x_) for x_ in rows + cols]).reshape(r, c), False


def einsum(
    spec: str, a: jax.Array, b: jax.Array, out_dtype: jnp.dtype | str = jnp.float32
) -> jax.Array | None:
    """``jnp.einsum(spec, a, b, preferred_element_type=float32).astype(out_dtype)`` for bf16 ``a``, ``b`` on
    the kernel, or None where it does not apply (see `plan`; fewer than `MIN_ROWS` rows of ``a``'s free
    axes). The operands are passed in whichever stored layout they have (`matmul`'s ``a_t``/``b_t``); when
    the output lists ``b``'s free axes first the operands swap roles, so no output transpose is needed either."""
    layout = plan(spec)
    if layout is None or a.dtype != jnp.bfloat16 or b.dtype != jnp.bfloat16:
        return None
    free_a, con, free_b = layout
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    size = {**dict(zip(sa, a.shape, strict=True)), **dict(zip(sb, b.shape, strict=True))}
    if math.prod(size[c] for c in free_a) < MIN_ROWS:
        return None
    if out != free_a + free_b and out == free_b + free_a:  # c = (b-side)·(a-side)
        a, b, sa, sb, free_a, free_b = b, a, sb, sa, free_b, free_a
    con = "".join(c for c in sa if c in con)  # the contracted axes in a's stored order
    a2, a_t = _as_matrix(a, sa, free_a, con)
    b2, b_t = _as_matrix(b, sb, con, free_b)
    c = matmul(a2, b2, a_t=a_t, b_t=b_t, out_dtype=out_dtype)
    c = c.reshape([size[x] for x in free_a + free_b])
    order = free_a + free_b
    perm = [order.index(x) for x in out]
    return c if perm == sorted(perm) else jnp.transpose(c, perm)
