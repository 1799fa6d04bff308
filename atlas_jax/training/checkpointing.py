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
        try:
            tree = self._ckpt.restore(shardings=shardings)
        except ValueError as e:
            raise ValueError(
                f"{self.directory}: checkpoint does not match this model/optimiser (use a new "
                f"--config.output_dir or --config.checkpoint.resume=False): {e}"
            ) from e
        missing = sorted(set(template.params) ^ set(tree["params"]))
        if missing or len(tree["opt"]) != len(leaves):
            raise ValueError(
                f"{self.directory}: checkpoint params/optimiser differ from this run ({missing[:5]})"
            )
        opt = jax.tree.unflatten(treedef, [tree["opt"][_leaf_key(i)] for i in range(len(leaves))])
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=opt)
        rng = jax.random.wrap_key_data(np.asarray(tree["rng"]), impl=jax.random.key_impl(rng_template))
        meta = self._ckpt.restore_meta()
        return state, rng, {k: tree[k] for k in extra}, meta

    def wait(self) -> None:
        self._ckpt.wait()

    def close(self) -> None:
        self._ckpt.close()
