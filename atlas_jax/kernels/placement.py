"""Whether the computation being traced runs on one CPU device: where the CPU custom calls may be used.

A custom call cannot be partitioned over a mesh, and a CPU kernel must not land in a TPU/GPU program (AOT plans
compile accelerator programs on a CPU host). Under ``jax.set_mesh`` the mesh decides (one device, platform cpu);
without one, the process must be on the CPU backend with one device.
"""

from __future__ import annotations

import jax


def one_cpu_device() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.default_backend() == "cpu" and jax.device_count() == 1
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
    return mesh.size == 1 and platform in (None, "cpu") and jax.default_backend() == "cpu"
