"""The leak detector's precision and recall on a hand-labelled table of teachings.

Every row was labelled by hand (does this teaching give the answer away to a student?) before the
detector was run on it; rows the detector gets wrong are kept, so the numbers are honest. Print them:

    PYTHONPATH=. python tests/test_leak_detector.py
"""

from __future__ import annotations

import pytest

from atlas_jax.protocol.answers import contains_answer
from atlas_jax.protocol.leak import find_leak

Q_PENCILS = "A box holds 12 pencils. How many pencils are in 7 boxes?"
Q_SUM = "Compute 17 * 23 - 91."
Q_ADD = "What is 40 + 2?"
Q_HALF = "What is half of 1/2?"
Q_CITY = "What is the capital of France?"

# (teaching, gold, question, leaks) — labelled by hand.
TABLE: list[tuple[str, str, str, bool]] = [
    # --- positives: the teaching states the answer ---------------------------------------------
    ("Multiply to get 84 pencils.", "84", Q_PENCILS, True),
    ("The total is 1,000 apples.", "1000", "", True),
    ("You should end with 42.0 exactly.", "42", "", True),
    ("So x = -3 here.", "-3", "", True),
    ("The answer is \\boxed{84}.", "84", Q_PENCILS, True),
    ("<think>It is 84.</think> Count the boxes.", "84", Q_PENCILS, True),
    ("<think>so the result is 42", "42", "", True),
    ("Remember <b>84</b> is the key number.", "84", Q_PENCILS, True),
    ("The answer is eighty-four.", "84", Q_PENCILS, True),
    ("You will find eighty four pencils.", "84", Q_PENCILS, True),
    ("There are one hundred and five of them.", "105", "", True),
    ("The result is seven.", "7", "", True),
    ("In the end you get twelve.", "12", "", True),
    ("That makes nine in total.", "9", "", True),
    ("Twenty is what you should reach.", "20", "", True),
    ("It equals two thousand.", "2000", "", True),
    ("Work out 12 * 7 and you are done.", "84", Q_PENCILS, True),
    ("Think of it as 80 + 4.", "84", Q_PENCILS, True),
    ("Use 12 x 7.", "84", Q_PENCILS, True),
    ("It is 12 × 7.", "84", Q_PENCILS, True),
    ("Just compute twelve times seven.", "84", Q_PENCILS, True),
    ("Consider 6 times 7.", "42", "", True),
    ("Try (10 + 4) * 6.", "84", Q_PENCILS, True),
    ("The value is 100 - 16.", "84", Q_PENCILS, True),
    ("Write it as 168 / 2.", "84", Q_PENCILS, True),
    ("Note that 391 - 91 is what remains.", "300", Q_SUM, True),
    ("The answer is \\frac{1}{4}.", "1/4", Q_HALF, True),
    ("The answer is 0.25.", "1/4", Q_HALF, True),
    ("It is \\frac{2}{8} after simplifying nothing.", "0.25", Q_HALF, True),
    ("The capital is Paris.", "Paris", Q_CITY, True),
    ("<think>Paris</think> Recall European capitals.", "Paris", Q_CITY, True),
    ("Compute 5-42 first.", "42", "", True),
    ("Half of 84 is 42, so the answer is twice 42.", "84", Q_PENCILS, True),
    ("The answer is the number of days in twelve weeks.", "84", Q_PENCILS, True),  # semantic: missed
    ("It is seven dozen.", "84", Q_PENCILS, True),  # semantic: missed
    # --- negatives: the teaching does not give the answer away ----------------------------------
    ("Multiply the pencils per box by the number of boxes.", "84", Q_PENCILS, False),
    ("Multiply 6 by 7.", "42", "", False),
    ("Remember that 142 is not prime.", "42", "", False),
    ("The 42nd step is the tricky one.", "42", "", False),
    ("A rate of 4.2 per hour is not the point.", "42", "", False),
    ("The number 840 is far too big.", "84", Q_PENCILS, False),
    ("Count 8 groups of 4 first.", "84", Q_PENCILS, False),
    ("Put the two groups together.", "2", "", False),
    ("Do it one step at a time.", "1", "", False),
    ("Try three different ways.", "3", "", False),
    ("There are seven boxes to count.", "84", Q_PENCILS, False),
    ("Start with 12 * 7 - wait, first check the units.", "90", "", False),
    ("First work out 17 * 23.", "300", Q_SUM, False),
    ("Do exactly what the problem says: 17 * 23 - 91.", "300", Q_SUM, False),
    ("Is 40 + 2 really the question? Then add them.", "42", Q_ADD, False),
    ("7+5=12;12+9=21", "25", "7+5+9+4", False),
    ("3+4=7;7+6=13", "15", "3+4+6+2", False),
    ("Subtract 3 from both sides.", "-3", "", False),
    ("Think about comparisons.", "Paris", Q_CITY, False),
    ("Parisian food is not the topic; think of the seat of government.", "Paris", Q_CITY, False),
    ("<thinking></thinking> Look at the units.", "84", Q_PENCILS, False),
    ("Divide the cookies among the children.", "6", "", False),
    ("Add the ones digit first, then the tens.", "1", "", False),
    ("Halve one half.", "1/4", Q_HALF, False),
    ("Check whether 0.5 times itself is what you want.", "1/4", Q_HALF, False),
    ("There are 2 steps in this problem.", "2", "", False),  # a count, flagged by the digit rule
    ("The answer is not 42; recheck.", "42", "", False),  # misleading, not a leak; flagged
]


