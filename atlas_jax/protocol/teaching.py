"""What the student sees of a teacher completion.

Rule (documented default, ``missing_teaching="strip_thinking"``):
1. Every thinking block is removed first: ``<thinking>...</thinking>`` and Qwen3's ``<think>...</think>``
   alike. An unclosed opening tag runs to the next ``<teaching>`` tag or to the end of the text; a
   closing tag with no opening before it (templates that put ``<think>`` into the prompt) removes all
   text before it. So thinking text never reaches the student, wherever it appears (even inside the
   teaching).
2. If a ``<teaching>`` tag remains, the teaching is the text from the first ``<teaching>`` to the
   next ``</teaching>`` (or to the end if the teacher was cut off before closing it).
3. If there is no ``<teaching>`` tag: the remaining text (thinking removed) is the teaching with
   ``missing_teaching="strip_thinking"``, or the teaching is empty with ``missing_teaching="empty"``.
Stray protocol tags left in the result are removed and whitespace is stripped.
"""

from __future__ import annotations

import re

_THINKING_RE = re.compile(r"<(thinking|think)>.*?(?:</\1>|(?=<teaching>)|\Z)", re.DOTALL | re.IGNORECASE)
_ORPHAN_CLOSE_RE = re.compile(r"^.*?</(?:thinking|think)>", re.DOTALL | re.IGNORECASE)
_TEACHING_RE = re.compile(r"<teaching>(.*?)(?:</teaching>|\Z)", re.DOTALL | re.IGNORECASE)
_TAG_RE = re.compile(r"</?(?:thinking|think|teaching)>", re.IGNORECASE)


def strip_thinking(text: str) -> str:
    """``text`` with every thinking block removed (rule 1 of the module docstring)."""
    first_close = re.search(r"</(?:thinking|think)>", text, re.IGNORECASE)
    first_open = re.search(r"<(?:thinking|think)>", text, re.IGNORECASE)
    if first_close is not None and (first_open is None or first_close.start() < first_open.start()):
        text = _ORPHAN_CLOSE_RE.sub("", text, count=1)
    return _THINKING_RE.sub("", text)


def extract_teaching(completion: str, missing_teaching: str = "strip_thinking") -> tuple[str, bool]:
    """Returns (teaching text for the student, whether a <teaching> tag was found).

    Raises:
      ValueError: unknown ``missing_teaching`` rule.
    """
    if missing_teaching not in ("strip_thinking", "empty"):
        raise ValueError(f"missing_teaching must be 'strip_thinking' or 'empty', got {missing_teaching!r}")
    visible = strip_thinking(completion)
    match = _TEACHING_RE.search(visible)
    if match is not None:
        text, found = match.group(1), True
    else:
        text, found = (visible if missing_teaching == "strip_thinking" else ""), False
    return _TAG_RE.sub("", text).strip(), found
