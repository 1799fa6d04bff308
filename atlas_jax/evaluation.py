"""Evaluation harness: the student alone vs the student with each teacher, on held-out problems.

For every evaluation seed s and problem i the harness runs the two-pass protocol once per teacher
(``TwoPassRollout`` with G = 1): the student answers alone k times (p0, shared by all teachers of that
seed), writes one probe, the teacher writes one teaching, the student answers m times with it (p1).
An *interaction* is one (seed, problem, teacher) triple, Δ = p1 − p0.

Per arm (``arm_summary``):
- accuracy           = mean over seeds and problems of the pass rate (p0 alone, p1 with a teacher);
- accuracy_ci        = percentile bootstrap CI of that mean, resampling problems (each problem's pass
                       rate averaged over seeds first, so seeds are not counted as independent problems);
- lr, ndr, les       = ``atlas_jax.metrics`` over all interactions (None for the student alone);
- completion_rate    = fraction of student answers extracted and not truncated;
- teaching_tokens_mean (None for the student alone), leak_rate, accuracy_by_difficulty,
  accuracy_per_seed, generation_time_s.
The same code evaluates real models: any ``Engine`` for the student and the teachers and any list of
``data.rl.Problem`` (``launch/eval.py`` builds them from a config).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlas_jax.data.rl import Problem
from atlas_jax.engines.base import Engine
from atlas_jax.metrics import learning_efficiency_score, learning_rate, non_degradation_rate
from atlas_jax.protocol.batch import RolloutSettings, StudentSamples
from atlas_jax.protocol.rollout import TwoPassRollout

STUDENT_ARM = "student_alone"


def bootstrap_ci(
    values: Sequence[float], *, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Draws ``num_resamples`` samples of ``len(values)`` values with replacement (numpy
    ``default_rng(seed)``), takes each sample's mean, and returns the (1−c)/2 and (1+c)/2 quantiles
    of those means (c = ``confidence``; numpy's default linear interpolation).

    Raises:
      ValueError: no values, ``num_resamples`` < 1 or ``confidence`` outside (0, 1).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if num_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need num_resamples >= 1 and 0 < confidence < 1, got {num_resamples}, {confidence}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(lo), float(hi)


@dataclasses.dataclass
class ArmOutcomes:
    """Raw outcomes of one arm, indexed [seed][problem].

    Attributes:
      pass_rates: p0 (student alone) or p1 (with the teacher), shape [S, P].
      answers: extracted answers of every student sample (flattened), for the completion rate.
      finish_reasons: finish reason of every student sample (same order as ``answers``).
      p0: baseline pass rates [S, P] (teacher arms only).
      teaching_tokens: teaching length per interaction [S, P] (teacher arms only).
      leaked: leak flag per interaction [S, P] (teacher arms only).
      generation_time_s: seconds spent in engine calls for this arm.
    """

    pass_rates: np.ndarray
    answers: list[str | None]
    finish_reasons: list[str]
    p0: np.ndarray | None = None
    teaching_tokens: np.ndarray | None = None
    leaked: np.ndarray | None = None
    generation_time_s: float = 0.0


def _completion(answers: Sequence[str | None], reasons: Sequence[str]) -> float:
    if not answers:
        return 0.0
    return float(np.mean([a is not None and r != "length" for a, r in zip(answers, reasons, strict=True)]))


def arm_summary(
    outcomes: ArmOutcomes,
    difficulties: Sequence[Any],
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregates one arm's outcomes (see the module docstring for every key)."""
    rates = np.asarray(outcomes.pass_rates, dtype=np.float64)
    if rates.ndim != 2 or rates.shape[1] != len(difficulties):
        raise ValueError(f"pass_rates must be [seeds, {len(difficulties)}], got {rates.shape}")
    per_problem = rates.mean(axis=0)
    levels = sorted({d for d in difficulties}, key=str)
    diffs = np.asarray([str(d) for d in difficulties])
    out: dict[str, Any] = {
        "accuracy": float(rates.mean()),
        "accuracy_ci": list(
            bootstrap_ci(per_problem, num_resamples=num_resamples, confidence=confidence, seed=seed)
        ),
        "ndr": None,
        "lr": None,
        "les": None,
        "completion_rate": _completion(outcomes.answers, outcomes.finish_reasons),
        "teaching_tokens_mean": None,
        "leak_rate": None,
        "accuracy_by_difficulty": {str(d): float(per_problem[diffs == str(d)].mean()) for d in levels},
        "accuracy_per_seed": [float(r) for r in rates.mean(axis=1)],
        "generation_time_s": float(outcomes.generation_time_s),
        "num_seeds": int(rates.shape[0]),
        "num_problems": int(rates.shape[1]),
    }
    if outcomes.p0 is not None:
        deltas = (rates - np.asarray(outcomes.p0, dtype=np.float64)).ravel()
        tokens = np.asarray(outcomes.teaching_tokens).ravel()
        out.update(
            ndr=non_degradation_rate(deltas),
            lr=learning_rate(deltas),
            les=learning_efficiency_score(deltas, tokens),
            teaching_tokens_mean=float(tokens.mean()),
            leak_rate=float(np.mean(outcomes.leaked)) if outcomes.leaked is not None else None,
            num_interactions=int(deltas.size),
        )
    return out


