"""Over-long problems are found at load time (skipped with a count, or refused up front), and a probe that
re-tokenises too long for the teacher is cut at run time instead of crashing the step."""

import pytest
from protocol_helpers import HFEngine, make_model, make_tokenizer

from atlas_jax.data.rl import Problem
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.rollout import TwoPassRollout
from atlas_jax.protocol.screening import overlong_reason, screen_problems
from atlas_jax.protocol.templates import Templates

TEMPLATES = Templates(
    student_baseline="Q: {question}\nA:",
    student_probe="Q: {question}\nPlan:",
    teacher="Q: {question}\nPlan: {approach}\nTeach:",
    student_taught="Q: {question}\nPlan: {approach}\nHint: {teaching}\nA:",
)


@pytest.fixture(scope="module")
def engine():
    tok = make_tokenizer()
    return HFEngine(make_model(tok), tok)


def _rollout(engine, limit, probe=8):
    return TwoPassRollout(engine, engine, RolloutSettings(max_prompt_tokens=limit, max_probe_tokens=probe,
                                                          templates=TEMPLATES))  # fmt: skip


def _len(engine, text):
    return len(engine.tokenizer.encode(text, add_special_tokens=False))


def test_budget_rules_by_hand(engine):
    q = "What is 3 + 4?"
    teacher = _len(engine, f"Q: {q}\nPlan: \nTeach:")
    taught = _len(engine, f"Q: {q}\nPlan: \nHint: \nA:")
    p = Problem("p", q, "7")
    # The taught prompt (with its {approach}) is the longest: it decides, with the probe budget of 8.
    assert taught > teacher
    assert overlong_reason(_rollout(engine, taught + 8), p) is None
    reason = overlong_reason(_rollout(engine, taught + 7), p)
    assert (
        reason == f"student taught prompt {taught} + probe budget 8 tokens > max_prompt_tokens={taught + 7}"
    )
    assert overlong_reason(_rollout(engine, teacher + 7), p).startswith(
        f"teacher prompt {teacher} + probe budget 8"
    )


def test_skip_reports_and_error_refuses_up_front(engine):
    short = [Problem(f"s{i}", f"What is {i} + 1?", str(i + 1)) for i in range(3)]
    long = Problem("long", "Count the apples. " * 30, "1")
    rollout = _rollout(engine, 64)
    kept, dropped = screen_problems(rollout, [short[0], long, *short[1:]], mode="skip")
    assert kept == short and [p.id for p, _ in dropped] == ["long"]
    with pytest.raises(ValueError, match=r"rl\.jsonl: 1 of 4 problems are too long: 'long': teacher prompt \d+"
                                         r".*--config\.data\.overlong=skip"):  # fmt: skip
        screen_problems(rollout, [*short, long], mode="error", source="rl.jsonl")
    with pytest.raises(ValueError, match="1 of 1 problems are too long"):  # nothing left to train on
        screen_problems(rollout, [long], mode="skip")
    with pytest.raises(ValueError, match=r"data\.overlong must be one of"):
        screen_problems(rollout, short, mode="truncate")


def test_a_too_long_probe_is_cut_to_fit(engine):
    p = Problem("p", "What is 3 + 4?", "7")
    base = _len(engine, "Q: What is 3 + 4?\nPlan: \nTeach:")
    rollout = _rollout(engine, base + 4)
    probe = "add the two numbers then check the sum again carefully"
    prompts, used = rollout.teacher_prompts([p, p], [probe, "add"])
    assert len(prompts[0][1]) <= base + 4 and probe.startswith(used[0]) and used[0] != probe
    assert prompts[0][0] == f"Q: What is 3 + 4?\nPlan: {used[0]}\nTeach:"
    assert used[1] == "add" and rollout.probes_cut == 1  # a probe that fits is left alone
