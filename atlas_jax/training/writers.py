"""Where training metrics go: a JSONL file, TensorBoard event files, a tqdm bar and episode samples.

Layout under the run folder::

    metrics.jsonl            one {"step": s, "time": t, name: value, ...} record per logged step
    tensorboard/             tensorboardX event files (same scalars)
    samples/step_<s>.jsonl   teaching episodes (problem, probe, teaching, answers, reward) per eval

On resume from step s the JSONL keeps only records with ``step <= s`` (those after it are re-done),
so a killed-and-resumed run has the same metric history as an uninterrupted one.

In a multi-process run only the main process (``atlas_jax.distributed.is_main_process``) writes; the
others get a writer that builds the same records but touches no file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _scalar(v: Any) -> float | int | None:
    x = np.asarray(v)
    if x.size != 1:
        return None
    x = x.item()
    if isinstance(x, bool):
        return int(x)
    return x if isinstance(x, int) else float(x)


class MetricsWriter:
    """Writes scalar metrics to JSONL (+ TensorBoard) and episode samples to JSONL.

    Args:
      output_dir: the run folder.
      tensorboard: also write TensorBoard event files.
      resume_step: when resuming, drop JSONL records after this step.
      enabled: write files; default: only on the main process of a multi-process run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        enabled: bool | None = None,
    ):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.enabled = _is_main_process() if enabled is None else bool(enabled)
        self._file = self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate(resume_step or 0)
        self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def _truncate(self, keep_upto: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill is dropped
                if json.loads(line).get("step", 0) <= keep_upto:
                    kept.append(line)
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Logs every scalar of ``metrics`` at ``step``; returns the record written."""
        record: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            x = _scalar(v)
            if x is not None:
                record[k] = x if not (isinstance(x, float) and not math.isfinite(x)) else str(x)
        if self._file is None:
            return record
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
        return record

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]], name: str = "step") -> Path:
        """Writes episode samples as ``samples/<name>_<step>.jsonl`` (atomically); returns that path."""
        path = self.dir / "samples" / f"{name}_{step}.jsonl"
        if not self.enabled:
            return path
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text("".join(json.dumps(dict(s), default=str) + "\n" for s in samples))
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _is_main_process() -> bool:
    from atlas_jax import distributed

    return distributed.is_main_process()


def read_metrics(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` in a run folder."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase: ``with timer("update"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        """Returns ``{"time/<phase>": seconds}`` and resets."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out


def progress_bar(total: int, initial: int, desc: str, enabled: bool = True):
    """A tqdm bar (with ETA) over optimiser steps, starting at ``initial`` when resuming (main process only)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and _is_main_process()),
        dynamic_ncols=True,
    )
