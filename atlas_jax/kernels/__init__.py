"""Hand-written kernels XLA calls as custom calls (`cpu_matmul`: the CPU products of the rollout copy)."""
