"""The shipped teaching task: chained single-digit additions of graded difficulty.

A problem is a sum of ``steps + 1`` single-digit operands, e.g. ``7+5+9`` (2 steps, answer 21).
The task is built so that a tiny student genuinely needs guidance on some problems and not others:

- **Student** (trained by the pipeline, then frozen): answers 1-step problems (``7+5``) reliably; sees
  2-step problems without help only in a small fraction of its data (so it is mediocre there) and never
  sees 3-step problems without help (weak). It also learns to answer *with a hint*: the hint is the
  chain of partial sums up to the last operand (``7+5=12;12+9=21`` for ``7+5+9+4``), which turns any
  problem into one 1-step addition (``21+4``). Its hints are always correct, so it trusts them: a wrong
  partial sum makes it answer wrong (guidance can hurt).
- **Probe** (pass 1): the student states its plan, ``add 3 numbers``, which tells the teacher how hard
  the problem is for it.
- **Teacher SFT data** is written by a noisy annotator (``annotate``): on multi-step problems a mix of
  the useful partial-sum chain, generic advice that does not help, and chains with a wrong number; on
  1-step problems (which the student already solves) empty, generic or overly long advice. The best
  teaching (what GRPO should find) is the correct chain on multi-step problems and nothing on 1-step.
- **Leak check**: the correct chain never contains the final answer (problems where it would are not
  generated), so a teacher cannot win by giving the answer away.

Everything is a pure function of a seed: ``make_splits`` draws disjoint train / RL / eval problem sets
from fixed per-split seeds, so the held-out split is the same for every run.
"""

from __future__ import annotations

import dataclasses
import random
import re

ANSWER_OPEN = "\\boxed{"
GENERIC_ADVICE = (
    "add one at a time",
    "check each step",
    "go left to right",
    "be careful",
)
LONG_ADVICE = (
    "this one is easy, just add the two numbers and then check again",
    "go slowly, add from left to right and check each step once more",
)
# A trusted wrong partial sum is drawn uniformly from 1..(right + TRUST_SPREAD): far-off values too, so the
# student follows *any* last partial sum and a teacher cannot find hints the student silently ignores.
TRUST_SPREAD = 8
# Fixed seeds of the three disjoint splits (offset by the run seed only when asked to).
SPLIT_SEEDS = {"student": 1_000, "sft": 2_000, "rl": 3_000, "eval": 4_000}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
      operands: the single-digit operands (1..9), at least two.
      text: ``"7+5+9"``.
      answer: the sum as a string.
      steps: number of additions (``len(operands) - 1``), the difficulty.
      problem_id: stable id (the text is unique within a split).
    """

    operands: tuple[int, ...]

    @property
    def text(self) -> str:
        return "+".join(str(x) for x in self.operands)

    @property
    def answer(self) -> str:
        return str(sum(self.operands))

    @property
    def steps(self) -> int:
        return len(self.operands) - 1

    @property
    def problem_id(self) -> str:
        return f"arith:{self.text}"


def hint_chain(operands: tuple[int, ...], *, error_at: int | None = None, error: int = 0) -> str:
    """The partial sums of all operands but the last: ``7+5=12;12+9=21`` for ``7+5+9+4``.

    Args:
      operands: the problem's operands.
      error_at: index of the partial sum to corrupt (None = correct chain).
      error: amount added to that partial sum (the chain continues from the wrong value).

    Returns:
      "" for 1-step problems (there is no intermediate result).
    """
    parts = []
    acc = operands[0]
    for i, x in enumerate(operands[1:-1]):
        new = acc + x + (error if error_at == i else 0)
        parts.append(f"{acc}+{x}={new}")
        acc = new
    return ";".join(parts)


def probe_text(problem: Problem) -> str:
    """The student's plan (pass 1): ``add 3 numbers``."""
    return f"add {len(problem.operands)} numbers"


