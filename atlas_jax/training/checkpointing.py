"""Train-state checkpoints on top of ``atlas_jax.checkpoint.Checkpointer`` (orbax CheckpointManager).

One checkpoint step holds::

    state/  {"params": flat params, "opt": {"l00000": leaf, ...}, "step": int, "rng": uint32 key data,
             **extra}          (extra: e.g. "ref_params" for an EMA-synced reference)
    meta/   {"step": s, "data": <data-loader position>, ...}

The optimiser state is stored as its list of leaves (its tree structure comes from the optimiser on
restore), so orbax never has to rebuild optax named tuples. ``model_config.json`` and ``hf/`` tokenizer
assets sit beside the steps, which makes the folder a valid input of ``converters.jax_to_hf``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from atlas_jax import distributed
from atlas_jax.checkpoint import Checkpointer
from atlas_jax.training.train_step import TrainState

_LAYERS = "layers/"


def _leaf_key(i: int) -> str:
    return f"l{i:05d}"


class TrainCheckpointer:
    """Saves/restores ``TrainState`` + RNG key + extra trees + data position.

    Args:
      directory: ``<output_dir>/checkpoints``.
      every_steps: save when ``step % every_steps == 0`` (``save(force=True)`` always saves).
      keep: newest checkpoints kept.
      async_save: write in the background (orbax); ``wait()`` before exiting.
    """

    def __init__(self, directory: str | os.PathLike[str], *, every_steps: int, keep: int, async_save: bool):
        self.directory = Path(directory)
        self._ckpt = Checkpointer(
            self.directory, max_to_keep=keep, save_every=max(every_steps, 1), async_save=async_save
        )
        self._every = every_steps
        self._last_saved: int | None = None
        if (
            distributed.is_main_process()
        ):  # a kill mid-write left a step folder: keep it aside, never restore it
            for step in sorted(set(self._ckpt.all_steps()) - set(self._ckpt.complete_steps())):
                where = self._ckpt.quarantine(step, "incomplete: no orbax commit_success.txt")
                logging.warning(
                    "checkpoint step %d is incomplete (no commit marker): moved to %s", step, where
                )
        distributed.sync("atlas_jax.ckpt_scan")

    def latest_step(self) -> int | None:
        return self._ckpt.latest_step()

    def save(
        self,
        step: int,
        state: TrainState,
        rng: jax.Array,
        *,
        data_position: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` as checkpoint ``step`` (the learner's step counter); returns whether it saved."""
        if not force and (self._every <= 0 or step % self._every):
            return False
        if step == self._last_saved or step in self._ckpt.all_steps():
            return False  # e.g. the final forced save of a step the schedule already saved
        leaves = jax.tree.leaves(state.opt_state)
        tree = {
            "params": state.params,
            "opt": {_leaf_key(i): x for i, x in enumerate(leaves)},
            "step": state.step,
            # Host numpy: orbax refuses single-device (host-local) jax.Arrays in a multi-process run.
            "rng": np.asarray(jax.random.key_data(rng)),
            **dict(extra or {}),
        }
        info = {"step": step, "data": dict(data_position), **dict(meta or {})}
        self._last_saved = step
        return self._ckpt.save(step, tree, meta=info, force=True)

    def restore(
        self, template: TrainState, rng_template: jax.Array, *, extra: Mapping[str, Any] | None = None
    ) -> tuple[TrainState, jax.Array, dict[str, Any], dict[str, Any]]:
        """Restores the newest step into the shardings of ``template`` (a freshly initialised state).

        Returns:
          ``(state, rng, extra, meta)``; ``meta["data"]`` is the data-loader position.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          ValueError: the stored state does not match the template (a different model or optimiser).
        """
        extra = dict(extra or {})
        tree, stored_template, _ = self._restore_newest_readable(template, extra)
        leaves, treedef = jax.tree.flatten(stored_template.opt_state)
        opt = jax.tree.unflatten(treedef, [tree["opt"][_leaf_key(i)] for i in range(len(leaves))])
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=opt)
        restored_extra = {k: tree[k] for k in extra}
        if stored_template is not template:  # pre-scan layout: stack layers/{i}/x into layers/x
            names = set(template.params)
            state = TrainState(
                step=state.step,
                params=_stacked(state.params, template.params),
                opt_state=_map_param_dicts(
                    state.opt_state,
                    jax.tree.map(lambda x: x.sharding, template.opt_state),
                    _stacked,
                    names,
                    _per_layer_names(template.params),
                ),
            )
            restored_extra = {
                k: _map_param_dicts(v, extra[k], _stacked, names, _per_layer_names(template.params))
                for k, v in restored_extra.items()
            }
        rng = jax.random.wrap_key_data(np.asarray(tree["rng"]), impl=jax.random.key_impl(rng_template))
        meta = self._ckpt.restore_meta()
        return state, rng, restored_extra, meta

    def _restore_newest_readable(
        self, template: TrainState, extra: dict[str, Any]
    ) -> tuple[dict, TrainState, dict[str, Any]]:
        """The newest complete step that matches ``template`` and reads; unreadable ones are quarantined.

        A step from another model (names/shapes differ) raises; a step whose files cannot be read
        (corrupted, truncated) is moved to ``quarantine/`` with a warning and the next older one is tried.
        Returns the stored tree and the template (and extras) it was read with: ``template`` itself, or its
        per-layer rewrite for a checkpoint of the pre-scan layout.
        """
        while (step := self._ckpt.latest_step()) is not None:
            try:
                stored = self._ckpt.stored_metadata(step)
            except Exception as e:
                self._set_aside(step, e)
                continue
            where = self.directory / str(step)
            tmpl, ext = template, extra
            if _is_per_layer(stored.get("params", {})) and not _is_per_layer(template.params):
                logging.warning(
                    "%s: checkpoint of the per-layer (pre-scan) layout layers/{i}/...; restacking params and "
                    "optimiser state into layers/... [L, ...]",
                    where,
                )
                tmpl, ext = _per_layer_template(template, extra, where)
            leaves = jax.tree.leaves(tmpl.opt_state)
            shardings = {
                "params": {k: v.sharding for k, v in tmpl.params.items()},
                "opt": {_leaf_key(i): x.sharding for i, x in enumerate(leaves)},
                "step": tmpl.step.sharding,
                "rng": tmpl.step.sharding,
                **{k: jax.tree.map(lambda x: x.sharding, v) for k, v in ext.items()},
            }
            _check_matches(where, tmpl, len(leaves), stored, set(shardings))
            try:
                return self._ckpt.restore(step, shardings=shardings), tmpl, ext
            except Exception as e:
                self._set_aside(step, e)
        raise FileNotFoundError(f"{self.directory}: no readable checkpoint step left (see quarantine/)")

    def _set_aside(self, step: int, error: BaseException) -> None:
        reason = f"unreadable: {type(error).__name__}: {str(error)[:500]}"
        if distributed.is_main_process():
            where = self._ckpt.quarantine(step, reason)
        else:
            where = self.directory / "quarantine"
        distributed.sync(f"atlas_jax.ckpt_quarantine_{step}")
        if not distributed.is_main_process():
            self._ckpt._manager.reload()
        logging.warning("checkpoint step %d %s; moved to %s, trying the previous step", step, reason, where)

    def wait(self) -> None:
        self._ckpt.wait()

    def close(self) -> None:
        self._ckpt.close()


