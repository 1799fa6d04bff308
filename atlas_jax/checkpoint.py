"""Orbax checkpoints: a pytree (params or a whole train state) plus a JSON metadata item per step.

Layout of a checkpoint directory (an orbax ``CheckpointManager`` root)::

    DIR/
      model_config.json      optional, written by ``write_json`` (e.g. the ModelConfig)
      hf/                    optional assets (tokenizer files, generation_config.json)
      <step>/state/          the pytree (numpy or jax arrays; flat "a/b/c" dicts are fine)
      <step>/meta/           a JSON dict (step counters, data position, anything small)

Typical use::

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, save_every=100, async_save=True)
    ckpt.save(step, state, meta={"tokens_seen": n})       # skipped unless step % save_every == 0
    ckpt.wait()                                           # before reading it back / exiting
    state = Checkpointer(path).restore(mesh=mesh, shardings=shardings)

``restore`` builds an abstract target (``jax.ShapeDtypeStruct`` with a sharding) from the stored
metadata, so arrays are read straight onto their devices: with ``shardings`` (a pytree of
``jax.sharding.Sharding`` matching the state, or one sharding for every leaf), with ``mesh`` alone
(replicated on the mesh), or as host numpy arrays when neither is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
_STATE = "state"
_META = "meta"
_COMMIT = "commit_success.txt"  # orbax's marker of a finished write (also on local file systems)
QUARANTINE = "quarantine"  # unreadable or incomplete steps are moved here, never deleted


class Checkpointer:
    """Small wrapper over ``orbax.checkpoint.CheckpointManager``.

    Args:
      directory: checkpoint root (created if needed).
      max_to_keep: keep only the newest K steps (None keeps all).
      save_every: ``save`` writes only steps divisible by this (``force=True`` overrides).
      async_save: write in a background thread; call ``wait()`` before reading the step back.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = None,
        save_every: int = 1,
        async_save: bool = False,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
        )
        # Handlers are registered up front so a fresh manager can read metadata of existing steps.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(
        self, step: int, state: PyTree, *, meta: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Saves ``state`` (any pytree of arrays) and ``meta`` (JSON-serialisable) as ``step``.

        Returns:
          Whether a checkpoint was started (False when ``step`` is not due under ``save_every``).
        """
        json.dumps(meta or {})  # Fail here, naming nothing half-written, if meta is not JSON.
        try:
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(meta or {}))}
                ),
                force=force,
            )
        except OSError as e:  # e.g. ENOSPC: orbax leaves only a tmp folder, which is never restored
            raise OSError(
                e.errno,
                f"{self.directory}: checkpoint step {step} was not written ({e}); the complete steps "
                f"{self.complete_steps()} are intact",
            ) from e

    def _step(self, step: int | None) -> int:
        steps = self.complete_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory}: no checkpoint steps found")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no step {step} (have {steps})")
        return step

    def stored_metadata(self, step: int | None = None) -> PyTree:
        """The stored state's tree of array metadata (``.shape``, ``.dtype``), read without any array."""
        return self._manager.item_metadata(self._step(step))[_STATE].tree

    def abstract_state(
        self,
        step: int | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        shardings: PyTree | jax.sharding.Sharding | None = None,
    ) -> PyTree:
        """The stored state as ``jax.ShapeDtypeStruct`` leaves carrying the requested shardings."""
        step = self._step(step)
        tree = self.stored_metadata(step)
        if shardings is None and mesh is not None:
            shardings = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if shardings is None:
            return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
        if isinstance(shardings, jax.sharding.Sharding):
            return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings), tree)
        try:
            return jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings
            )
        except ValueError as e:
            raise ValueError(
                f"{self.directory}/{step}: shardings do not match the stored state's structure ({e})"
            ) from e

    def restore(
        self,
        step: int | None = None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        shardings: PyTree | jax.sharding.Sharding | None = None,
    ) -> PyTree:
        """Restores the state of ``step`` (default: latest).

        Args:
          step: which step; None for the newest.
          mesh: with no ``shardings``, restore every array replicated on this mesh.
          shardings: a pytree of shardings matching the state, or one sharding for all leaves;
            arrays are read directly into these shardings.

        Returns:
          The state pytree: jax arrays when ``mesh``/``shardings`` is given, else numpy arrays.

        Raises:
          FileNotFoundError: no such step.
          ValueError: ``shardings`` does not match the stored structure.
        """
        step = self._step(step)
        # The target makes orbax read straight into the requested shardings (or host numpy).
        target = self.abstract_state(step, mesh=mesh, shardings=shardings)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )
        return restored[_STATE]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with ``step`` (default: latest)."""
        step = self._step(step)
        return dict(
            self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        )

    def latest_step(self) -> int | None:
        """The newest complete step (see ``complete_steps``), or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Every step folder orbax lists, complete or not."""
        return sorted(self._manager.all_steps())

    def complete_steps(self) -> list[int]:
        """Steps whose save was committed: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it
        (never listed), then ``commit_success.txt`` in the step and in each item; a step folder without
        them (a kill mid-write on a file system without atomic renames) is never restored."""
        return [s for s in self.all_steps() if _committed(self.directory / str(s))]

    def quarantine(self, step: int, reason: str) -> Path:
        """Moves step folder ``step`` to ``DIR/quarantine/<step>-<n>`` (kept, never restored or overwritten).

        Returns:
          Its new path.
        """
        src = self.directory / str(step)
        dest_root = self.directory / QUARANTINE
        dest_root.mkdir(exist_ok=True)
        n = 0
        while (dest := dest_root / f"{step}-{n}").exists():
            n += 1
        os.replace(src, dest)
        (dest / "REASON.txt").write_text(reason + "\n")
        self._manager.reload()
        return dest

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed.

        Raises:
          OSError: a background write failed (e.g. a full disk); the message lists the intact steps.
        """
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise OSError(
                e.errno,
                f"{self.directory}: a checkpoint write failed ({e}); the complete steps "
                f"{self.complete_steps()} are intact",
            ) from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _committed(step_dir: Path) -> bool:
    return (step_dir / _COMMIT).is_file() and (step_dir / _STATE / _COMMIT).is_file()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as JSON atomically (temp file + rename) so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Reads JSON, raising ``FileNotFoundError``/``ValueError`` that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e})") from e
