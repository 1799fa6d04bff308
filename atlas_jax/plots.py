"""Plots of a run: accuracy by difficulty with and without teaching, and GRPO training curves.

``plot_run(summary, metrics_jsonl, out_png)`` draws three panels into one PNG (matplotlib, Agg backend):
(a) accuracy by difficulty for every arm of ``summary`` (``evaluation.summarize``) with the overall
accuracy and its CI in the legend; (b) GRPO reward mean per step; (c) GRPO NDR per step (from the
learner's ``metrics.jsonl``; panels (b)/(c) say "no training log" when the file is missing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_curves(metrics_jsonl: str | Path, keys: tuple[str, ...] = ("reward_mean", "ndr")) -> dict[str, list]:
    """``{"step": [...], key: [...]}`` for records of ``metrics_jsonl`` that hold every key."""
    path = Path(metrics_jsonl)
    out: dict[str, list] = {"step": [], **{k: [] for k in keys}}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if all(k in rec for k in keys):
            out["step"].append(rec.get("step", len(out["step"]) + 1))
            for k in keys:
                out[k].append(float(rec[k]))
    return out


def _smooth(xs: list[float], window: int) -> list[float]:
    if window <= 1 or len(xs) < window:
        return xs
    return [
        sum(xs[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(xs))
    ]


def plot_run(summary: Mapping[str, Any], metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Writes the three-panel figure (see the module docstring) to ``out_png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [(k, v) for k, v in summary.items() if isinstance(v, Mapping) and "accuracy_by_difficulty" in v]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if arms:
        levels = list(arms[0][1]["accuracy_by_difficulty"])
        width = 0.8 / len(arms)
        for i, (name, s) in enumerate(arms):
            accs = [100 * s["accuracy_by_difficulty"].get(d, float("nan")) for d in levels]
            lo, hi = s["accuracy_ci"]
            label = f"{name}: {100 * s['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
            ax.bar([j + i * width for j in range(len(levels))], accs, width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"{d} step(s)" for d in levels])
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_ylim(0, 105)
    ax.set_title("accuracy by difficulty, with and without teaching")
    ax.legend(fontsize=8, loc="lower left")
    curves = read_curves(metrics_jsonl)
    for ax, key, title in (
        (axes[1], "reward_mean", "GRPO reward (mean per step)"),
        (axes[2], "ndr", "GRPO NDR"),
    ):
        if curves["step"]:
            ax.plot(curves["step"], curves[key], alpha=0.35, label="per step")
            ax.plot(curves["step"], _smooth(curves[key], 5), label="moving mean (5)")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("GRPO step")
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