def _check_matches(where: Path, template: TrainState, num_opt: int, stored: dict, trees: set[str]) -> None:
    """Raises ``ValueError`` naming the first tree/param whose name or shape differs (another model config)."""
    hint = "use a new --config.output_dir, or --config.checkpoint.resume=False to start over"
    if set(stored) != trees:
        raise ValueError(
            f"{where}: checkpoint holds {sorted(stored)}, this run expects {sorted(trees)} (another config, "
            f"e.g. grpo.beta / ref_update; {hint})"
        )
    params = stored.get("params", {})
    names = sorted(set(template.params) ^ set(params))
    if names:
        raise ValueError(f"{where}: checkpoint from another model config: params {names[:5]} differ ({hint})")
    for k, v in template.params.items():
        if tuple(params[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: checkpoint from another model config: {k} has shape {tuple(params[k].shape)}, "
                f"this run {tuple(v.shape)} ({hint})"
            )
    if len(stored.get("opt", {})) != num_opt:
        raise ValueError(
            f"{where}: checkpoint from another optimiser: {len(stored.get('opt', {}))} state leaves, this run "
            f"{num_opt} ({hint})"
        )


# ------------------------------------------------------------------ checkpoints of the pre-scan (per-layer) layout
def _is_per_layer(params: Mapping[str, Any]) -> bool:
    return any(k.startswith(_LAYERS) and k[len(_LAYERS) :].split("/", 1)[0].isdigit() for k in params)


def _per_layer_names(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """Stacked name -> its per-layer names: ``layers/x`` ([L, ...]) -> ``[layers/0/x, ..., layers/{L-1}/x]``."""
    out = {}
    for k, v in params.items():
        if k.startswith(_LAYERS):
            rest = k[len(_LAYERS) :]
            out[k] = [f"{_LAYERS}{i}/{rest}" for i in range(int(v.shape[0]))]
    return out


def _layer_sharding(sharding: Any, ndim: int) -> Any:
    """The sharding of one layer ``x[i]`` of a stacked array laid out with ``sharding`` (the layer axis dropped)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return sharding  # single-device / replicated shardings fit any shape


def _unstacked_abstract(d: Mapping[str, Any], per_layer: dict[str, list[str]]) -> dict[str, Any]:
    """Abstract per-layer entries (ShapeDtypeStruct with the layer sharding) for a dict of stacked leaves."""
    out: dict[str, Any] = {}
    for k, x in d.items():
        if k not in per_layer or not hasattr(x, "shape"):
            out.update({k: x} if k not in per_layer else dict.fromkeys(per_layer[k], x))
            continue
        sds = jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_layer_sharding(x.sharding, len(x.shape)))
        out.update(dict.fromkeys(per_layer[k], sds))
    return out


def _stacked(d: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
    """``target``'s keys from per-layer ``d``: ``layers/x`` = stack of ``d[layers/{i}/x]`` in ``target[layers/x]``'s
    sharding (``target`` leaves: arrays or shardings); other keys are taken from ``d`` as they are."""
    out = {}
    for name, tgt in target.items():
        if not name.startswith(_LAYERS):
            out[name] = d[name]
            continue
        rest = name[len(_LAYERS) :]
        parts = []
        while (key := f"{_LAYERS}{len(parts)}/{rest}") in d:
            parts.append(d[key])
        if not parts or not hasattr(parts[0], "shape"):  # e.g. optax.MaskedNode: no array to stack
            out[name] = parts[0] if parts else d[name]
            continue
        sharding = tgt if isinstance(tgt, jax.sharding.Sharding) else tgt.sharding
        out[name] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*parts)
    return out


def _map_param_dicts(tree: Any, like: Any, fn, names: set[str], per_layer: dict[str, list[str]]) -> Any:
    """Applies ``fn(per_layer_dict, stacked_like_dict)`` to each per-layer param dict of ``tree``.

    ``like`` is the stacked-layout tree (leaves: arrays or shardings) whose param-shaped dicts (keys = ``names``)
    give the targets; ``tree`` has the same structure with those dicts in the per-layer layout.
    """
    old_names = set(_unstacked_abstract(dict.fromkeys(names), per_layer))
    is_old = lambda x: isinstance(x, dict) and set(x) == old_names  # noqa: E731
    is_new = lambda x: isinstance(x, dict) and set(x) == names  # noqa: E731
    olds = jax.tree.leaves(tree, is_leaf=is_old)
    news = jax.tree.leaves(like, is_leaf=is_new)
    treedef = jax.tree.structure(like, is_leaf=is_new)
    done = [fn(o, n) if is_old(o) else o for o, n in zip(olds, news, strict=True)]
    return jax.tree.unflatten(treedef, done)


def _per_layer_template(
    template: TrainState, extra: dict[str, Any], where: Path
) -> tuple[TrainState, dict[str, Any]]:
    """``template`` (and param-shaped extras) rewritten into the per-layer layout: what the old run saved."""
    names = set(template.params)
    per_layer = _per_layer_names(template.params)
    if not per_layer:
        raise ValueError(
            f"{where}: checkpoint of the per-layer layout layers/{{i}}/..., but this model has no stacked layers/ "
            "params (another model config; use a new --config.output_dir)"
        )
    is_new = lambda x: isinstance(x, dict) and set(x) == names  # noqa: E731

    def rewrite(tree: Any) -> Any:
        return jax.tree.map(
            lambda x: _unstacked_abstract(x, per_layer) if is_new(x) else x, tree, is_leaf=is_new
        )

    params = _unstacked_abstract(template.params, per_layer)
    state = TrainState(step=template.step, params=params, opt_state=rewrite(template.opt_state))
    return state, {k: rewrite(v) for k, v in extra.items()}
