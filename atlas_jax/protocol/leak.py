"""Leak check: does a teaching (the text the student sees) state the ground-truth answer?

``find_leak(text, gold, question)`` returns the rule that fired, or None. Markup tags (``<think>``,
``<teaching>``, ...) are removed first and everything between them is checked: this function sees
the student's view, so an answer inside a ``<think>`` block that reached the student is a leak (the
protocol strips thinking blocks before the student sees them, ``protocol/teaching.py``). LaTeX
``\\frac{a}{b}`` is read as ``(a)/(b)``.

Numeric answers (``as_number(normalize_answer(gold))`` is a rational ``v``), first rule that fires:
  ``number``      a number written with digits equals v (thousands separators removed; for v ≥ 0 a
                  leading minus is ignored, ``x-42`` states 42). Digits inside a longer number
                  (``142``, ``4.2``) and ordinals (``42nd``) do not count.
  ``words``       a number written in words equals v (``forty-two``, ``one hundred and five``). A lone
                  small word (zero..twelve) counts only in an answer context: right after
                  is/equals/get/gives/makes/total/answer/result/becomes/be/= , or right before
                  total/altogether/left/remain (``the answer is seven``; not ``the two groups``).
  ``expression``  a maximal arithmetic expression over numbers (digits or words; ``+ - * / × ÷ ·``,
                  ``x`` between digits, ``plus/minus/times/multiplied by/divided by``, parentheses)
                  evaluates exactly (fractions) to v, and the same expression is not in the question
                  (restating the problem is not giving its answer away).
Other answers: ``text`` when the normalised answer occurs in the normalised text, not inside a
longer word.
"""

from __future__ import annotations

import re
from fractions import Fraction

from atlas_jax.protocol.answers import as_number, normalize_answer

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_NUMBER_WORD = "|".join(sorted([*_UNITS, *_TENS, *_SCALES], key=len, reverse=True))
_WORD_RUN_RE = re.compile(
    rf"\b(?:{_NUMBER_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_NUMBER_WORD}))*\b", re.IGNORECASE
)
_BEFORE = {"is", "are", "equals", "equal", "get", "gets", "got", "gives", "give", "makes", "make", "total",
           "totals", "answer", "result", "becomes", "be", "was", "="}  # fmt: skip
_AFTER = {"total", "altogether", "left", "remain", "remaining", "in all"}
_TAG_RE = re.compile(r"</?[a-zA-Z][\w-]*\s*/?>")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_DIGITS_RE = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?(?:/\d+)?(?![\d])(?!(?:st|nd|rd|th)\b)")
_WORD_OPS = (
    (re.compile(r"\bmultiplied\s+by\b", re.I), " * "),
    (re.compile(r"\bdivided\s+by\b", re.I), " / "),
    (re.compile(r"\btimes\b", re.I), " * "),
    (re.compile(r"\bplus\b", re.I), " + "),
    (re.compile(r"\bminus\b", re.I), " - "),
)
_NUM = r"\d+(?:\.\d+)?"
_OPERAND = rf"(?:\(\s*)*-?{_NUM}(?:\s*\))*"
_EXPR_RE = re.compile(rf"(?<![\w.]){_OPERAND}(?:\s*[-+*/^]\s*{_OPERAND})+(?!\w|\.\d)")


def _words_value(run: str) -> int | None:
    """Value of one number-word phrase, or None when the words do not form one number."""
    total, current, prev = 0, 0, ""
    for w in re.split(r"(?:\s+and\s+|[\s-]+)", run.lower()):
        if w in _UNITS:
            if prev in ("unit", "tens") and not (prev == "tens" and _UNITS[w] < 10):
                return None
            current += _UNITS[w]
            prev = "unit"
        elif w in _TENS:
            if prev in ("unit", "tens"):
                return None
            current += _TENS[w]
            prev = "tens"
        elif w == "hundred":
            current = max(current, 1) * 100
            prev = "hundred"
        else:  # thousand / million
            total += max(current, 1) * _SCALES[w]
            current, prev = 0, "scale"
    return total + current


