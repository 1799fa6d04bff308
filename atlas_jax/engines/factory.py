"""Engine construction by name, for configs: ``make_engine("vllm", model_dir=...)``.

Kinds: "jax" (``JaxSampler``, the embedded default), "vllm" (``VLLMEngine``, in-process),
"vllm_server" (``ServerEngine``, remote ``launch.serve``), "openai" (``OpenAIEngine``). Imports are lazy so
that a run without vLLM never imports it. A run builds its engines from the config in one place,
``atlas_jax.training.engine_setup`` (``rl_setup.student_engine`` / ``teacher_engine``), through this registry.
"""

from __future__ import annotations

import importlib
from typing import Any

from atlas_jax.engines.base import Engine

ENGINES: dict[str, str] = {
    "jax": "atlas_jax.engines.jax_sampler:JaxSampler",
    "vllm": "atlas_jax.engines.vllm_engine:VLLMEngine",
    "vllm_server": "atlas_jax.engines.server_client:ServerEngine",
    "openai": "atlas_jax.engines.openai_client:OpenAIEngine",
}
ENGINE_KINDS: tuple[str, ...] = tuple(ENGINES)


def engine_class(kind: str) -> type[Engine]:
    """The engine class registered as ``kind``.

    Raises:
      ValueError: unknown kind (the message lists the known ones).
    """
    try:
        target = ENGINES[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; known: {sorted(ENGINES)}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def make_engine(kind: str, *args: Any, **kwargs: Any) -> Engine:
    """``engine_class(kind)(*args, **kwargs)``."""
    return engine_class(kind)(*args, **kwargs)
