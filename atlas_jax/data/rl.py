"""RL rows: a problem and its ground-truth answer.

Schemas (field names are configurable):
- Arc-ATLAS-Teach RL: ``prompt`` (problem text) and ``ground_truth`` (answer) — the defaults;
- Big-Math style: ``problem`` and ``answer`` (pass ``problem_field="problem", answer_field="answer"``).
An optional ``id_field`` gives each problem a stable id (the student-baseline cache key); without it the
id is a hash of the problem text and answer, which is equally stable across runs and splits.
"""

from __future__ import annotations

import dataclasses
import hashlib

from atlas_jax.data.loading import DataError, Row, load_rows, require_text


@dataclasses.dataclass(frozen=True)
class Problem:
    """One RL problem.

    Attributes:
      id: stable id (cache key of the student baseline).
      question: problem text shown to student and teacher.
      answer: ground-truth answer (a string; compared with ``protocol.answers.verify``).
    """

    id: str
    question: str
    answer: str


def problem_from_row(row: Row, *, problem_field: str, answer_field: str, id_field: str = "id") -> Problem:
    """Validates one row and turns it into a ``Problem``.

    Raises:
      DataError: missing/empty/non-string problem or answer (names source, row and field).
    """
    question = require_text(row, problem_field)
    answer = require_text(row, answer_field)
    if id_field and id_field in row.fields and row.fields[id_field] is not None:
        pid = str(row.fields[id_field])
    else:
        pid = hashlib.sha1(f"{question}\x00{answer}".encode()).hexdigest()[:16]
    return Problem(id=pid, question=question, answer=answer.strip())


def load_problems(
    source: str,
    *,
    problem_field: str = "prompt",
    answer_field: str = "ground_truth",
    id_field: str = "id",
    split: str = "train",
) -> list[Problem]:
    """Loads and validates RL problems from a file, saved dataset folder or hub name.

    Raises:
      DataError: unreadable source, bad rows, no rows, or duplicate ids.
    """
    rows = load_rows(source, split=split)
    if not rows:
        raise DataError(f"{source}: no rows")
    problems = [
        problem_from_row(r, problem_field=problem_field, answer_field=answer_field, id_field=id_field)
        for r in rows
    ]
    seen: dict[str, Row] = {}
    for row, problem in zip(rows, problems, strict=True):
        first = seen.setdefault(problem.id, row)
        if first is not row and first.fields.get(problem_field) != row.fields.get(problem_field):
            raise DataError(
                f"{row.where()}: id {problem.id!r} already used by {first.where()} for a different problem"
            )
    return problems
