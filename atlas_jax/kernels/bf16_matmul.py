"""A bf16 matrix product for XLA:CPU on AVX512-BF16 CPUs, on weights packed once (`PackedBF16`).

    y[m, n] = Σ_k x[m, k] · w[k, n]        x, w in bf16; products and sum in float32; y in float32

Why: at decode batch sizes (1-64 rows) XLA:CPU's own bf16 ``dot`` reads weights at 12-18 GB/s, and at one
row it is pathological (896 x 151,936 unembedding: 209 ms). This kernel (``bf16_matmul.cc``, an XLA FFI custom
call) multiplies with VDPBF16PS from a weight stored as contiguous 64-column panels with k-pairs interleaved,
``wp[P, ceil(K/2), 64, 2]`` (`pack`), and splits panels over XLA's intra-op threads. Measured on a 2-core Zen 5
EPYC, weights out of L3 (`bench/cpu_bf16_kernel.py`): 16 rows 1.4-3.2x XLA's dot, 64 rows 0.8-2.3x, 1 row
27-39x; same rounding as XLA (max relative error vs an f32 product ~2e-6).

Use. The JAX sampler's rollout copy packs every weight matrix with `pack` where `enabled` (CPU, bf16, one
device) and `Decoder` multiplies a `PackedBF16` operand with `matmul`; the training path never sees one.

Availability. ``ATLAS_JAX_BF16_KERNEL``: ``auto`` (default) uses the kernel when ``/proc/cpuinfo`` lists
``avx512f avx512bw avx512vl avx512_bf16`` and it builds; ``1`` requires it (an error says why it cannot);
``0`` never. The first use compiles ``bf16_matmul.cc`` with ``$CXX`` (default ``g++``, ~5 s) against
jaxlib's FFI headers into ``$XDG_CACHE_HOME/atlas_jax/`` (default ``~/.cache``), named by a hash of the source,
flags and jax version, written to a temporary file and renamed, so concurrent processes never load half a file.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from atlas_jax.cpu_flags import CPUINFO, cpu_flag_set

ENV = "ATLAS_JAX_BF16_KERNEL"
TARGET = "atlas_bf16_matmul"
SOURCE = Path(__file__).with_name("bf16_matmul.cc")
PANEL = 64  # output columns per packed panel (bf16_matmul.cc kPanel)
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBF16:
    """A weight ``w`` of logical ``shape`` whose first ``contract`` axes are contracted, packed for `matmul`.

    ``wp[P, K2, 64, 2]`` holds ``W = w.reshape(K, N)`` (``K`` the product of the contracted axes, ``N`` of the
    rest), zero padded to ``[2·K2, 64·P]``: ``wp[p, q, j, r] = W[2q + r, 64p + j]``. A pytree (``wp`` is the
    leaf; ``shape`` and ``contract`` are static).
    """

    wp: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    contract: int = dataclasses.field(default=1, metadata={"static": True})

    @property
    def k(self) -> int:
        return math.prod(self.shape[: self.contract])

    @property
    def n(self) -> int:
        return math.prod(self.shape[self.contract :])


def packed_shape(k: int, n: int) -> tuple[int, int, int, int]:
    """``wp``'s shape for a ``[k, n]`` weight."""
    return (-(-n // PANEL), -(-k // 2), PANEL, 2)


def pack(w: jax.Array, contract: int = 1) -> PackedBF16:
    """``w`` (any float dtype; cast to bf16) packed for `matmul`, its first ``contract`` axes contracted.

    Traceable (the rollout copy packs inside its jitted program).
    """
    shape = tuple(int(d) for d in w.shape)
    if not 1 <= contract < len(shape):
        raise ValueError(
            f"pack: contract={contract} must leave at least one axis of a weight of shape {shape}"
        )
    k, n = math.prod(shape[:contract]), math.prod(shape[contract:])
    p, k2, _, _ = packed_shape(k, n)
    w2 = jnp.pad(w.reshape(k, n).astype(jnp.bfloat16), ((0, 2 * k2 - k), (0, p * PANEL - n)))
    return PackedBF16(w2.reshape(k2, 2, p, PANEL).transpose(2, 0, 3, 1), shape, contract)


def unpack(p: PackedBF16) -> jax.Array:
    """The bf16 weight `pack` packed (exact inverse; for tests and lookups)."""
    w2 = p.wp.transpose(1, 3, 0, 2).reshape(p.wp.shape[1] * 2, p.wp.shape[0] * PANEL)
    return w2[: p.k, : p.n].reshape(p.shape)


def columns(p: PackedBF16, ids: jax.Array) -> jax.Array:
    """``W[:, ids]`` moved last-but-none: ``[*ids.shape, K]`` in bf16, for a 2-D packed ``[K, N]`` weight.

    The embedding lookup of a tied table packed as ``Eᵀ`` (rows of ``E`` are columns of ``Eᵀ``).
    """
    if len(p.shape) != 2:
        raise ValueError(f"columns: needs a 2-D packed weight, got shape {p.shape}")
    cols = p.wp[ids // PANEL, :, ids % PANEL, :]  # [*ids.shape, K2, 2]
    return cols.reshape(*ids.shape, -1)[..., : p.k]


def matmul(x: jax.Array, p: PackedBF16) -> jax.Array:
    """``x[..., c₁..c_j] · w[c₁..c_j, o₁..]`` in float32, ``[..., o₁..]``: x's trailing axes are w's contracted ones.

    ``x`` is cast to bf16. Needs `available` (the custom call must be registered).
    """
    lead, con = x.shape[: x.ndim - p.contract], x.shape[x.ndim - p.contract :]
    if tuple(con) != p.shape[: p.contract]:
        raise ValueError(
            f"matmul: x's trailing axes {tuple(con)} != the weight's contracted {p.shape[: p.contract]}"
        )
    m = math.prod(lead)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, p.n), jnp.float32))
    y = call(x.reshape(m, p.k).astype(jnp.bfloat16), p.wp)
    return y.reshape(*lead, *p.shape[p.contract :])


