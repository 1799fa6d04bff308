"""SFT rows for the teacher warm-up, rendered into prompt ids + target ids with a completion-only mask.

Row schema (Arc-ATLAS-Teach SFT; field names configurable): ``problem_text``, ``student_approach``,
``teacher_diagnosis``, ``teacher_teaching`` (all non-empty strings).

Format. The prompt is exactly the RL-time teacher prompt: the teacher template filled with
``{question}`` = problem_text and ``{approach}`` = student_approach, rendered as raw text or with the
tokenizer's chat template (``protocol/templates.py``). The target is what the teacher should write::

    <thinking>
    {teacher_diagnosis}
    </thinking>
    <teaching>
    {teacher_teaching}
    </teaching><eos>

The diagnosis goes in <thinking> because it is the teacher's private analysis: at RL time thinking never
reaches the student, only the teaching does. ``input_ids = prompt_ids + target_ids``; the loss mask is 0
on the prompt and 1 on the target (including the EOS, so the teacher learns to stop). Rows longer than
``max_length`` are cut from the left (the prompt's beginning goes first; the target is kept whole
unless it alone is longer than ``max_length``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from atlas_jax.data.loading import DataError, Row, load_rows, require_text
from atlas_jax.protocol.templates import Templates, fill, render


@dataclasses.dataclass(frozen=True)
class SFTFields:
    """Names of the SFT row fields."""

    problem: str = "problem_text"
    approach: str = "student_approach"
    diagnosis: str = "teacher_diagnosis"
    teaching: str = "teacher_teaching"


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenised SFT row.

    Attributes:
      input_ids: prompt ids followed by target ids (after left truncation).
      completion_mask: 1 on target tokens (the loss), 0 on prompt tokens; same length as input_ids.
      num_prompt_tokens: prompt tokens kept after truncation.
      source: where the row came from (``file line N``), for error messages.
    """

    input_ids: list[int]
    completion_mask: list[int]
    num_prompt_tokens: int
    source: str


def teacher_target(diagnosis: str, teaching: str) -> str:
    """The teacher's target text (see the module docstring)."""
    return f"<thinking>\n{diagnosis.strip()}\n</thinking>\n<teaching>\n{teaching.strip()}\n</teaching>"


def encode_sft_row(
    row: Row,
    tokenizer: Any,
    *,
    templates: Templates,
    fields: SFTFields = SFTFields(),
    max_length: int = 2048,
) -> SFTExample:
    """Validates and tokenises one SFT row.

    Raises:
      DataError: a field is missing, empty or not a string (names source, row and field).
      ValueError: the tokenizer has no EOS token.
    """
    question = require_text(row, fields.problem)
    approach = require_text(row, fields.approach)
    diagnosis = require_text(row, fields.diagnosis)
    teaching = require_text(row, fields.teaching)
    prompt = render(
        fill(templates.teacher, question=question, approach=approach),
        tokenizer=tokenizer,
        chat=templates.teacher_chat,
        system=templates.teacher_system,
        enable_thinking=templates.teacher_enable_thinking,
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("the teacher tokenizer has no eos_token_id; SFT targets must end with EOS")
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    target_ids = list(tokenizer.encode(teacher_target(diagnosis, teaching), add_special_tokens=False))
    target_ids.append(int(tokenizer.eos_token_id))
    ids = prompt_ids + target_ids
    mask = [0] * len(prompt_ids) + [1] * len(target_ids)
    if len(ids) > max_length:
        ids, mask = ids[-max_length:], mask[-max_length:]
    return SFTExample(
        input_ids=ids, completion_mask=mask, num_prompt_tokens=mask.count(0), source=row.where()
    )


def load_sft_examples(
    source: str,
    tokenizer: Any,
    *,
    templates: Templates | None = None,
    fields: SFTFields = SFTFields(),
    max_length: int = 2048,
    split: str = "train",
) -> list[SFTExample]:
    """Loads, validates and tokenises every SFT row of a source.

    Raises:
      DataError: unreadable source, no rows, or a bad row (names source, row and field).
    """
    rows = load_rows(source, split=split)
    if not rows:
        raise DataError(f"{source}: no rows")
    templates = templates if templates is not None else Templates()
    return [
        encode_sft_row(r, tokenizer, templates=templates, fields=fields, max_length=max_length) for r in rows
    ]
