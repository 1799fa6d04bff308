"""Flat parameter dicts ("a/b/c" -> array) and model construction, optionally sharded onto a mesh.

`build_model` with a mesh never materialises an unsharded full-size model: the abstract model comes from
`nnx.eval_shape`, and parameters are either initialised inside a jit with ``out_shardings`` or placed shard by
shard from ``flat_params`` with ``jax.device_put``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from atlas_jax.models.config import ModelConfig
from atlas_jax.models.decoder import Decoder
from atlas_jax.models.sharding import state_shardings


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flatten(state: nnx.State | nnx.Module) -> dict[str, jax.Array]:
    """``{"layers/attn/q_proj/kernel": array [L, D, N, H], ...}`` from a model or its state (wrappers removed)."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        out[_key(path)] = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    return out


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
    """Nested dict from a flat dict (digit components become int keys).

    The result can be given to ``nnx.update(model, ...)`` or compared with ``nnx.state(model).to_pure_dict()``.
    """
    root: dict = {}
    for key, value in flat.items():
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"flat params: {key!r} nests under a leaf")
        if parts[-1] in node:
            raise ValueError(f"flat params: duplicate key {key!r}")
        node[parts[-1]] = value
    return root


_UNSTACKED = re.compile(r"^layers/(\d+)/(.+)$")


def stack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Restacks the per-layer layout of older checkpoints (``layers/{i}/x`` -> ``layers/x`` of shape ``[L, ...]``).

    Flat params already in the stacked layout are returned unchanged (as a new dict).

    Raises:
      ValueError: the per-layer paths do not cover layers 0..L-1 for every tensor, or mix both layouts.
    """
    groups: dict[str, dict[int, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        m = _UNSTACKED.match(key)
        if m is None:
            out[key] = value
        else:
            groups.setdefault(m.group(2), {})[int(m.group(1))] = value
    if not groups:
        return out
    num_layers = 1 + max(max(g) for g in groups.values())
    for name, layers in groups.items():
        if sorted(layers) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(layers))
            raise ValueError(f"per-layer params: layers/{{i}}/{name} is missing layer(s) {missing[:8]}")
        if f"layers/{name}" in out:
            raise ValueError(f"flat params hold both layers/{name} and per-layer layers/{{i}}/{name}")
        out[f"layers/{name}"] = np.stack([np.asarray(layers[i]) for i in range(num_layers)])
    return out


def abstract_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and metadata at zero memory."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (from the abstract model, no memory used)."""
    return sum(math.prod(x.shape) for x in flatten(nnx.state(abstract_model(cfg), nnx.Param)).values())


@functools.lru_cache(maxsize=8)
def _sharded_init(cfg: ModelConfig, mesh: Mesh):
    """A jitted ``key -> State`` initialiser whose outputs are laid out on ``mesh`` (cached per cfg and mesh)."""
    shardings = state_shardings(nnx.state(abstract_model(cfg)), mesh)
    return jax.jit(lambda key: nnx.state(Decoder(cfg, rngs=nnx.Rngs(key))), out_shardings=shardings)


def build_model(
    cfg: ModelConfig,
    flat_params: Mapping[str, np.ndarray | jax.Array] | None = None,
    mesh: Mesh | None = None,
    seed: int = 0,
) -> Decoder:
    """A `Decoder`, randomly initialised (``seed``) or loaded from ``flat_params``, sharded onto ``mesh`` if given.

    Args:
      cfg: the architecture.
      flat_params: path -> array for every parameter (see docs/internals.md); cast to ``cfg.param_dtype``.
        The per-layer layout of older checkpoints (``layers/{i}/...``) is restacked (`stack_layers`).
      mesh: place each parameter with the sharding its logical axes give on this mesh.
      seed: init seed when ``flat_params`` is None.

    Raises:
      ValueError: ``flat_params`` misses or adds a path, or a shape does not match (names the path).
    """
    abstract = abstract_model(cfg, seed)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh) if mesh is not None else None

    if flat_params is None:
        if mesh is None:
            return Decoder(cfg, rngs=nnx.Rngs(seed))
        # Each device creates only its shards: the full model never exists unsharded.
        return nnx.merge(graphdef, _sharded_init(cfg, mesh)(jax.random.key(seed)))

    flat_params = stack_layers(flat_params)
    expected = flatten(abs_state)
    missing = sorted(set(expected) - set(flat_params))
    unexpected = sorted(set(flat_params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"flat params do not match {cfg.model_type} model: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    flat_shardings = flatten(shardings) if shardings is not None else {}
    values = {}
    for key, spec in expected.items():
        x = flat_params[key]
        if tuple(x.shape) != tuple(spec.shape):
            raise ValueError(f"flat params: {key!r} has shape {tuple(x.shape)}, expected {tuple(spec.shape)}")
        x = x.astype(spec.dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(spec.dtype, copy=False)
        values[key] = jax.device_put(x, flat_shardings[key]) if key in flat_shardings else jnp.asarray(x)
    nnx.replace_by_pure_dict(abs_state, unflatten(values))
    return nnx.merge(graphdef, abs_state)
