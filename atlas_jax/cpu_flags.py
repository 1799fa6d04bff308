"""XLA:CPU flags atlas-jax adds to ``XLA_FLAGS`` when it is imported: YNNPACK for matrix products.

XLA:CPU emits its own loops for ``dot`` by default. ``--xla_cpu_experimental_ynn_fusion_type=dot`` hands
every dot YNNPACK supports to YNNPACK's GEMM kernels instead (same operands, same f32 accumulation; a dot
it does not support keeps XLA's emitter). On the peers' benchmark model (`bench/rollout.py --shape peer`,
2 cores, A/B interleaved in one run) it made the JAX sampler's decode 1.33-1.41x faster in bf16 and
1.05-1.12x in fp32. The flag only changes the CPU backend; TPU and GPU compilers ignore it.

XLA reads ``XLA_FLAGS`` once, when JAX starts its first backend (the first array or compile, not ``import
jax``), so this takes effect when ``atlas_jax`` is imported before any JAX computation (the launchers and
`bench/` scripts import it before their first JAX computation). A ``--xla_cpu_experimental_ynn_fusion_type`` the
user set already wins, and ``ATLAS_JAX_YNN_DOTS=0`` leaves ``XLA_FLAGS`` alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OPT_OUT_ENV = "ATLAS_JAX_YNN_DOTS"


def with_library_dots(env: MutableMapping[str, str]) -> bool:
    """Adds ``YNN_FLAG=dot`` to ``env["XLA_FLAGS"]`` unless opted out or already set; True if it did."""
    if env.get(OPT_OUT_ENV, "1").strip() == "0":
        return False
    flags = env.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=dot".strip()
    return True


def apply() -> bool:
    """`with_library_dots` on ``os.environ``, if no JAX backend has started yet (else it could not apply)."""
    bridge = sys.modules.get("jax._src.xla_bridge")  # not imported: no backend can have started
    started = getattr(bridge, "backends_are_initialized", lambda: False)
    if bridge is not None and started():
        return False
    return with_library_dots(os.environ)
