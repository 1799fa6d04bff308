"""Over-long problems, found when the data is loaded instead of at the step that draws them.

A problem fits when every prompt the protocol will build for it fits ``max_prompt_tokens`` (L) with the
longest probe the student may write (``max_probe_tokens``, P):

    teacher   len_T(teacher template ∘ (question, approach="")) + P ≤ L         (teacher tokens)
    student   len_S(baseline template ∘ question)                     ≤ L         (student tokens)
              len_S(probe template ∘ question)                        ≤ L
              len_S(taught template ∘ (question, approach="", teaching="")) + P·[template uses {approach}] ≤ L

The student's taught prompt also holds the teaching (≤ ``max_teaching_tokens``), so a student engine must
accept ``max_prompt_tokens + max_teaching_tokens + max_student_tokens`` tokens. P is counted in student
tokens; the teacher may tokenise the probe differently, so the rollout still cuts a probe that does not
fit (``TwoPassRollout.teacher_prompts``). When the student engine has no tokenizer (a remote server
serving by name) only the teacher prompt is checked.

``overlong="skip"`` (default) drops such problems and reports how many; ``"error"`` refuses them all up
front, naming each (the first few) with its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atlas_jax.data.rl import Problem

OVERLONG_MODES = ("skip", "error")


def overlong_reason(rollout: Any, problem: Problem) -> str | None:
    """Why ``problem`` does not fit the budgets of ``rollout`` (a ``TwoPassRollout``), or None."""
    s = rollout.settings
    limit, probe = s.max_prompt_tokens, s.max_probe_tokens
    _, ids = rollout.teacher_prompt(problem.question, "")
    if len(ids) + probe > limit:
        return f"teacher prompt {len(ids)} + probe budget {probe} tokens > max_prompt_tokens={limit}"
    tok = rollout.student.tokenizer
    if tok is None:
        return None
    t = s.templates
    taught_probe = probe if "{approach}" in t.student_taught else 0
    prompts = (
        ("baseline", rollout._student_prompt(t.student_baseline, question=problem.question), 0),
        ("probe", rollout._student_prompt(t.student_probe, question=problem.question), 0),
        ("taught", rollout._student_prompt(t.student_taught, question=problem.question, approach="", teaching=""),
         taught_probe),
    )  # fmt: skip
    for name, text, extra in prompts:
        n = len(tok.encode(text, add_special_tokens=False))
        if n + extra > limit:
            plus = f" + probe budget {extra}" if extra else ""
            return f"student {name} prompt {n}{plus} tokens > max_prompt_tokens={limit}"
    return None


def screen_problems(
    rollout: Any, problems: Sequence[Problem], *, mode: str = "skip", source: str = "problems"
) -> tuple[list[Problem], list[tuple[Problem, str]]]:
    """Splits ``problems`` into those that fit and those that do not (with the reason).

    Args:
      rollout: the ``TwoPassRollout`` that will run them (its engines' tokenizers and settings).
      problems: the loaded problems.
      mode: "skip" (return the fitting ones) or "error" (raise if any does not fit).
      source: what the problems are (for messages), e.g. the data file.

    Raises:
      ValueError: unknown mode; with ``mode="error"`` any over-long problem; with "skip" when no
        problem fits.
    """
    if mode not in OVERLONG_MODES:
        raise ValueError(f"--config.data.overlong must be one of {OVERLONG_MODES}, got {mode!r}")
    kept, dropped = [], []
    for p in problems:
        reason = overlong_reason(rollout, p)
        if reason is None:
            kept.append(p)
        else:
            dropped.append((p, reason))
    if dropped and (mode == "error" or not kept):
        listed = "; ".join(f"{p.id!r}: {why}" for p, why in dropped[:5])
        more = f" (and {len(dropped) - 5} more)" if len(dropped) > 5 else ""
        hint = "raise --config.protocol.max_prompt_tokens, shorten the templates"
        hint += ", or set --config.data.overlong=skip" if mode == "error" else ""
        raise ValueError(
            f"{source}: {len(dropped)} of {len(problems)} problems are too long: {listed}{more}; {hint}"
        )
    return kept, dropped
