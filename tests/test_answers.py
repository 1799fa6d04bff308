"""Answer extraction and verification on a hand-written table (expected values written by hand)."""

import threading

import pytest

from atlas_jax.protocol.answers import (
    AnswerChecker,
    contains_answer,
    extract_answer,
    extract_boxed,
    normalize_answer,
    verify,
)

# (completion text, expected extracted answer) — default extractor.
EXTRACTION = [
    (r"So the result is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\boxed{7}}", "7"),  # nested boxes: the innermost, last box
    (r"answer \fbox{x+1}", "x+1"),
    (r"\boxed{ -3 }", "-3"),
    (r"\boxed{1,000}", "1,000"),
    (r"unclosed \boxed{12", None),
    ("<solution>17</solution>", "17"),
    ("<solution>\n  3/4 \n</solution>", "3/4"),
    (r"<solution>The value is \boxed{9}</solution>", "9"),
    ("<solution>5", "5"),
    ("The final answer is 8.", "8"),
    ("Thus the answer is $-2.5$.", "-2.5"),
    ("Answer: 12 cm", "12 cm"),
    ("blah\n#### 1,234", "1,234"),
    ("The answer is 3\nand then more text", "3"),
    ("I have no idea.", None),
    ("", None),
    (r"The answer is 4 but \boxed{5}", "5"),
]


@pytest.mark.parametrize("text, expected", EXTRACTION)
def test_extraction_table(text, expected):
    assert extract_answer(text) == expected


# (predicted answer, ground truth, expected verdict) — default "auto" verifier.
VERIFICATION = [
    ("42", "42", True),
    ("42", "43", False),
    ("-7", "-7", True),
    ("-7", "7", False),
    ("1/2", "0.5", True),
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\tfrac{3}{4}", r"\frac{3}{4}", True),
    ("2/4", "1/2", True),
    ("1,000", "1000", True),
    ("1,234,567", "1234567", True),
    ("12 cm", "12", True),
    ("12cm", "12", True),
    ("5 apples", "5", True),
    ("3x", "3", False),
    (r"12\text{ cm}", "12", True),
    (r"90^\circ", "90", True),
    (r"50\%", "50", True),
    ("$3$", "3", True),
    ("x = 3", "3", True),
    ("3.0", "3", True),
    ("0.333", "1/3", False),
    (r"\sqrt{4}", "2", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}", True),
    ("Paris", "paris", True),
    ("Paris.", "Paris", True),
    ("London", "Paris", False),
    ("", "3", False),
    (None, "3", False),
    ("(1, 2)", "(1,2)", True),
    ("x^2 + 2x + 1", "(x+1)^2", True),
    ("10", "1,0", False),
]


@pytest.mark.parametrize("pred, gold, expected", VERIFICATION)
def test_verification_table(pred, gold, expected):
    assert verify(pred, gold) is expected


def test_table_is_big_enough():
    assert len(EXTRACTION) + len(VERIFICATION) >= 40


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{7} done", "7"),
        ("<solution>11</solution>", "11"),
        ("the answer is 6.", "6"),
        ("x equals 3 and then 4", "4"),  # the original's last-number fallback
        (r"\boxed{\frac{1}{2}}", r"\frac{1"),  # the original's non-nested pattern (kept on purpose)
        ("nothing here", None),
    ],
)
def test_rcl_compat_extractor(text, expected):
    assert extract_answer(text, "rcl_compat") == expected


def test_exact_and_normalised_modes():
    assert verify("3.0", "3", "exact") is False
    assert verify(" 3 ", "3", "exact") is True
    assert verify("3.0", "3", "normalised") is True
    assert verify(r"\sqrt{4}", "2", "normalised") is False  # needs math-verify
    assert verify(r"\sqrt{4}", "2", "math") is True
    with pytest.raises(ValueError, match="known"):
        verify("1", "1", "fuzzy")


def test_math_verify_is_safe():
    # Garbage and huge inputs are "not verified", never an exception or a hang.
    assert verify(r"\frac{{{", r"\sqrt{", "math") is False
    assert verify("9" * 500, "9" * 500, "math") is False  # refused: longer than MAX_MATH_CHARS
    assert verify("9" * 500, "9" * 500) is True  # the normalised path still matches
    # Off the main thread the signal-based timeout cannot be used; it must still work.
    results = []
    thread = threading.Thread(target=lambda: results.append(verify(r"\sqrt{9}", "3")))
    thread.start()
    thread.join(timeout=30)
    assert results == [True]


def test_checker_and_helpers():
    checker = AnswerChecker()
    assert checker(r"... \boxed{1/2}", "0.5") == ("1/2", True)
    assert checker("no answer", "0.5") == (None, False)
    with pytest.raises(ValueError, match="extractor"):
        AnswerChecker(extractor="mine")
    assert extract_boxed(r"a \boxed{x^{2}} b") == "x^{2}"
    assert normalize_answer(r"$\left( 1, 2 \right)$") == "(1,2)"


@pytest.mark.parametrize(
    "teaching, gold, leaked",
    [
        ("Multiply 6 by 7 to get 42.", "42", True),
        ("Multiply 6 by 7.", "42", False),
        ("The total is 1,000 apples.", "1000", True),
        ("Remember that 142 is not prime.", "42", False),
        ("Step 2 needs 42.0 exactly", "42", True),
        ("compute 5-42 first", "42", True),
        ("The capital is Paris.", "Paris", True),
        ("Think about comparisons.", "Paris", False),
        ("think about x", "x", True),
        ("Subtract 3 from both sides.", "-3", False),
    ],
)
def test_leak_check(teaching, gold, leaked):
    assert contains_answer(teaching, gold) is leaked
