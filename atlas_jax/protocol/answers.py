"""Answer extraction and verification, shared by training rewards and evaluation.

Extraction (``extract_answer``), extractor "default", first rule that matches wins:
  1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled; for a box inside a box, the inner one);
  2. the last ``<solution>...</solution>`` (an unclosed tag runs to the end of the text);
  3. the last "final answer is X" / "the answer is X" / "answer: X" / "#### X" phrase, up to the end of
     its line (a trailing period is dropped);
  otherwise None (no answer: counts as wrong and as not completed).
Extractor "rcl_compat" mimics the original system: non-nested ``\\boxed{}``, ``<solution>``, looser
"answer" patterns, then the last number anywhere in the text.

Verification (``verify``), verifier:
  - "exact":      stripped strings are equal;
  - "normalised": ``normalize_answer`` strings are equal, or both are rational numbers with equal value
                  (``1/2`` = ``0.5`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``);
  - "math":       math-verify (sympy equivalence) on ``$pred$`` vs ``$gold$``;
  - "auto":       "normalised", then "math" if that fails, unless both sides are plain rational
                  numbers (then the exact comparison is final) (the default).
math-verify is never allowed to raise or hang: errors and timeouts count as False; its signal-based
timeout is used only on the main thread (elsewhere inputs longer than ``MAX_MATH_CHARS`` are refused).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from fractions import Fraction

EXTRACTORS = ("default", "rcl_compat")
VERIFIERS = ("auto", "math", "normalised", "exact")
MAX_MATH_CHARS = 200
MATH_TIMEOUT_SECONDS = 2

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_SOLUTION_RE = re.compile(r"<solution>(.*?)(?:</solution>|$)", re.DOTALL | re.IGNORECASE)
_PHRASE_RE = re.compile(
    r"(?:final answer is|the answer is|answer\s*:|####)\s*:?\s*([^\n]+)",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces; None if absent/unclosed."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _default_extract(text: str) -> str | None:
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    solutions = _SOLUTION_RE.findall(text)
    if solutions and solutions[-1].strip():
        inner = solutions[-1].strip()
        return extract_boxed(inner) or inner
    phrases = _PHRASE_RE.findall(text)
    if phrases:
        answer = phrases[-1].strip().rstrip(".").strip()
        return answer.strip("$ ").strip() or None
    return None


def _rcl_compat_extract(text: str) -> str | None:
    boxed = re.findall(r"\\boxed\{([^}]+)\}", text)
    if boxed:
        return boxed[-1].strip()
    solutions = re.findall(r"<solution>(.*?)</solution>", text, re.DOTALL)
    if solutions:
        return solutions[-1].strip()
    for pattern in (r"answer is[:\s]+([^\n.]+)", r"answer[:\s]+([^\n.]+)", r"= ([^\n.]+)$"):
        found = re.findall(pattern, text, re.IGNORECASE | re.MULTILINE)
        if found:
            return found[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str, extractor: str = "default") -> str | None:
    """Extracts the final answer from a completion (see the module docstring); None if there is none."""
    if extractor == "default":
        return _default_extract(text)
    if extractor == "rcl_compat":
        return _rcl_compat_extract(text)
    raise ValueError(f"unknown answer extractor {extractor!r}; known: {EXTRACTORS}")


def _strip_command(s: str, name: str) -> str:
    """Replaces ``\\name{x}`` by ``x`` (one level of nesting inside x is fine)."""
    pattern = re.compile(r"\\" + name + r"\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
    while True:
        new = pattern.sub(r"\1", s)
        if new == s:
            return s
        s = new


# A number followed by unit words: "12 cm", "5 apples", "3 sq ft". Without a space only known units
# count ("12cm"), so that "3x" stays an algebraic answer.
_UNITS = "mm|cm|m|km|in|ft|yd|mi|g|kg|mg|lb|lbs|oz|s|sec|min|h|hr|hrs|ml|l|mph|kph|cents|dollars|degrees|deg"
_UNIT_TAIL_RE = re.compile(
    r"^(-?[\d.,/]+)(?:\s+[a-zA-Z]+\.?(?:\s+[a-zA-Z]+\.?)?|(?:" + _UNITS + r")(?:\^?[23])?)$"
)


def normalize_answer(answer: str) -> str:
    """Canonical string for comparison.

    Removes math delimiters, ``\\text{}``-style wrappers, ``\\left``/``\\right``, spacing commands,
    degree signs, percent signs, thousands separators, a leading ``x =``, trailing units after a number
    and a trailing period; maps ``\\dfrac``/``\\tfrac`` to ``\\frac``; lower-cases; drops whitespace.
    """
    s = answer.strip()
    s = s.strip("$").strip()
    for d_open, d_close in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(d_open) and s.endswith(d_close):
            s = s[2:-2].strip()
    inner = extract_boxed(s) if _BOX_RE.match(s) else None
    if inner is not None:
        s = inner
    for cmd in ("text", "textbf", "mathrm", "mathbf", "operatorname"):
        s = _strip_command(s, cmd)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ ", "", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = s.strip().rstrip(".").strip()
    unit = _UNIT_TAIL_RE.match(s)
    if unit:
        s = unit.group(1)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return re.sub(r"\s+", "", s).lower()


def as_number(s: str) -> Fraction | None:
    """The exact rational value of a normalised answer (``-3``, ``0.5``, ``1/2``, ``\\frac{1}{2}``), or None."""
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    try:
        if frac:
            sign = -1 if frac.group(1) else 1
            return sign * Fraction(int(frac.group(2)), int(frac.group(3)))
        if re.fullmatch(r"-?\d+/\d+", s):
            return Fraction(s)
        if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _normalised_equal(pred: str, gold: str) -> bool:
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a and a == b:
        return True
    x, y = as_number(a), as_number(b)
    return x is not None and y is not None and x == y


@functools.lru_cache(maxsize=4096)
def _math_parse(s: str, timeout: int | None) -> tuple:
    from math_verify import parse

    text = s if "$" in s or "\\boxed" in s else f"${s}$"
    return tuple(parse(text, parsing_timeout=timeout))


def _math_equal(pred: str, gold: str) -> bool:
    if len(pred) > MAX_MATH_CHARS or len(gold) > MAX_MATH_CHARS:
        return False
    timeout = MATH_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import verify

        g, p = _math_parse(gold, timeout), _math_parse(pred, timeout)
        if not g or not p:
            return False
        return bool(verify(list(g), list(p), timeout_seconds=timeout))
    except Exception:  # math-verify/sympy failures and timeouts mean "not verified"
        return False


def verify(pred: str | None, gold: str, verifier: str = "auto") -> bool:
    """Whether a predicted answer matches the ground truth (see the module docstring)."""
    if pred is None or not pred.strip():
        return False
    if verifier == "exact":
        return pred.strip() == gold.strip()
    if verifier == "normalised":
        return _normalised_equal(pred, gold)
    if verifier == "math":
        return _math_equal(pred, gold)
    if verifier == "auto":
        if _normalised_equal(pred, gold):
            return True
        # Two plain rationals that differ are different: math-verify cannot disagree, skip its cost.
        if as_number(normalize_answer(pred)) is not None and as_number(normalize_answer(gold)) is not None:
            return False
        return _math_equal(pred, gold)
    raise ValueError(f"unknown verifier {verifier!r}; known: {VERIFIERS}")


@dataclasses.dataclass(frozen=True)
class AnswerChecker:
    """The one answer checker used by rewards and evaluation.

    Attributes:
      extractor: one of ``EXTRACTORS``.
      verifier: one of ``VERIFIERS``.
    """

    extractor: str = "default"
    verifier: str = "auto"

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"unknown answer extractor {self.extractor!r}; known: {EXTRACTORS}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {self.verifier!r}; known: {VERIFIERS}")

    def __call__(self, completion: str, gold: str) -> tuple[str | None, bool]:
        """Returns (extracted answer or None, correct)."""
        answer = extract_answer(completion, self.extractor)
        return answer, verify(answer, gold, self.verifier)


def contains_answer(text: str, gold: str, question: str = "") -> bool:
    """Leak check: does ``text`` state the ground truth? (the rules are in ``protocol/leak.py``)."""
    from atlas_jax.protocol.leak import find_leak

    return find_leak(text, gold, question) is not None
