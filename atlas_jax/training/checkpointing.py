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
import numpy as np
from absl import logging

from atlas_jax import distributed
from atlas_jax.checkpoint import Checkpointer
from atlas_jax.training.train_step import TrainState


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
        leaves, treedef = jax.tree.flatten(template.opt_state)
        extra = dict(extra or {})
        shardings = {
            "params": {k: v.sharding for k, v in template.params.items()},
            "opt": {_leaf_key(i): x.sharding for i, x in enumerate(leaves)},
            "step": template.step.sharding,
            "rng": template.step.sharding,
            **{k: jax.tree.map(lambda x: x.sharding, v) for k, v in extra.items()},
        }
        tree = self._restore_newest_readable(template, len(leaves), shardings)
        opt = jax.tree.unflatten(treedef, [tree["opt"][_leaf_key(i)] for i in range(len(leaves))])
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=opt)
        rng = jax.random.wrap_key_data(np.asarray(tree["rng"]), impl=jax.random.key_impl(rng_template))
        meta = self._ckpt.restore_meta()
        return state, rng, {k: tree[k] for k in extra}, meta

    def _restore_newest_readable(self, template: TrainState, num_opt: int, shardings: dict) -> dict:
        """The newest complete step that matches ``template`` and reads; unreadable ones are quarantined.

        A step from another model (names/shapes differ) raises; a step whose files cannot be read
        (corrupted, truncated) is moved to ``quarantine/`` with a warning and the next older one is tried.
        """
        while (step := self._ckpt.latest_step()) is not None:
            try:
                stored = self._ckpt.stored_metadata(step)
            except Exception as e:
                self._set_aside(step, e)
                continue
            _check_matches(self.directory / str(step), template, num_opt, stored, set(shardings))
            try:
                return self._ckpt.restore(step, shardings=shardings)
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
