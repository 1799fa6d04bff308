"""The context length each role needs: the protocol's token budgets plus the templates' own tokens.

An engine serving a role must hold its longest prompt plus its completion budget (vLLM's ``max_model_len``,
a model's ``max_position_embeddings``). With ``Q = max_prompt_tokens`` (the question is part of the teacher
prompt, so it fits that budget), ``P = max_probe_tokens``, ``T = max_teaching_tokens``, ``S =
max_student_tokens`` and ``o_x`` the tokens of template ``x`` rendered with empty placeholders (chat markup
and system message included), plus ``SLACK`` tokens per inserted text (a boundary can tokenise differently
from its parts):

    teacher = Q + T
    student = max(o_baseline + Q + S,  o_probe + Q + P,  o_taught + Q + T [+ P if it uses {approach}] + S)

The student bound assumes teacher and student count tokens alike (one tokenizer family, as Qwen3-8B/4B); an
engine still refuses a prompt that does not fit, naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from atlas_jax.protocol.templates import Templates, fill, render

SLACK = 2  # tokens per inserted text: merges across a placeholder's two boundaries


@dataclasses.dataclass(frozen=True)
class Budgets:
    """The protocol's token budgets (``config.protocol.max_*_tokens``)."""

    max_prompt_tokens: int
    max_probe_tokens: int
    max_teaching_tokens: int
    max_student_tokens: int


def template_tokens(
    template: str, tokenizer: Any, *, chat: bool, system: str = "", enable_thinking: bool = False
) -> int:
    """Tokens of ``template`` rendered for its role with every placeholder empty.

    Without a tokenizer (``None``) the UTF-8 byte count is returned: a byte-level BPE never needs more
    tokens than bytes, so it is an upper bound (chat mode needs the tokenizer's template and raises).
    """
    text = fill(template, question="", approach="", teaching="")
    if tokenizer is None:
        if chat:
            raise ValueError("chat prompting needs the role's tokenizer to count template tokens")
        return len(text.encode())
    rendered = render(text, tokenizer=tokenizer, chat=chat, system=system, enable_thinking=enable_thinking)
    return len(tokenizer.encode(rendered, add_special_tokens=False))


def teacher_context(b: Budgets) -> int:
    """``Q + T``: the teacher prompt budget already includes its template."""
    return b.max_prompt_tokens + b.max_teaching_tokens


def student_context(b: Budgets, templates: Templates, tokenizer: Any) -> int:
    """The longest student sequence of the protocol (see the module docstring)."""

    def tokens(text: str) -> int:
        return template_tokens(text, tokenizer, chat=templates.student_chat, system=templates.student_system,
                               enable_thinking=templates.student_enable_thinking)  # fmt: skip

    q, p, t, s = b.max_prompt_tokens, b.max_probe_tokens, b.max_teaching_tokens, b.max_student_tokens
    taught = tokens(templates.student_taught) + q + t + s + 2 * SLACK
    if "{approach}" in templates.student_taught:
        taught += p + SLACK
    return max(
        tokens(templates.student_baseline) + q + s + SLACK,
        tokens(templates.student_probe) + q + p + SLACK,
        taught,
    )
