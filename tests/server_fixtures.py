"""A generation server on 127.0.0.1 around the tiny JAX engine (no vLLM start-up), for the hardening and fuzz tests.

``JaxServed`` gives ``server_app`` the weight methods it expects of a ``VLLMEngine`` (``load_hf_tensors``,
``load_hf_dir``, ``reset_prefix_cache``) on top of the real JAX sampler; HF names and shapes are checked
by ``converters.mapping`` before anything is loaded, as vLLM's loader does.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from protocol_helpers import hf_config_dict, make_jax_engine

from atlas_jax.engines.base import Engine
from atlas_jax.models.config import ModelConfig
from converters import mapping

TOKEN = "hardening-secret"


class JaxServed(Engine):
    """The tiny JAX sampler with ``server_app``'s weight methods; ``gate`` (an Event) can hold ``generate``."""

    def __init__(self, tokenizer) -> None:
        self.inner = make_jax_engine(tokenizer)
        self.model_config = ModelConfig.from_hf(hf_config_dict(tokenizer))
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.loads = 0

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    def generate(self, prompts, params, n=1):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=60)
        return self.inner.generate(prompts, params, n)

    def load_hf_tensors(self, tensors) -> int:
        hf = {k: v.float().numpy() if hasattr(v, "float") else v for k, v in dict(tensors).items()}
        self.inner.update_weights(mapping.hf_to_flat(hf, self.model_config))  # MappingError on bad names
        self.loads += 1
        return len(hf)

    def load_hf_dir(self, path) -> int:
        from converters.safetensors_io import SafetensorsFolder

        if not sorted(Path(path).glob("*.safetensors")):
            raise FileNotFoundError(f"load_hf_dir: no *.safetensors files in {path}")
        folder = SafetensorsFolder(path)
        try:
            return self.load_hf_tensors({k: folder[k] for k in folder})
        finally:
            folder.close()

    def reset_prefix_cache(self) -> None:
        pass
