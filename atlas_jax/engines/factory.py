"""``make_engine(kind, **kwargs)``: one place that maps an engine name from the config to a class.

Kinds (``config.engine.student`` / ``config.engine.teacher``):
- ``"jax"``:         ``jax_sampler.JaxSampler(model, tokenizer, ...)`` — our sampler on a param tree;
- ``"vllm"``:        ``vllm_engine.VLLMEngine(model_dir, ...)`` — vLLM in this process;
- ``"vllm_server"``: ``server_client.ServerEngine(urls, ...)`` — our ``launch.serve`` servers;
- ``"openai"``:      ``openai_client.OpenAIEngine(...)`` — any OpenAI-compatible endpoint.
Classes are imported only when asked for, so the JAX default never imports vLLM or torch.
Keyword arguments go to the class unchanged (see each class for what it takes).
"""

from __future__ import annotations

import importlib
from typing import Any

from atlas_jax.engines.base import Engine

ENGINE_KINDS: dict[str, tuple[str, str]] = {
    "jax": ("atlas_jax.engines.jax_sampler", "JaxSampler"),
    "vllm": ("atlas_jax.engines.vllm_engine", "VLLMEngine"),
    "vllm_server": ("atlas_jax.engines.server_client", "ServerEngine"),
    "openai": ("atlas_jax.engines.openai_client", "OpenAIEngine"),
}


def engine_class(kind: str) -> type[Engine]:
    """The engine class registered as ``kind``.

    Raises:
      ValueError: unknown kind (lists the known ones).
      ImportError: the kind's module or its dependencies are not installed (names what is missing).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; known: {sorted(ENGINE_KINDS)}")
    module_name, class_name = ENGINE_KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"engine kind {kind!r} needs {module_name}, which could not be imported: {e}"
        ) from e
    return getattr(module, class_name)


def make_engine(kind: str, *args: Any, **kwargs: Any) -> Engine:
    """Builds the engine named ``kind`` with the given arguments (see the module docstring)."""
    return engine_class(kind)(*args, **kwargs)
