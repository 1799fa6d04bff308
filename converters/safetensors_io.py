"""Reading and writing HF safetensors folders, lazily and atomically.

Reading: ``SafetensorsFolder(dir)`` is a read-only ``Mapping[name, np.ndarray]`` over a folder's
``model.safetensors`` or the shards listed in ``model.safetensors.index.json``; each lookup opens the file, copies one
tensor out and closes it, so a conversion never holds the whole checkpoint twice.

Writing: ``write_safetensors`` consumes an iterator of ``(name, array)`` and writes shards of at
most ``max_shard_bytes`` (a single tensor larger than that gets a shard of its own), naming them
like transformers does (``model.safetensors`` when one file suffices, else
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``). ``atomic_dir`` makes a
whole output folder appear at once: everything is written into a hidden temporary sibling that is
renamed onto the target at the end and removed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # "5GB", as transformers counts it


class SafetensorsFolder(Mapping[str, np.ndarray]):
    """Lazy name -> tensor mapping over one HF model folder.

    Raises (on construction):
      FileNotFoundError: the folder has neither ``model.safetensors`` nor an index, or the index
        names a shard file that does not exist.
      ValueError: the index or a safetensors header cannot be parsed (names the file).
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            self._where = {name: self.folder / file for name, file in weight_map.items()}
        elif single.exists():
            self._where = {name: single for name in self._keys_of(single)}
        else:
            found = sorted(p.name for p in self.folder.glob("*")) if self.folder.is_dir() else None
            hint = " (pytorch_model.bin checkpoints are not supported: re-save with safe_serialization)"
            raise FileNotFoundError(
                f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}"
                + (f"; folder holds {found[:20]}" if found is not None else "; folder does not exist")
                + (hint if found and any(n.endswith(".bin") for n in found) else "")
            )
        for file in sorted(set(self._where.values())):
            if not file.exists():
                raise FileNotFoundError(f"{index}: shard {file.name} listed in weight_map does not exist")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="np") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read safetensors header ({e})") from e

    def __getitem__(self, name: str) -> np.ndarray:
        # Open per tensor: the file's memory map is dropped right after the copy, so resident memory
        # holds the returned arrays only (not the mapped pages of every tensor read so far).
        file = self._where[name]
        try:
            with safe_open(file, framework="np") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._where[name]

    def close(self) -> None:
        """Nothing to release (files are opened per tensor); kept so callers need not care."""


def write_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    out_dir: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes ``tensors`` into ``out_dir`` (which must exist) as one file or shards + index.

    Holds at most one shard's tensors in memory. ``metadata`` defaults to ``{"format": "pt"}``,
    which transformers requires to load the file.

    Args:
      tensors: ``(name, array)`` pairs; names must be unique.
      out_dir: an existing directory (use ``atomic_dir`` for an all-or-nothing folder).
      max_shard_bytes: shard size limit in bytes.
      metadata: safetensors header metadata (string -> string).

    Returns:
      The written file names (the index last when sharded).

    Raises:
      ValueError: a duplicate tensor name or a non-positive ``max_shard_bytes``.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    out = Path(out_dir)
    meta = dict(metadata or {"format": "pt"})
    shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
    seen: set[str] = set()
    total = 0
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            tmp = f".shard-{len(shards):05d}.tmp"
            save_file(pending, str(out / tmp), metadata=meta)
            shards.append((tmp, list(pending)))
            pending, pending_bytes = {}, 0

    for name, array in tensors:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        array = np.ascontiguousarray(array)
        if pending and pending_bytes + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        pending_bytes += array.nbytes
        total += array.nbytes
    flush()
    if not shards:
        raise ValueError("no tensors to write")
    if len(shards) == 1:
        os.replace(out / shards[0][0], out / SINGLE_FILE)
        return [SINGLE_FILE]
    n = len(shards)
    weight_map: dict[str, str] = {}
    files = []
    for i, (tmp, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update(dict.fromkeys(names, final))
        files.append(final)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, INDEX_FILE]


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes ``target`` when the block succeeds.

    The temporary directory is a hidden sibling of ``target`` (same filesystem, so the final
    rename is atomic). On any exception it is deleted and ``target`` is left untouched.

    Args:
      target: the folder to create.
      overwrite: replace an existing ``target`` (the old folder is removed only after the new one
        is complete); otherwise an existing target is an error.

    Raises:
      FileExistsError: ``target`` exists and ``overwrite`` is False.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