class _TimedEngine(Engine):
    """Adds the seconds spent in ``generate`` to ``self.seconds``."""

    def __init__(self, inner: Engine) -> None:
        self.inner, self.seconds = inner, 0.0

    def generate(self, prompts, params, n=1):
        t0 = time.perf_counter()
        try:
            return self.inner.generate(prompts, params, n)
        finally:
            self.seconds += time.perf_counter() - t0

    @property
    def tokenizer(self):
        return self.inner.tokenizer


def _flat(samples: Sequence[StudentSamples]) -> tuple[list[str | None], list[str]]:
    return [a for s in samples for a in s.answers], [r for s in samples for r in s.finish_reasons]


def run_arms(
    student: Engine,
    teachers: Mapping[str, Engine],
    problems: Sequence[Problem],
    settings: RolloutSettings,
    seeds: Sequence[int],
    *,
    chunk: int = 64,
    progress: bool = True,
) -> dict[str, ArmOutcomes]:
    """Runs every arm on ``problems`` for every seed; returns raw outcomes keyed by arm name.

    ``problems`` are processed ``chunk`` at a time (a fixed batch shape the engines compile once).
    """
    if not problems or not seeds:
        raise ValueError("run_arms needs at least one problem and one seed")
    if STUDENT_ARM in teachers:
        raise ValueError(f"{STUDENT_ARM!r} is reserved for the student-alone arm")
    from tqdm.auto import tqdm

    S, P = len(seeds), len(problems)
    chunks = [list(problems[i : i + chunk]) for i in range(0, P, chunk)]
    bar = tqdm(
        total=S * len(chunks) * (1 + len(teachers)), desc="eval", disable=not progress, dynamic_ncols=True
    )
    timed_student = _TimedEngine(student)
    base = {"rates": np.zeros((S, P)), "samples": [], "time": 0.0}
    arms = {name: {"rates": np.zeros((S, P)), "tokens": np.zeros((S, P)), "leaked": np.zeros((S, P), bool),
                   "samples": [], "time": 0.0} for name in teachers}  # fmt: skip
    for si, seed in enumerate(seeds):
        st = dataclasses.replace(settings, seed=int(seed), group_size=1)
        cache: dict[str, StudentSamples] = {}
        offset = 0
        for ci, probs in enumerate(chunks):
            idx = slice(offset, offset + len(probs))
            offset += len(probs)
            before = timed_student.seconds
            alone = TwoPassRollout(timed_student, timed_student, st)
            alone.baseline_cache = cache
            alone.baselines(probs, step=ci)
            base["time"] += timed_student.seconds - before
            base["rates"][si, idx] = [cache[p.key].pass_rate for p in probs]
            base["samples"].extend(cache[p.key] for p in probs)
            bar.update(1)
            for name, teacher in teachers.items():
                timed_teacher = _TimedEngine(teacher)
                before = timed_student.seconds
                rollout = TwoPassRollout(timed_student, timed_teacher, st)
                rollout.baseline_cache = cache
                batch = rollout.run(probs, step=ci)
                a = arms[name]
                a["time"] += timed_teacher.seconds + timed_student.seconds - before
                eps = [g.episodes[0] for g in batch.groups]
                a["rates"][si, idx] = [e.p1 for e in eps]
                a["tokens"][si, idx] = [e.teaching_tokens for e in eps]
                a["leaked"][si, idx] = [e.leaked for e in eps]
                a["samples"].extend(e.taught for e in eps)
                bar.update(1)
    bar.close()
    out = {STUDENT_ARM: ArmOutcomes(base["rates"], *_flat(base["samples"]), generation_time_s=base["time"])}
    for name, a in arms.items():
        out[name] = ArmOutcomes(a["rates"], *_flat(a["samples"]), p0=base["rates"], teaching_tokens=a["tokens"],
                                leaked=a["leaked"], generation_time_s=a["time"])  # fmt: skip
    return out