def _split_runs(run: str) -> list[tuple[str, int]]:
    """Splits a run like ``two three`` into separate numbers; returns (phrase, value) pairs."""
    value = _words_value(run)
    if value is not None:
        return [(run, value)]
    parts = re.split(r"(?:\s+and\s+|[\s-]+)", run)
    return [(p, v) for p in parts if (v := _words_value(p)) is not None]


def _context_ok(text: str, start: int, end: int) -> bool:
    before = re.findall(r"[a-z]+|=", text[:start].lower())[-1:]
    after = text[end:].lower().lstrip(" ,")
    return bool(before and before[0] in _BEFORE) or any(re.match(rf"{re.escape(a)}\b", after) for a in _AFTER)


def _evaluate(expr: str) -> Fraction | None:
    """Exact value of ``+ - * / ^`` with parentheses (precedence, unary minus); None if malformed."""
    tokens = re.findall(rf"{_NUM}|[-+*/^()]", expr)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        tok = take()
        if tok == "-":
            return -atom()
        if tok == "(":
            value = add()
            if take() != ")":
                raise ValueError
            return value
        return Fraction(tok)

    def power() -> Fraction:
        base = atom()
        if peek() == "^":
            take()
            exp = power()
            if exp.denominator != 1 or abs(exp) > 64:
                raise ValueError
            return base**exp.numerator
        return base

    def mul() -> Fraction:
        value = power()
        while peek() in ("*", "/"):
            op, rhs = take(), power()
            value = value * rhs if op == "*" else value / rhs
        return value

    def add() -> Fraction:
        value = mul()
        while peek() in ("+", "-"):
            op, rhs = take(), mul()
            value = value + rhs if op == "+" else value - rhs
        return value

    try:
        value = add()
    except (ValueError, ZeroDivisionError, IndexError, OverflowError):
        return None
    return value if pos == len(tokens) else None


def _canonical(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def _expressions(text: str) -> list[str]:
    """Maximal arithmetic expressions, with word operators and ``x``/``×`` products made symbolic."""
    s = text.replace("×", "*").replace("·", "*").replace("÷", "/").replace("−", "-")
    s = re.sub(r"(?<=\d)\s*[xX]\s*(?=\d)", " * ", s)
    for pattern, op in _WORD_OPS:
        s = pattern.sub(op, s)
    out = []
    for m in _EXPR_RE.finditer(s):
        e = m.group(0).strip()
        while e.count("(") > e.count(")") and e.startswith("("):
            e = e[1:].strip()
        while e.count(")") > e.count("(") and e.endswith(")"):
            e = e[:-1].strip()
        out.append(e)
    return out


def _prepare(text: str) -> str:
    text = _TAG_RE.sub(" ", text)
    text = _FRAC_RE.sub(r"(\1)/(\2)", text)
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)


def _words_to_digits(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        return " ".join(str(v) for _, v in _split_runs(m.group(0))) or m.group(0)

    return _WORD_RUN_RE.sub(sub, text)


def find_leak(text: str, gold: str, question: str = "") -> str | None:
    """The rule by which ``text`` states ``gold`` ("number", "words", "expression", "text"), else None.

    Args:
      text: what the student sees (the teaching).
      gold: the ground-truth answer.
      question: the problem text; expressions that restate it are not leaks.
    """
    gold_norm = normalize_answer(gold)
    if not gold_norm or not text:
        return None
    value = as_number(gold_norm)
    body = _prepare(text)
    if value is None:
        pattern = r"(?<![a-z0-9])" + r"\s*".join(re.escape(ch) for ch in gold_norm) + r"(?![a-z0-9])"
        return "text" if re.search(pattern, body.lower()) else None
    for token in _DIGITS_RE.findall(body):
        number = as_number(token)
        if number is not None and (number == value or (value >= 0 and -number == value)):
            return "number"
    for m in _WORD_RUN_RE.finditer(body):
        for phrase, v in _split_runs(m.group(0)):
            if v != value:
                continue
            lone_small = v <= 12 and not re.search(r"[\s-]", phrase.strip())
            if not lone_small or _context_ok(body, m.start(), m.end()):
                return "words"
    restated = (
        {_canonical(e) for e in _expressions(_words_to_digits(_prepare(question)))} if question else set()
    )
    for expr in _expressions(_words_to_digits(body)):
        if _canonical(expr) not in restated and _evaluate(expr) == value:
            return "expression"
    return None
