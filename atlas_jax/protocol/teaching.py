"""What the student sees of a teacher completion.

Rule (documented default, ``missing_teaching="strip_thinking"``):
1. Every ``<thinking>...</thinking>`` block is removed first. An unclosed ``<thinking>`` runs to the
   next ``<teaching>`` tag or to the end of the text. So thinking text never reaches the student,
   wherever it appears (even inside the teaching).
2. If a ``<teaching>`` tag remains, the teaching is the text from the first ``<teaching>`` to the
   next ``</teaching>`` (or to the end if the teacher was cut off before closing it).
3. If there is no ``<teaching>`` tag: the remaining text (thinking removed) is the teaching with
   ``missing_teaching="strip_thinking"``, or the teaching is empty with ``missing_teaching="empty"``.
Stray protocol tags left in the result are removed and whitespace is stripped.
"""

from __future__ import annotations

import re

_THINKING_RE = re.compile(r"<thinking>.*?(?:</thinking>|(?=<teaching>)|\Z)", re.DOTALL | re.IGNORECASE)
_TEACHING_RE = re.compile(r"<teaching>(.*?)(?:</teaching>|\Z)", re.DOTALL | re.IGNORECASE)
_TAG_RE = re.compile(r"</?(?:thinking|teaching)>", re.IGNORECASE)


def extract_teaching(completion: str, missing_teaching: str = "strip_thinking") -> tuple[str, bool]:
    """Returns (teaching text for the student, whether a <teaching> tag was found).

    Raises:
      ValueError: unknown ``missing_teaching`` rule.
    """
    if missing_teaching not in ("strip_thinking", "empty"):
        raise ValueError(f"missing_teaching must be 'strip_thinking' or 'empty', got {missing_teaching!r}")
    visible = _THINKING_RE.sub("", completion)
    match = _TEACHING_RE.search(visible)
    if match is not None:
        text, found = match.group(1), True
    else:
        text, found = (visible if missing_teaching == "strip_thinking" else ""), False
    return _TAG_RE.sub("", text).strip(), found