def choice(env: Mapping[str, str]) -> str:
    """``env[ENV]`` as "0", "1" or "auto" (unset or empty: auto).

    Raises:
      ValueError: anything else (names the variable).
    """
    value = env.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("0", "1", "auto"):
        raise ValueError(f"{ENV}={env[ENV]!r}: expected 0 (never), 1 (always) or auto")
    return value


def cpu_supports(cpuinfo: str | None) -> bool:
    """``/proc/cpuinfo`` text lists every flag of `CPU_FLAGS` (False without one: not Linux)."""
    return set(CPU_FLAGS) <= cpu_flag_set(cpuinfo or "")


def library_path(cache_dir: Path | None = None) -> Path:
    """Where the built kernel lives: named by a hash of the source, compiler flags and jax version."""
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atlas_jax"
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join((*CXX_FLAGS, jax.__version__, _compiler())).encode())
    return base / f"bf16_matmul-{digest.hexdigest()[:16]}.so"


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def build(out: Path) -> Path:
    """Compiles `SOURCE` to ``out`` (kept if it exists): temporary file in the same folder, then renamed.

    Raises:
      RuntimeError: no compiler, or it failed (its stderr included).
    """
    if out.exists():
        return out
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"{ENV}: C++ compiler {cxx!r} not found (set CXX, or {ENV}=0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{ENV}: building {SOURCE.name} failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}"
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _register(path: str) -> None:
    lib = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.AtlasBf16Matmul), platform="cpu")


def _read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


@functools.cache
def available() -> bool:
    """The kernel is wanted here (`choice`, `cpu_supports`), built and registered; cached per process.

    Raises:
      RuntimeError: ``ATLAS_JAX_BF16_KERNEL=1`` and this CPU lacks a flag, or the build fails. Under ``auto``
        a failed build warns once and returns False (XLA's dot is used).
    """
    want = choice(os.environ)
    if want == "0":
        return False
    if not cpu_supports(_read_cpuinfo()):
        if want == "1":
            raise RuntimeError(f"{ENV}=1 but this CPU does not list all of {', '.join(CPU_FLAGS)}")
        return False
    try:
        _register(str(build(library_path())))
    except (RuntimeError, OSError) as e:
        if want == "1":
            raise
        warnings.warn(f"bf16 CPU kernel unavailable, using XLA's dot: {e}", stacklevel=2)
        return False
    return True


def enabled(platform: str, dtype: jnp.dtype | str, num_devices: int) -> bool:
    """Pack the rollout copy: CPU, bf16 compute, one device (a custom call cannot be partitioned), `available`."""
    if platform != "cpu" or jnp.dtype(dtype) != jnp.bfloat16 or num_devices != 1:
        return False
    return available()
