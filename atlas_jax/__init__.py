"""atlas-jax: train teacher models that adapt to a frozen student (ATLAS) in JAX/Flax."""

from atlas_jax import cpu_flags as _cpu_flags

_cpu_flags.apply()  # before the first JAX computation: XLA reads XLA_FLAGS once (see cpu_flags)