def answer_text(answer: str) -> str:
    """The student's answer completion: ``\\boxed{21}``."""
    return f"{ANSWER_OPEN}{answer}}}"


def contains_number(text: str, number: str) -> bool:
    """True if ``number`` occurs in ``text`` as a whole number (not as part of a longer one)."""
    return re.search(rf"(?<!\d){re.escape(number)}(?!\d)", text) is not None


def _leaks(problem: Problem) -> bool:
    chain = hint_chain(problem.operands)
    return problem.answer in chain


def sample_problem(rng: random.Random, steps: int, max_operand: int = 9) -> Problem:
    """Draws a problem of ``steps`` additions (operands 1..max_operand) whose hint does not state the answer."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    while True:
        p = Problem(tuple(rng.randint(1, max_operand) for _ in range(steps + 1)))
        if not _leaks(p):
            return p


def sample_problems(
    seed: int,
    n: int,
    steps_weights: dict[int, float],
    exclude: frozenset[str] = frozenset(),
    max_operand: int = 9,
) -> list[Problem]:
    """Draws ``n`` distinct problems with difficulty drawn from ``steps_weights``.

    Args:
      seed: random seed (the same seed gives the same list).
      n: number of problems.
      steps_weights: {steps: weight}; e.g. ``{1: 1, 2: 1, 3: 1}``.
      exclude: multi-step problem texts that must not be drawn (other splits). 1-step problems are the
        81 single-digit facts, shared by every split (the student must know them all).

    Raises:
      ValueError: the weights are empty/non-positive or ``n`` distinct problems cannot be drawn.
    """
    if not steps_weights or any(w < 0 for w in steps_weights.values()) or sum(steps_weights.values()) <= 0:
        raise ValueError(f"steps_weights must have non-negative weights with a positive sum: {steps_weights}")
    rng = random.Random(seed)
    levels = sorted(steps_weights)
    weights = [steps_weights[s] for s in levels]
    local: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct problems with {steps_weights} (got {len(out)})")
        p = sample_problem(rng, rng.choices(levels, weights)[0], max_operand)
        if p.text in local or (p.steps > 1 and p.text in exclude):
            continue
        local.add(p.text)
        out.append(p)
    return out


def balanced_problems(
    seed: int,
    per_level: int,
    levels: tuple[int, ...],
    exclude: frozenset[str] = frozenset(),
    max_operand: int = 9,
) -> list[Problem]:
    """``per_level`` distinct problems for each difficulty in ``levels`` (e.g. the eval split)."""
    out: list[Problem] = []
    taken = set(exclude)
    for i, s in enumerate(levels):
        ps = sample_problems(seed + 17 * i, per_level, {s: 1.0}, frozenset(taken), max_operand)
        taken.update(p.text for p in ps)
        out.extend(ps)
    return out


@dataclasses.dataclass(frozen=True)
class StudentRow:
    """One student training example.

    Attributes:
      kind: "baseline" (answer alone), "probe" (pass-1 plan) or "taught" (answer with a hint).
      problem: the problem.
      teaching: the hint ("" unless kind == "taught").
      completion: the target text (answer or plan).
    """

    kind: str
    problem: Problem
    teaching: str
    completion: str


@dataclasses.dataclass(frozen=True)
class StudentCurriculum:
    """What the student is trained on (see the module docstring).

    Attributes:
      probe_fraction: fraction of rows that are probes.
      alone_fraction: per difficulty, the probability that a row of that difficulty is answered
        without a useful hint (baseline prompt or generic advice); the rest get the partial-sum chain.
        1-step problems have no chain, so they are always answered alone.
      trust_fraction: fraction of chained rows whose chain has one wrong partial sum (any value in
        ``1..right + TRUST_SPREAD``) and whose target is built on it (last partial sum + last operand):
        the student learns to *trust* the hint's last intermediate result instead of recomputing it, so
        wrong guidance hurts, whatever the wrong value (an earlier curriculum with only ±1..3 errors let
        GRPO find far-off "sums" the student ignored and then answered right: reward hacking).
      empty_hint_fraction: of the rows answered without a useful hint through the taught template, the
        fraction whose hint is empty (the rest get generic or long advice): an empty teaching must leave the
        student as it is alone.
      levels: difficulty weights of the drawn problems.
    """

    probe_fraction: float = 0.15
    alone_fraction: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 0.1), (3, 0.0))
    trust_fraction: float = 0.25
    empty_hint_fraction: float = 0.3
    levels: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 1.0), (3, 1.0))


def followed_answer(problem: Problem, teaching: str) -> str:
    """The answer of a student that trusts the hint: last partial sum in ``teaching`` + last operand."""
    nums = re.findall(r"=(\d+)", teaching)
    if not nums:
        return problem.answer
    return str(int(nums[-1]) + problem.operands[-1])


def student_rows(
    seed: int,
    n: int,
    curriculum: StudentCurriculum,
    exclude: frozenset[str] = frozenset(),
    max_operand: int = 9,
) -> list[StudentRow]:
    """Draws ``n`` student training rows (problems with replacement; multi-step ones not in ``exclude``)."""
    rng = random.Random(seed)
    levels = [s for s, _ in curriculum.levels]
    weights = [w for _, w in curriculum.levels]
    alone = dict(curriculum.alone_fraction)
    rows: list[StudentRow] = []
    while len(rows) < n:
        p = sample_problem(rng, rng.choices(levels, weights)[0], max_operand)
        if p.steps > 1 and p.text in exclude:
            continue
        if rng.random() < curriculum.probe_fraction:
            rows.append(StudentRow("probe", p, "", probe_text(p)))
        elif p.steps == 1 or rng.random() < alone.get(p.steps, 0.0):
            kind = rng.choice(("baseline", "taught"))
            hint = ""
            if kind == "taught" and rng.random() >= curriculum.empty_hint_fraction:
                hint = rng.choice((*GENERIC_ADVICE, *LONG_ADVICE))
            rows.append(StudentRow(kind, p, hint, answer_text(p.answer)))
        else:
            if rng.random() < curriculum.trust_fraction:
                at = rng.randrange(p.steps - 1)
                right = sum(p.operands[: at + 2])
                wrong = rng.choice([v for v in range(1, right + TRUST_SPREAD + 1) if v != right])
                hint = hint_chain(p.operands, error_at=at, error=wrong - right)
            else:
                hint = hint_chain(p.operands)
            rows.append(StudentRow("taught", p, hint, answer_text(followed_answer(p, hint))))
    return rows


@dataclasses.dataclass(frozen=True)
class AnnotatorMix:
    """The noisy annotator's style probabilities (each group sums to 1).

    Attributes:
      multi_useful, multi_generic, multi_wrong: styles on multi-step problems (correct chain, generic
        advice, chain with one wrong partial sum).
      single_empty, single_generic, single_long: styles on 1-step problems (no teaching, a short
        generic sentence, an overly long one).
    """

    multi_useful: float = 0.4
    multi_generic: float = 0.35
    multi_wrong: float = 0.25
    single_empty: float = 0.2
    single_generic: float = 0.4
    single_long: float = 0.4

    def __post_init__(self) -> None:
        for group in (
            (self.multi_useful, self.multi_generic, self.multi_wrong),
            (self.single_empty, self.single_generic, self.single_long),
        ):
            if any(x < 0 for x in group) or abs(sum(group) - 1.0) > 1e-6:
                raise ValueError(f"AnnotatorMix probabilities must be >= 0 and sum to 1 per group: {self}")


def annotate(problem: Problem, rng: random.Random, mix: AnnotatorMix) -> tuple[str, str]:
    """One teaching written by the noisy annotator.

    Returns:
      (style, teaching) with style in {"useful", "generic", "wrong", "empty", "long"}.
    """
    if problem.steps == 1:
        style = rng.choices(
            ("empty", "generic", "long"), (mix.single_empty, mix.single_generic, mix.single_long)
        )[0]
        text = {"empty": "", "generic": rng.choice(GENERIC_ADVICE), "long": rng.choice(LONG_ADVICE)}[style]
        return style, text
    style = rng.choices(
        ("useful", "generic", "wrong"), (mix.multi_useful, mix.multi_generic, mix.multi_wrong)
    )[0]
    if style == "useful":
        return style, hint_chain(problem.operands)
    if style == "generic":
        return style, rng.choice(GENERIC_ADVICE)
    for _ in range(20):
        err = rng.choice((-2, -1, 1, 2))
        text = hint_chain(problem.operands, error_at=rng.randrange(problem.steps - 1), error=err)
        if not contains_number(text, problem.answer):
            return style, text
    return "generic", rng.choice(GENERIC_ADVICE)


def teaching_completion(teaching: str) -> str:
    """The teacher's completion for a teaching text: ``<teaching>...</teaching>``."""
    return f"<teaching>{teaching}</teaching>"