def summarize(
    outcomes: Mapping[str, ArmOutcomes],
    difficulties: Sequence[Any],
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``{arm: arm_summary}`` plus, for each teacher arm, ``gain_over_student`` with a paired bootstrap CI."""
    summary: dict[str, Any] = {
        name: arm_summary(o, difficulties, num_resamples=num_resamples, confidence=confidence, seed=seed)
        for name, o in outcomes.items()
    }
    if STUDENT_ARM in outcomes:
        alone = np.asarray(outcomes[STUDENT_ARM].pass_rates).mean(axis=0)
        for name, o in outcomes.items():
            if name == STUDENT_ARM:
                continue
            diff = np.asarray(o.pass_rates).mean(axis=0) - alone
            summary[name]["gain_over_student"] = float(diff.mean())
            summary[name]["gain_over_student_ci"] = list(
                bootstrap_ci(diff, num_resamples=num_resamples, confidence=confidence, seed=seed)
            )
    return summary


def markdown_table(summary: Mapping[str, Any]) -> str:
    """A markdown table with one row per arm (accuracy with CI, gain, NDR, LR, LES, lengths, time)."""

    def fmt(x: Any, pct: bool = False) -> str:
        if x is None:
            return "—"
        return f"{100 * x:.1f}%" if pct else f"{x:.3g}"

    lines = [
        "| arm | accuracy | 95% CI | gain vs student | NDR | LR | LES | completion | teaching tokens | gen. time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        if not isinstance(s, Mapping) or "accuracy" not in s:
            continue
        lo, hi = s["accuracy_ci"]
        gain = s.get("gain_over_student")
        gain_txt = "—" if gain is None else f"{100 * gain:+.1f} pts"
        lines.append(
            f"| {name} | {fmt(s['accuracy'], True)} | [{100 * lo:.1f}, {100 * hi:.1f}] | {gain_txt} | "
            f"{fmt(s['ndr'], True)} | {fmt(s['lr'])} | {fmt(s['les'])} | {fmt(s['completion_rate'], True)} | "
            f"{fmt(s['teaching_tokens_mean'])} | {s['generation_time_s']:.1f} |"
        )
    by_diff = [
        (name, s["accuracy_by_difficulty"])
        for name, s in summary.items()
        if isinstance(s, Mapping) and "accuracy_by_difficulty" in s
    ]
    if by_diff:
        levels = list(by_diff[0][1])
        lines += ["", "| arm | " + " | ".join(f"difficulty {d}" for d in levels) + " |",
                  "|---|" + "---|" * len(levels)]  # fmt: skip
        for name, acc in by_diff:
            lines.append(f"| {name} | " + " | ".join(fmt(acc.get(d), True) for d in levels) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    """Writes ``summary.json`` and ``table.md`` into ``out_dir`` (each via a temp file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "table": out / "table.md"}
    for key, text in (("summary", json.dumps(summary, indent=2)), ("table", markdown_table(summary))):
        tmp = paths[key].with_name(f".{paths[key].name}.tmp")
        tmp.write_text(text)
        tmp.replace(paths[key])
    return paths
