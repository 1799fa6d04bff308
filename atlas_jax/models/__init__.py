"""Flax NNX decoder (Qwen3, Qwen2, Llama), KV cache, sharding rules, presets. Contract: docs/internals.md."""

from atlas_jax.models.config import ModelConfig, RopeScaling
from atlas_jax.models.decoder import Decoder
from atlas_jax.models.kv_cache import KVCache
from atlas_jax.models.params import build_model, flatten, param_count, unflatten
from atlas_jax.models.sharding import make_mesh, shard_model

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "build_model",
    "flatten",
    "make_mesh",
    "param_count",
    "shard_model",
    "unflatten",
]
