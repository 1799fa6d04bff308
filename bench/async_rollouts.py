"""GRPO step time with on-policy vs asynchronous (one-step-off) rollouts, on a finished quickstart run.

    python -m bench.async_rollouts --run runs/quickstart [--steps 16 --skip 3 --staleness 0,1]

Runs ``--steps`` GRPO steps of the quickstart (its frozen student ``student/hf``, the SFT teacher
``teacher_sft/hf`` as the initial policy, its data) once per ``--staleness`` value, in this process,
one after the other (so both share the machine's load), each in a fresh folder under ``--out``. Prints
the median ``time/step`` over the steps after the first ``--skip`` (compilation), the median update and
rollout-wait times, and each setting's ratio to the first one. With ``max_staleness = 1`` the rollout of
step t + 1 runs in a thread while step t updates: the step costs about max(rollout, update) instead of
their sum. The numbers are wall-clock: on a shared machine run it twice and compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def _median(records, key, skip):
    vals = [r[key] for r in records[skip:] if key in r]
    return statistics.median(vals) if vals else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", required=True, help="a quickstart run folder with data/, student/hf, teacher_sft/hf"
    )
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the medians (compilation)")
    ap.add_argument("--staleness", default="0,1", help="comma-separated grpo.max_staleness values")
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()

    from atlas_jax import pipeline
    from configs.run.quickstart import get_config

    run = Path(args.run)
    for need in ("data/rl.jsonl", "student/hf/config.json", "teacher_sft/hf/config.json"):
        if not (run / need).is_file():
            raise SystemExit(f"--run {run}: {need} is missing (run the quickstart there first)")
    out = Path(args.out or tempfile.mkdtemp(prefix="async_bench_"))
    rows = []
    for k in (int(x) for x in args.staleness.split(",")):
        c = get_config()
        c.grpo.num_steps, c.grpo.max_staleness = args.steps, k
        c.logging.progress_bar = False
        folder = out / f"staleness_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        pipeline.train_teacher_rl(c, folder, run / "data", run / "student" / "hf", run / "teacher_sft" / "hf")
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        rows.append((
            k, _median(recs, "time/step", args.skip), _median(recs, "time/update", args.skip),
            _median(recs, "time/rollout_wait", args.skip), _median(recs, "time/rollout", args.skip),
        ))  # fmt: skip
    base = rows[0][1]
    print("| max_staleness | step (s) | update (s) | rollout wait (s) | rollout (s) | step / first |")
    print("|---|---|---|---|---|---|")
    for k, step, upd, wait, roll in rows:
        print(f"| {k} | {step:.2f} | {upd:.2f} | {wait:.2f} | {roll:.2f} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
