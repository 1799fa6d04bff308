"""Reading rows from local files, saved dataset folders or the hub, with errors that name file and row.

Sources (``load_rows(source)``):
- ``*.jsonl``: parsed line by line by us so a malformed line is reported with its line number
  (blank lines are skipped); row numbers in later errors are these line numbers.
- ``*.json`` / ``*.parquet``: read with ``datasets.load_dataset("json"|"parquet", data_files=...)``.
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``
  (for a DatasetDict, ``split`` picks the split).
- anything else that looks like ``owner/name`` is a hub dataset, tried only when the hub is reachable:
  with ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or when huggingface.co does not answer within a
  few seconds, a ``DataError`` is raised at once instead of hanging.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PROBE_SECONDS = 3.0
T = TypeVar("T")


class DataError(ValueError):
    """Bad input data; the message names the source, the row and the field."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One raw row and where it came from (for error messages).

    Attributes:
      source: the file, folder or hub name.
      number: 1-based line number for jsonl, 0-based row index otherwise.
      fields: the row's fields.
    """

    source: str
    number: int
    fields: dict[str, Any]

    def where(self) -> str:
        """'file.jsonl line 3' or 'data.parquet row 2'."""
        unit = "line" if self.source.endswith(".jsonl") else "row"
        return f"{self.source} {unit} {self.number}"


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable() -> bool:
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=_HUB_PROBE_SECONDS)
    except httpx.HTTPError:
        return False
    return True


def _read_jsonl(path: str) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path} line {number}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(value).__name__}")
            rows.append(Row(path, number, value))
    return rows


def _from_dataset(ds: Any, source: str) -> list[Row]:
    return [Row(source, i, dict(r)) for i, r in enumerate(ds)]


def load_rows(source: str, *, split: str = "train") -> list[Row]:
    """Reads every row of a data source (see the module docstring).

    Raises:
      DataError: missing file, unsupported format, malformed content, or an unreachable hub name.
    """
    import datasets

    if os.path.isdir(source):
        try:
            ds = datasets.load_from_disk(source)
        except FileNotFoundError as e:
            raise DataError(f"{source}: not a saved dataset folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source}: no split {split!r}; available: {sorted(ds)}")
            ds = ds[split]
        return _from_dataset(ds, source)
    if os.path.isfile(source):
        if source.endswith(".jsonl"):
            return _read_jsonl(source)
        builder = {".json": "json", ".parquet": "parquet"}.get(os.path.splitext(source)[1])
        if builder is None:
            raise DataError(
                f"{source}: unsupported file type; use .jsonl, .json, .parquet or a saved dataset dir"
            )
        try:
            ds = datasets.load_dataset(builder, data_files=source, split="train")
        except Exception as e:  # pyarrow / datasets raise many types for bad content
            raise DataError(f"{source}: could not be read as {builder}: {type(e).__name__}: {e}") from None
        return _from_dataset(ds, source)
    looks_local = source.startswith((".", "/", "~")) or os.path.splitext(source)[1] in (
        ".jsonl",
        ".json",
        ".parquet",
    )
    if looks_local or not _HUB_NAME_RE.match(source):
        raise DataError(f"{source}: no such file or folder")
    if _offline():
        raise DataError(
            f"{source}: not a local file or folder, and hub access is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); "
            "download the dataset elsewhere and pass its local path"
        )
    if not _hub_reachable():
        raise DataError(f"{source}: not a local file or folder, and the hub is not reachable from here")
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(f"{source}: hub dataset could not be loaded: {type(e).__name__}: {e}") from None
    return _from_dataset(ds, source)


def require_text(row: Row, field: str, *, allow_empty: bool = False) -> str:
    """The row's ``field`` as a non-empty string.

    Raises:
      DataError: field missing, not a string, or empty; the message names source, row and field.
    """
    if field not in row.fields:
        raise DataError(f"{row.where()}: missing field {field!r} (row has fields {sorted(row.fields)})")
    value = row.fields[field]
    if not isinstance(value, str):
        raise DataError(
            f"{row.where()}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}"
        )
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where()}: field {field!r} is empty")
    return value


def train_eval_split(items: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split: a permutation by ``numpy.random.default_rng(seed)``; the first ⌈n·f⌉ go to eval.

    At least one item is held out when ``eval_fraction > 0`` and there are two or more items; the
    order inside each part follows the original order (so the split depends only on seed and n).

    Raises:
      ValueError: ``eval_fraction`` outside [0, 1).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    n_eval = int(np.ceil(n * eval_fraction)) if eval_fraction > 0 else 0
    n_eval = min(max(n_eval, 1 if (eval_fraction > 0 and n >= 2) else 0), max(n - 1, 0))
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    evaluation = [x for i, x in enumerate(items) if i in held]
    return train, evaluation