@dataclasses.dataclass(frozen=True)
class TaskSizes:
    """How much data each phase gets.

    Attributes:
      student_rows: student training rows (``student_rows``).
      sft_rows: teacher SFT rows written by the annotator.
      rl_problems: problems drawn for GRPO (with replacement; multi-step ones never in eval).
      eval_per_level: held-out problems per difficulty (distinct; multi-step ones in no other split).
      levels: the difficulties (number of additions).
      max_operand: operands are drawn from 1..max_operand.
    """

    student_rows: int = 20_000
    sft_rows: int = 2_000
    rl_problems: int = 2_000
    eval_per_level: int = 48
    levels: tuple[int, ...] = (1, 2, 3)
    max_operand: int = 9


@dataclasses.dataclass(frozen=True)
class SFTRow:
    """One annotated teacher example: the problem, the (canonical) student plan, style and teaching."""

    problem: Problem
    approach: str
    style: str
    teaching: str


@dataclasses.dataclass(frozen=True)
class TaskSplits:
    """All the data of a quickstart run; the same for every run seed (fixed ``SPLIT_SEEDS``)."""

    student: list[StudentRow]
    sft: list[SFTRow]
    rl: list[Problem]
    eval: list[Problem]


def draw_with_replacement(
    seed: int, n: int, levels: tuple[int, ...], exclude: frozenset[str], max_operand: int = 9
) -> list[Problem]:
    """``n`` problems, difficulty uniform over ``levels``, multi-step ones not in ``exclude``."""
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < n:
        p = sample_problem(rng, rng.choice(levels), max_operand)
        if p.steps == 1 or p.text not in exclude:
            out.append(p)
    return out


def make_splits(sizes: TaskSizes, curriculum: StudentCurriculum, mix: AnnotatorMix) -> TaskSplits:
    """Builds the held-out eval split first, then the student, SFT and RL data around it."""
    eval_problems = balanced_problems(
        SPLIT_SEEDS["eval"], sizes.eval_per_level, sizes.levels, max_operand=sizes.max_operand
    )
    held_out = frozenset(p.text for p in eval_problems)
    student = student_rows(
        SPLIT_SEEDS["student"], sizes.student_rows, curriculum, held_out, sizes.max_operand
    )
    rng = random.Random(SPLIT_SEEDS["sft"] + 1)
    sft = []
    for p in draw_with_replacement(
        SPLIT_SEEDS["sft"], sizes.sft_rows, sizes.levels, held_out, sizes.max_operand
    ):
        style, teaching = annotate(p, rng, mix)
        sft.append(SFTRow(p, probe_text(p), style, teaching))
    rl = draw_with_replacement(
        SPLIT_SEEDS["rl"], sizes.rl_problems, sizes.levels, held_out, sizes.max_operand
    )
    return TaskSplits(student=student, sft=sft, rl=rl, eval=eval_problems)
