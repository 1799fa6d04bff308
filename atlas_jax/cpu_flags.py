"""XLA:CPU flags atlas-jax adds to ``XLA_FLAGS`` when it is imported: YNNPACK matrix products where they pay.

XLA:CPU emits its own loops for ``dot`` by default. ``--xla_cpu_experimental_ynn_fusion_type=dot`` hands
every dot YNNPACK supports to YNNPACK's GEMM kernels instead (same operands, same f32 accumulation; a dot
it does not support keeps XLA's emitter). Whether that pays depends on the CPU. Measured with
`bench/rollout.py` (JAX sampler only, 2 cores, runs interleaved):

* x86 with AVX2 only (AMD EPYC, no AVX-512): YNNPACK made decode 1.33-1.41x faster in bf16 and 1.05-1.12x in
  fp32 on the peer shape.
* x86 with AVX-512 + avx512_bf16 (AMD EPYC): XLA's own dots are faster: YNNPACK made decode 1.38x *slower*
  in bf16 and ~1.1x slower in fp32 on the 32k shape (3,975-4,450 vs 2,872-3,256 tok/s bf16), and ~1.3x slower
  in bf16 on the peer shape.

So by default the flag is added only on an x86 CPU whose ``/proc/cpuinfo`` lists ``avx2`` but not ``avx512f``
(`library_dots_pay`). ``ATLAS_JAX_YNN_DOTS=1`` adds it on any CPU, ``ATLAS_JAX_YNN_DOTS=0`` never, and a
``--xla_cpu_experimental_ynn_fusion_type`` the user set already wins. The flag only changes the CPU backend;
TPU and GPU compilers ignore it.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend (the first array or compile, not ``import
jax``), so this takes effect when ``atlas_jax`` is imported before any JAX computation (the launchers and
`bench/` scripts import it before their first JAX computation).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OPT_OUT_ENV = "ATLAS_JAX_YNN_DOTS"
CPUINFO = Path("/proc/cpuinfo")


def cpu_flag_set(cpuinfo: str) -> set[str]:
    """The feature flags of the first ``flags`` line of a ``/proc/cpuinfo`` text (empty if none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def library_dots_pay(cpuinfo: str | None) -> bool:
    """YNNPACK dots are the faster choice: an x86 CPU with AVX2 and without AVX-512 (module docstring).

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (None where there is none: not Linux, then XLA's default).
    """
    flags = cpu_flag_set(cpuinfo or "")
    return "avx2" in flags and "avx512f" not in flags


def read_cpuinfo() -> str | None:
    """The text of ``/proc/cpuinfo`` (None where there is none: not Linux)."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def with_library_dots(env: MutableMapping[str, str], cpuinfo: str | None = None) -> bool:
    """Adds ``YNN_FLAG=dot`` to ``env["XLA_FLAGS"]`` where it pays (or is forced); True if it did.

    ``env[OPT_OUT_ENV]``: "0" never, "1" always, unset or "auto": `library_dots_pay` ``(cpuinfo)``. A
    ``YNN_FLAG`` already in ``XLA_FLAGS`` is left as it is.

    Raises:
      ValueError: ``env[OPT_OUT_ENV]`` is something else (names the variable).
    """
    choice = env.get(OPT_OUT_ENV, "auto").strip().lower() or "auto"
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"{OPT_OUT_ENV}={env[OPT_OUT_ENV]!r}: expected 0 (never), 1 (always) or auto")
    flags = env.get("XLA_FLAGS", "")
    if choice == "0" or YNN_FLAG in flags:
        return False
    if choice == "auto" and not library_dots_pay(cpuinfo):
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=dot".strip()
    return True


def apply() -> bool:
    """`with_library_dots` on ``os.environ`` and this CPU, if no JAX backend has started yet."""
    bridge = sys.modules.get("jax._src.xla_bridge")  # not imported: no backend can have started
    started = getattr(bridge, "backends_are_initialized", lambda: False)
    if bridge is not None and started():
        return False
    return with_library_dots(os.environ, read_cpuinfo())