def measure(table=TABLE) -> dict[str, float]:
    """Precision, recall and counts of ``contains_answer`` on ``table``."""
    tp = sum(1 for t, g, q, y in table if y and contains_answer(t, g, q))
    fp = sum(1 for t, g, q, y in table if not y and contains_answer(t, g, q))
    fn = sum(1 for t, g, q, y in table if y and not contains_answer(t, g, q))
    tn = len(table) - tp - fp - fn
    return {"precision": tp / (tp + fp), "recall": tp / (tp + fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "rows": len(table)}  # fmt: skip


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 40
    positives = sum(1 for *_, y in TABLE if y)
    assert 20 <= positives <= len(TABLE) - 20


def test_precision_and_recall_on_the_labelled_table():
    m = measure()
    # Measured 2026-12-01: 33/35 positives found (the two semantic ones are missed), 2 false positives.
    assert m["recall"] >= 0.9 and m["precision"] >= 0.9, m
    assert (m["fn"], m["fp"]) == (2, 2), m  # any change in behaviour on the table shows up here


@pytest.mark.parametrize(
    "teaching, gold, question, rule",
    [
        ("The answer is 84.", "84", "", "number"),
        ("The answer is eighty-four.", "84", "", "words"),
        ("Use 12 x 7.", "84", "", "expression"),
        ("The capital is Paris.", "Paris", "", "text"),
        ("Use 12 x 7.", "84", "Pencils: 12 x 7?", None),  # restates the question
        ("The two groups.", "2", "", None),
        ("", "84", "", None),
    ],
)
def test_each_rule(teaching, gold, question, rule):
    assert find_leak(teaching, gold, question) == rule


def test_the_literal_detector_missed_what_the_table_adds():
    """The previous (literal) check found numbers only; words and expressions are the new recall."""
    new = [(t, g, q) for t, g, q, y in TABLE if y and find_leak(t, g, q) in ("words", "expression")]
    assert len(new) >= 15


if __name__ == "__main__":
    m = measure()
    print(f"leak detector on {m['rows']} hand-labelled teachings: precision {m['precision']:.3f}, "
          f"recall {m['recall']:.3f} (tp {m['tp']}, fp {m['fp']}, fn {m['fn']}, tn {m['tn']})")  # fmt: skip
    for t, g, q, y in TABLE:
        got = contains_answer(t, g, q)
        if got != y:
            print(f"  {'FP' if got else 'FN'}: {t!r} (answer {g!r})")
