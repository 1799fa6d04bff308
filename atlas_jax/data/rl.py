"""RL rows: a problem, its ground-truth answer and optional curriculum fields.

Schemas (field names are configurable):
- Arc-ATLAS-Teach RL v0: ``prompt`` (problem text) and ``ground_truth`` (answer) — the defaults — plus
  optional ``problem_id``, ``student_level``, ``baseline_score`` and any other fields (kept in
  ``Problem.meta``);
- Arc-ATLAS-Teach v1 curriculum files: the v0 fields plus ``outcome_bucket`` (a label, kept in ``meta``)
  and ``bandit_weight`` (a non-negative sampling weight; ``weight_field``);
- Big-Math style: ``problem`` and ``answer`` (pass ``problem_field="problem", answer_field="answer"``).

Ids. ``id_field`` names the row's id; by default (``id_field=""``) the first of ``problem_id`` / ``id``
present in the row is used, and without either the id is a hash of the problem text and answer, which is
equally stable across runs and splits. ``Problem.key`` (the student-baseline cache key) is the id *and* a
hash of question + answer, so two files that reuse an id for different problems never share a baseline.

Weights. When the ``weight_field`` column is present, every row must carry a finite number ≥ 0 in it
(not all zero); ``Problem.weight`` then holds it and training samples problems with probability
``w_i / Σ w`` (``data/order.py``). Without the column ``weight`` is None and problems are visited in
seeded epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

from atlas_jax.data.loading import DataError, Row, load_rows, require_text

ID_FIELDS = ("problem_id", "id")  # tried in this order when id_field is ""
WEIGHT_FIELD = "bandit_weight"
_NUMERIC_FIELDS = ("baseline_score",)  # optional fields that must be finite numbers when present
_LABEL_FIELDS = ("outcome_bucket", "student_level")  # optional fields that must be strings/ints


@dataclasses.dataclass(frozen=True)
class Problem:
    """One RL problem.

    Attributes:
      id: the dataset's id (or a content hash when the row has none).
      question: problem text shown to student and teacher.
      answer: ground-truth answer (a string; compared with ``protocol.answers.verify``).
      weight: sampling weight (v1 ``bandit_weight``), None when the file has no weight column.
      meta: the row's other fields (``student_level``, ``baseline_score``, ``outcome_bucket``, ...).
    """

    id: str
    question: str
    answer: str
    weight: float | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """Baseline cache key: ``<id>#<sha1(question, answer)[:12]>``."""
        return f"{self.id}#{content_hash(self.question, self.answer)[:12]}"


def content_hash(question: str, answer: str) -> str:
    """sha1 hex digest of ``question \\0 answer``."""
    return hashlib.sha1(f"{question}\x00{answer}".encode()).hexdigest()


def _number(row: Row, field: str, *, minimum: float | None = None) -> float:
    value = row.fields[field]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(
            f"{row.where()}: field {field!r} must be a number, got {type(value).__name__} {value!r:.60}"
        )
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise DataError(f"{row.where()}: field {field!r} must be a finite number{bound}, got {value!r}")
    return float(value)


def _row_id(row: Row, id_field: str, question: str, answer: str) -> str:
    fields = (id_field,) if id_field else ID_FIELDS
    for name in fields:
        value = row.fields.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DataError(
                f"{row.where()}: field {name!r} must be a string or integer id, got {type(value).__name__}"
            )
        if not str(value).strip():
            raise DataError(f"{row.where()}: field {name!r} is empty")
        return str(value).strip()
    return content_hash(question, answer)[:16]


def problem_from_row(
    row: Row,
    *,
    problem_field: str,
    answer_field: str,
    id_field: str = "",
    weight_field: str = "",
) -> Problem:
    """Validates one row and turns it into a ``Problem``.

    Raises:
      DataError: missing/empty/non-string problem or answer, a bad id, a weight that is missing, not a
        number, negative or not finite, or a bad optional field (names source, row and field).
    """
    question = require_text(row, problem_field)
    answer = require_text(row, answer_field).strip()
    pid = _row_id(row, id_field, question, answer)
    weight = None
    if weight_field:
        if row.fields.get(weight_field) is None:
            raise DataError(
                f"{row.where()}: missing field {weight_field!r} (other rows have it; every row needs a "
                f"sampling weight, or set --config.data.weight_field='' to ignore weights)"
            )
        weight = _number(row, weight_field, minimum=0.0)
    for name in _NUMERIC_FIELDS:
        if row.fields.get(name) is not None:
            _number(row, name)
    for name in _LABEL_FIELDS:
        value = row.fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise DataError(
                f"{row.where()}: field {name!r} must be a string label, got {type(value).__name__}"
            )
    used = {problem_field, answer_field, weight_field, id_field, *ID_FIELDS}
    meta = {k: v for k, v in row.fields.items() if k not in used}
    return Problem(id=pid, question=question, answer=answer, weight=weight, meta=meta)


def load_problems(
    source: str,
    *,
    problem_field: str = "prompt",
    answer_field: str = "ground_truth",
    id_field: str = "",
    weight_field: str = WEIGHT_FIELD,
    split: str = "train",
) -> list[Problem]:
    """Loads and validates RL problems from a file, saved dataset folder or hub name.

    Args:
      source: see ``data.loading.load_rows``.
      problem_field, answer_field: the problem / answer columns.
      id_field: the id column ("" = ``problem_id``, then ``id``, then a content hash).
      weight_field: the sampling-weight column; used only when some row has it ("" = ignore weights).
      split: split of a saved DatasetDict or hub dataset.

    Raises:
      DataError: unreadable source, bad rows, no rows, duplicate ids, or weights that are all zero.
    """
    rows = load_rows(source, split=split)
    if not rows:
        raise DataError(f"{source}: no rows")
    weighted = bool(weight_field) and any(r.fields.get(weight_field) is not None for r in rows)
    problems = [
        problem_from_row(
            r,
            problem_field=problem_field,
            answer_field=answer_field,
            id_field=id_field,
            weight_field=weight_field if weighted else "",
        )
        for r in rows
    ]
    seen: dict[str, Row] = {}
    for row, problem in zip(rows, problems, strict=True):
        first = seen.setdefault(problem.id, row)
        if first is not row and first.fields.get(problem_field) != row.fields.get(problem_field):
            raise DataError(
                f"{row.where()}: id {problem.id!r} already used by {first.where()} for a different problem"
            )
    if weighted and not any(p.weight for p in problems):
        raise DataError(
            f"{source}: every {weight_field!r} is 0; at least one problem needs a positive weight"
        )
    return problems
