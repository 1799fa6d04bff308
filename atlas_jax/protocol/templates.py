"""Prompt templates for the two-pass protocol, and how they become prompts for each role.

Four templates (our own words; all configurable):

- ``student_baseline``  the student answers alone.                placeholders: {question}
- ``student_probe``     the student sketches its approach (pass 1). placeholders: {question}
- ``teacher``           the teacher reads question + probe (pass 2). placeholders: {question}, {approach}
- ``student_taught``    the student answers with the teaching.     placeholders: {question}, {teaching}
                                                                   (and optionally {approach})

``{approach}`` is the student's probe text.

Filling is a single regex pass that replaces only the known ``{name}`` placeholders; every other
brace (``\\boxed{}``, JSON, LaTeX in the template or in the inserted problem text) is kept literally,
and inserted text is never re-scanned, so a problem containing ``{teaching}`` cannot inject anything.
``validate`` runs at start-up: each template must contain its required placeholders and must not
contain one that is not allowed for it.

Per role (``student`` / ``teacher``) prompts are either raw text or the role tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True, enable_thinking=...)``) with an optional system
message. ``enable_thinking`` is the per-role flag (Qwen3 templates read it: False closes an empty
``<think></think>`` in the prompt, True lets the model think first; other templates ignore it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

PLACEHOLDERS = ("question", "approach", "teaching")
_PLACEHOLDER_RE = re.compile(r"\{(question|approach|teaching)\}")

DEFAULT_STUDENT_BASELINE = (
    "Solve the following problem. Think briefly, then give the final answer as \\boxed{answer}.\n\n"
    "Problem: {question}\n"
)
DEFAULT_STUDENT_PROBE = (
    "Here is a problem. Do not solve it yet. In one or two sentences, say how you would approach it "
    "and what you find hard about it.\n\nProblem: {question}\n\nMy approach:"
)
DEFAULT_TEACHER = (
    "You are a teacher helping a student with a problem. Read the problem and the student's plan. "
    "You may reason privately inside <thinking>...</thinking>; the student never sees it. Then write "
    "short guidance for the student inside <teaching>...</teaching>. Point out the key idea or the "
    "mistake in the plan; do not state the final answer.\n\n"
    "Problem: {question}\n\nStudent's plan: {approach}\n"
)
DEFAULT_STUDENT_TAUGHT = (
    "Solve the following problem. A teacher has given you some guidance. Think briefly, then give "
    "the final answer as \\boxed{answer}.\n\nProblem: {question}\n\nTeacher's guidance: {teaching}\n"
)

# Which placeholders each template needs, and which it may use.
_REQUIRED = {
    "student_baseline": ("question",),
    "student_probe": ("question",),
    "teacher": ("question", "approach"),
    "student_taught": ("question", "teaching"),
}
_ALLOWED = {
    "student_baseline": ("question",),
    "student_probe": ("question",),
    "teacher": ("question", "approach"),
    "student_taught": ("question", "approach", "teaching"),
}


@dataclasses.dataclass(frozen=True)
class Templates:
    """The protocol's templates and prompting mode per role.

    Attributes:
      student_baseline, student_probe, teacher, student_taught: template texts (see module docstring).
      student_chat: render student prompts with the student tokenizer's chat template.
      teacher_chat: render teacher prompts with the teacher tokenizer's chat template.
      student_system: optional system message for chat-mode student prompts ("" = none).
      teacher_system: optional system message for chat-mode teacher prompts ("" = none).
      student_enable_thinking: ``enable_thinking`` passed to the student's chat template.
      teacher_enable_thinking: ``enable_thinking`` passed to the teacher's chat template.
    """

    student_baseline: str = DEFAULT_STUDENT_BASELINE
    student_probe: str = DEFAULT_STUDENT_PROBE
    teacher: str = DEFAULT_TEACHER
    student_taught: str = DEFAULT_STUDENT_TAUGHT
    student_chat: bool = False
    teacher_chat: bool = False
    student_system: str = ""
    teacher_system: str = ""
    student_enable_thinking: bool = False
    teacher_enable_thinking: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks placeholders of every template.

        Raises:
          ValueError: a required placeholder is missing or a placeholder is not allowed there.
        """
        for name, required in _REQUIRED.items():
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ValueError(f"template {name!r} must be a string, got {type(text).__name__}")
            found = set(_PLACEHOLDER_RE.findall(text))
            missing = [p for p in required if p not in found]
            if missing:
                raise ValueError(
                    f"template {name!r} lacks placeholder(s) {['{' + p + '}' for p in missing]}; "
                    f"it needs {['{' + p + '}' for p in required]}"
                )
            extra = sorted(found - set(_ALLOWED[name]))
            if extra:
                raise ValueError(
                    f"template {name!r} uses placeholder(s) {['{' + p + '}' for p in extra]} that are "
                    f"not available there; allowed: {['{' + p + '}' for p in _ALLOWED[name]]}"
                )


def fill(template: str, **values: str) -> str:
    """Replaces the known ``{name}`` placeholders in one pass; all other braces stay as they are.

    Raises:
      KeyError: the template uses a placeholder that has no value.
    """

    def _sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"no value for placeholder {{{key}}}")
        return str(values[key])

    return _PLACEHOLDER_RE.sub(_sub, template)


def render(text: str, *, tokenizer: Any, chat: bool, system: str = "", enable_thinking: bool = False) -> str:
    """Turns a filled template into the prompt text an engine receives.

    Args:
      text: the filled user message.
      tokenizer: the role's HF tokenizer (only used in chat mode).
      chat: apply the tokenizer's chat template (with the generation prompt).
      system: system message for chat mode ("" = none).
      enable_thinking: passed to the chat template (Qwen3: think before answering).

    Raises:
      ValueError: chat mode but the tokenizer has no chat template.
    """
    if not chat:
        return text
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"chat prompting was requested but tokenizer {type(tokenizer).__name__} has no chat_template; "
            "set the role's *_chat flag to False or use a tokenizer with a chat template"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=bool(enable_thinking)
    )
