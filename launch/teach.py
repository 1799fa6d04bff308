"""Teach a student on a file of problems: ``atlas-teach --input=problems.jsonl --output=taught.jsonl``.

    python -m launch.teach --config=configs/run/quickstart.py --input=runs/quickstart/data/eval.jsonl \\
        --output=runs/quickstart/taught.jsonl [--baseline] [--student=http://127.0.0.1:8000/v1]

Input: one JSON object per line with the problem (``--problem_field``, default the config's
``data.problem_field``, "prompt"), optionally the ground truth (``--answer_field``, "ground_truth") and an id
(``--id_field``; default ``problem_id``, then ``id``). Output: one JSON object per input row (``line`` = its input line number): the probe,
the teaching (``stayed_out`` = the teacher wrote none), the teacher's whole completion, the student's taught
answer (and, with ``--baseline``, its answer alone), the extracted answers and, with a ground truth, whether
they are right, token counts and seconds (batch phase times divided by the batch size).

Resumable: rows are appended and fsync'ed as their batch finishes; re-running the same command skips every
input line already in the output (a torn last line from a crash is dropped first). Bad rows (not JSON, no
problem text, a prompt over the budget) are reported with their line number on stderr and skipped. The
final summary (rows written / skipped / bad, accuracies, problems per second) is printed as JSON.
Teacher and student: see ``launch/teach_common.py`` (folders, URLs, engines, concurrency, timeouts, retries).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from launch import teach_common

_INPUT = flags.DEFINE_string("input", None, "Problems, one JSON object per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Where the taught rows go (appended; resumable).")
_PROBLEM_FIELD = flags.DEFINE_string("problem_field", None, "Row field with the problem (default: config).")
_ANSWER_FIELD = flags.DEFINE_string(
    "answer_field", None, "Row field with the ground truth (default: config)."
)
_ID_FIELD = flags.DEFINE_string(
    "id_field", "", "Row field with the problem id (default: problem_id, then id, then line<N>)."
)
_ANSWER = flags.DEFINE_boolean("answer", True, "Get the student's taught answer.")
_BASELINE = flags.DEFINE_boolean("baseline", False, "Also get the student's answer without teaching.")
_NUM_PROBLEMS = flags.DEFINE_integer("num_problems", 0, "Use only the first N input rows (0 = all).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar on stderr.")


def read_done(path: Path) -> set[int]:
    """Input line numbers already in the output; a torn (unparseable) last line is cut off first.

    Raises:
      ValueError: a broken line that is not the last one (the file was edited: name it).
    """
    if not path.is_file():
        return set()
    done: set[int] = set()
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good_end = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_end += len(line) + 1
            continue
        try:
            done.add(int(json.loads(line)["line"]))
        except (ValueError, KeyError, TypeError) as e:
            if any(rest.strip() for rest in lines[i + 1 :]):
                raise ValueError(
                    f"{path}:{i + 1}: not an atlas-teach row ({e}); fix or remove that line"
                ) from e
            print(
                f"[atlas-teach] {path}:{i + 1}: dropping a torn last line (interrupted write)",
                file=sys.stderr,
            )
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        good_end += len(line) + 1
    return done


def parse_row(line_no: int, text: str, fields: tuple[str, str, str]) -> dict[str, Any]:
    """One input row -> ``{"question", "answer", "id"}``.

    Raises:
      ValueError: not a JSON object, or no problem text (names the field and the flag).
    """
    problem_field, answer_field, id_field = fields
    try:
        row = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from e
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    question = row.get(problem_field)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"field {problem_field!r} missing or not a non-empty string (set --problem_field)")
    answer = row.get(answer_field)
    if answer is not None and not isinstance(answer, str | int | float):
        raise ValueError(f"field {answer_field!r} must be a string or a number")
    pid = row.get(id_field) if id_field else next((row[k] for k in ("problem_id", "id") if k in row), None)
    return {"question": question, "answer": None if answer is None else str(answer),
            "id": str(pid) if pid is not None else f"line{line_no}"}  # fmt: skip


def _append(f: Any, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _row(line_no: int, item: dict[str, Any], result: Any) -> dict[str, Any]:
    out = {"line": line_no, "ground_truth": item["answer"]}
    out.update(result.to_json())
    return out


def teach_file(teacher: Any, student: Any, inp: Path, out: Path, fields: tuple[str, str, str], *,
               answer: bool, baseline: bool, num_problems: int, progress: bool) -> dict[str, Any]:  # fmt: skip
    """Teaches every input row not yet in ``out``; returns the run's summary (see the module docstring)."""
    from tqdm import tqdm

    from atlas_jax.inference.teacher import ProblemError

    if not inp.is_file():
        raise FileNotFoundError(f"--input={inp} does not exist")
    done = read_done(out)
    bad: list[dict[str, Any]] = []
    todo: list[tuple[int, dict[str, Any]]] = []
    seen = 0
    with open(inp, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            seen += 1
            if num_problems and seen > num_problems:
                break
            if line_no in done:
                continue
            try:
                todo.append((line_no, parse_row(line_no, text, fields)))
            except ValueError as e:
                bad.append({"line": line_no, "error": str(e)})
                print(f"[atlas-teach] {inp}:{line_no}: skipped: {e}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    start = time.perf_counter()
    bs = teacher.batch_size
    with (
        open(out, "a", encoding="utf-8") as f,
        tqdm(total=len(todo), disable=not progress, desc="teach") as bar,
    ):
        for b in range(0, len(todo), bs):
            chunk = todo[b : b + bs]
            try:
                results = teacher.teach(
                    [c[1] for c in chunk], student, answer=answer, baseline=baseline, step=b
                )
                pairs = list(zip(chunk, results, strict=True))
            except ProblemError:  # a bad row in the batch (e.g. a prompt over the budget): find it
                pairs = []
                for line_no, item in chunk:
                    try:
                        [r] = teacher.teach([item], student, answer=answer, baseline=baseline, step=b)
                        pairs.append(((line_no, item), r))
                    except ProblemError as e:
                        bad.append({"line": line_no, "error": str(e)})
                        print(f"[atlas-teach] {inp}:{line_no}: skipped: {e}", file=sys.stderr)
            rows = [_row(line_no, item, r) for (line_no, item), r in pairs]
            _append(f, rows)
            written.extend(rows)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    return summarize(written, bad, len(done), seconds)


def summarize(rows: list[dict[str, Any]], bad: list[dict[str, Any]], skipped: int, seconds: float) -> dict:
    """Counts, accuracies (rows with a ground truth) and throughput of one run."""

    def acc(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "written": len(rows),
        "skipped_done": skipped,
        "bad_rows": bad,
        "stayed_out": sum(1 for r in rows if r["stayed_out"]),
        "accuracy_taught": acc("correct"),
        "accuracy_alone": acc("baseline_correct"),
        "seconds": seconds,
        "problems_per_second": len(rows) / seconds if rows and seconds > 0 else None,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _INPUT.value or not _OUTPUT.value:
        raise app.UsageError("atlas-teach needs --input=problems.jsonl and --output=taught.jsonl")
    c = teach_common.config()
    fields = (_PROBLEM_FIELD.value or str(c.data.problem_field), _ANSWER_FIELD.value or str(c.data.answer_field),
              _ID_FIELD.value)  # fmt: skip
    if not Path(_INPUT.value).is_file():
        raise app.UsageError(f"--input={_INPUT.value} does not exist")
    try:
        _, teacher, student = teach_common.build()
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    try:
        summary = teach_file(teacher, student, Path(_INPUT.value), Path(_OUTPUT.value), fields,
                             answer=_ANSWER.value, baseline=_BASELINE.value, num_problems=_NUM_PROBLEMS.value,
                             progress=_PROGRESS.value)  # fmt: skip
    finally:
        student.close()
        teacher.close()
    print(json.dumps(summary))


def run() -> None:
    """Console-script entry point (``atlas-teach``)."""
    flags.FLAGS.unparse_flags()
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    app.run(main)
