"""Logical axis names -> mesh axes: one rules table for parameters and activations.

Every parameter carries its logical axis names as the Variable metadata ``logical_axes`` (set by `param`). `RULES`
maps each logical name to mesh axes of the 3-D mesh ("data", "fsdp", "tensor"); `spec_for` turns names + shape into
a `PartitionSpec`, replicating any dimension the mesh axes do not divide (e.g. 1 kv head on a tensor axis of 2), so
every preset shards on every mesh shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# One rule per logical axis. Parameters: FSDP shards the model dimension, tensor parallelism the heads / MLP / vocab.
# Activations: batch over (data, fsdp); sequence and features replicated.
RULES: dict[str, tuple[str, ...] | None] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "layers": None,  # the stacked-layer axis of scanned parameters (replicated: every device runs every layer)
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_vocab": None,
}

LOGICAL_AXES_KEY = "logical_axes"


def param(
    init: Callable[..., jax.Array],
    key: jax.Array,
    shape: Sequence[int],
    dtype: jnp.dtype,
    axes: tuple[str, ...],
) -> nnx.Param:
    """Creates an `nnx.Param` initialised by ``init(key, shape, dtype)`` and tagged with logical ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    unknown = [a for a in axes if a not in RULES]
    if unknown:
        raise ValueError(f"unknown logical axis name(s) {unknown}; add them to sharding.RULES")
    return nnx.Param(init(key, tuple(shape), dtype), **{LOGICAL_AXES_KEY: axes})


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices).

    Raises:
      ValueError: ``mesh_shape`` is not 3 positive ints whose product equals the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"mesh_shape={tuple(mesh_shape)}: expected 3 positive ints for axes {MESH_AXES}")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh_shape={shape} (data, fsdp, tensor) has {int(np.prod(shape))} slots but there are "
            f"{len(devices)} devices; the product must equal the device count"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def spec_for(
    axes: Sequence[str | None], shape: Sequence[int], mesh_axis_sizes: dict[str, int], rules=RULES
) -> PartitionSpec:
    """PartitionSpec for a tensor with logical ``axes`` and ``shape``.

    A dimension is sharded over the rule's mesh axes only if their total size divides it; a mesh axis is used at
    most once per tensor (first dimension wins).
    """
    used: set[str] = set()
    out: list[tuple[str, ...] | None] = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in (rules.get(name) or ()) if a in mesh_axis_sizes and a not in used)
        mesh_axes = tuple(a for a in mesh_axes if mesh_axis_sizes[a] > 1)
        size = int(np.prod([mesh_axis_sizes[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


def _var_axes(v: nnx.Variable) -> tuple[str, ...] | None:
    return v.get_metadata().get(LOGICAL_AXES_KEY)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A State of `NamedSharding`s (same structure as ``state``) from each Param's logical axes.

    Variables without logical axes (e.g. RNG state) are replicated.
    """
    sizes = _axis_sizes(mesh)

    def one(v: nnx.Variable) -> nnx.Variable:
        axes = _var_axes(v)
        spec = PartitionSpec() if axes is None else spec_for(axes, v.get_value().shape, sizes)
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """``jax.device_put`` every leaf of ``state`` with the sharding the rules give it."""
    return jax.device_put(state, state_shardings(state, mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves ``model``'s variables onto ``mesh`` in place (per the rules) and returns the model."""
    nnx.update(model, shard_state(nnx.state(model), mesh))
    return model


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint from logical ``axes``; a no-op unless a mesh is set (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = spec_for(axes, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)))
    return jax.lax.with_sharding_constraint(x, spec)
