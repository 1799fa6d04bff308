"""The jitted train step: exact gradient accumulation over micro-batches, sharded over the mesh.

The train state is a plain pytree: ``params`` (a flat ``{"a/b/c": array}`` dict of master weights,
sharded by the model's rules), ``opt_state`` (optax, sharded like the params) and ``step``.
The model's graph definition is static; each step merges it with the params being differentiated.

Accumulation (why not ``optax.MultiSteps``): a loss is ``Σ_k s_k / Σ_k d_k`` over micro-batches k
(``s`` = loss numerator, ``d`` = its denominator, e.g. token counts). The step scans the micro-batches,
summing ``∇s_k``, ``s_k`` and ``d_k``, and divides once: the gradient equals the big-batch gradient
exactly, not a mean of per-micro-batch means.

Micro-batch k takes rows ``k, k+n, k+2n, …`` of the batch (a strided split), so every micro-batch
stays spread over all ``data``/``fsdp`` shards instead of living on a few devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atlas_jax.models import params as params_lib
from atlas_jax.training.nan_guard import keep_if_finite

Batch = dict[str, jax.Array]
# loss_fn(model, micro_batch) -> (loss_sum, denominator, {name: sum}) — see training/losses.py.
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
BATCH_AXES = ("data", "fsdp")


@flax.struct.dataclass
class TrainState:
    """What the optimiser carries from step to step (all leaves are arrays)."""

    step: jax.Array
    params: dict[str, jax.Array]
    opt_state: Any


class under_mesh:
    """``jitted`` called, lowered and traced under ``jax.set_mesh(mesh)`` (activation constraints apply).

    Calls behave like ``jitted(...)``; ``.lower(...)`` (AOT: ``.lower(...).compile()``) also enters the mesh.
    """

    def __init__(self, mesh: Mesh, jitted: Callable):
        self.mesh, self.jitted = mesh, jitted
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ``data`` × ``fsdp``; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, jax.Array], nnx.State]:
    """``(graphdef, flat params, other state)``; only ``nnx.Param`` leaves are trained."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params_lib.flatten(params), rest


def merge_model(graphdef: nnx.GraphDef, flat: dict[str, jax.Array], rest: nnx.State) -> nnx.Module:
    """Inverse of ``split_model`` (inside or outside jit)."""
    return nnx.merge(graphdef, params_lib.unflatten(flat), rest)


def state_shardings(tx: optax.GradientTransformation, params: dict[str, jax.Array], mesh: Mesh) -> TrainState:
    """Shardings of a ``TrainState``: optimiser moments follow their parameter, counters replicate."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = {k: v.sharding for k, v in params.items()}
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: replicated
    )
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def init_state(tx: optax.GradientTransformation, params: dict[str, jax.Array], mesh: Mesh) -> TrainState:
    """A fresh state around already-sharded ``params`` (optimiser moments created in place)."""
    shardings = state_shardings(tx, params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def split_micro(batch: Batch, num_micro: int) -> Batch:
    """``[B, ...] → [n, B/n, ...]`` with micro-batch k = rows ``k, k+n, …`` (see module docstring)."""

    def one(x):
        b = x.shape[0]
        if b % num_micro:
            raise ValueError(f"batch of {b} rows does not split into {num_micro} micro-batches")
        return x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(one, batch)


def accumulate(
    graphdef: nnx.GraphDef, rest: nnx.State, loss_fn: LossFn, params: dict, batch: Batch, num_micro: int
) -> tuple[dict, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Sums ``(∇s, s, d, aux)`` over micro-batches with ``lax.scan``; returns ``(grad_sum, s, d, aux)``."""

    def sum_loss(p, mb):
        s, d, aux = loss_fn(merge_model(graphdef, p, rest), mb)
        return s, (d, aux)

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
    micro = split_micro(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda p, mb: sum_loss(p, mb)[1][1], params, first)
    zeros = (
        jax.tree.map(jnp.zeros_like, params),
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
    )

    def body(carry, mb):
        g_acc, s_acc, d_acc, aux_acc = carry
        (s, (d, aux)), g = grad_fn(params, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)
        aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
        return (g_acc, s_acc + s, d_acc + d, aux_acc), None

    (g, s, d, aux), _ = jax.lax.scan(body, zeros, micro)
    return g, s, d, aux


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    num_micro: int,
    mesh: Mesh,
    shardings: TrainState,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``step(state, batch) -> (new_state, metrics)``, jitted with explicit shardings.

    ``state`` is donated (its buffers are reused for the new state). ``metrics`` holds ``loss``
    (``Σs / Σd``), ``denominator``, ``grad_norm`` (before clipping), ``skipped`` (1 when a non-finite
    loss/gradient left the state unchanged, ``nan_guard.keep_if_finite``) and every aux sum from ``loss_fn``
    under its own name; the host reads them one step late so dispatch never waits on the device.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, batch: Batch):
        g, s, d, aux = accumulate(graphdef, rest, loss_fn, state.params, batch, num_micro)
        d_safe = jnp.maximum(d, 1e-9)
        grads = jax.tree.map(lambda x: x / d_safe, g)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": s / d_safe, "denominator": d, "grad_norm": optax.global_norm(grads), **aux}
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        # A non-finite loss or gradient leaves the whole state as it was (training/nan_guard.py).
        new, metrics["skipped"] = keep_if_finite(new, state, metrics["loss"], metrics["grad_norm"])
        return new, metrics

    jitted = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    return under_mesh(mesh, jitted)


def make_eval_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    loss_fn: LossFn,
    *,
    num_micro: int,
    mesh: Mesh,
    param_shardings: Any,
) -> Callable[[dict, Batch], dict[str, jax.Array]]:
    """``eval(params, batch) -> {"loss_sum", "denominator", aux…}`` summed over micro-batches, no gradients."""

    def sums(params, mb):
        s, d, aux = loss_fn(merge_model(graphdef, params, rest), mb)
        return {"loss_sum": s, "denominator": d, **aux}

    def evaluate(params, batch):
        micro = split_micro(batch, num_micro)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(sums, params, first))

        def body(carry, mb):
            return jax.tree.map(jnp.add, carry, sums(params, mb)), None

        return jax.lax.scan(body, zeros, micro)[0]

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(evaluate, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=replicated)
    return under_mesh(mesh, jitted)


def make_score_fn(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    fn: Callable[[nnx.Module, Batch], jax.Array],
    *,
    num_micro: int,
    mesh: Mesh,
    param_shardings: Any,
) -> Callable[[dict, Batch], jax.Array]:
    """``score(params, batch) -> fn(model, rows)`` for every row, computed micro-batch by micro-batch.

    Used for the stored old / reference log-probs (forward only). Rows come back in batch order.
    """

    def score(params, batch):
        # The model is merged inside the mapped body (as in ``accumulate``): NNX transforms in it (remat
        # layers, model.remat=True) refuse Variables made at the outer trace level.
        out = jax.lax.map(
            lambda mb: fn(merge_model(graphdef, params, rest), mb), split_micro(batch, num_micro)
        )
        return out.swapaxes(0, 1).reshape(-1, *out.shape[2:])

    jitted = jax.jit(
        score, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=batch_sharding(mesh)
    )
    return under_mesh(mesh, jitted)
