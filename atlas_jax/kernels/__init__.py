"""Hand-written kernels XLA calls as custom calls (`bf16_matmul`: the CPU bf16 product of the rollout copy)."""
