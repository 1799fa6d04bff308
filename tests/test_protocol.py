"""Templates (placeholders, literal braces, chat rendering) and teaching extraction."""

import pytest
from protocol_helpers import make_tokenizer

from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.teaching import extract_teaching
from atlas_jax.protocol.templates import Templates, fill, render


def test_fill_keeps_literal_braces_and_never_rescans_inserted_text():
    template = r"Give \boxed{answer}; JSON {\"a\": {1}} {} {{x}} -- {question} / {approach}"
    out = fill(template, question="a {teaching} b {", approach="}{")
    assert out == r"Give \boxed{answer}; JSON {\"a\": {1}} {} {{x}} -- a {teaching} b { / }{"
    with pytest.raises(KeyError, match="teaching"):
        fill("{teaching}", question="q")


def test_templates_are_validated_at_start_up():
    Templates(student_baseline=r"{question} \boxed{} {not_a_placeholder}")  # unknown braces are literal text
    with pytest.raises(ValueError, match=r"'teacher' lacks placeholder.*\{approach\}"):
        Templates(teacher="Problem: {question}")
    with pytest.raises(ValueError, match=r"'student_taught' lacks placeholder.*\{teaching\}"):
        Templates(student_taught="{question}")
    with pytest.raises(ValueError, match=r"'student_baseline' uses placeholder.*\{teaching\}.*not available"):
        Templates(student_baseline="{question} {teaching}")
    with pytest.raises(ValueError, match=r"'student_probe' uses placeholder.*\{approach\}"):
        Templates(student_probe="{question} {approach}")
    with pytest.raises(ValueError, match="max_probe_tokens"):
        RolloutSettings(max_probe_tokens=0)
    with pytest.raises(ValueError, match=r"unknown reward 'best'.*asymmetric"):
        RolloutSettings(reward="best")
    with pytest.raises(ValueError, match="missing_teaching"):
        RolloutSettings(missing_teaching="guess")


def test_render_raw_and_chat():
    tok = make_tokenizer()
    assert render("hi {x}", tokenizer=tok, chat=False) == "hi {x}"
    chat = render("hi {x}", tokenizer=tok, chat=True, system="be brief")
    assert (
        chat
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi {x}<|im_end|>\n<|im_start|>assistant\n"
    )
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        render("hi", tokenizer=tok, chat=True)


@pytest.mark.parametrize(
    "completion, rule, expected",
    [
        (
            "<thinking>secret</thinking><teaching>Use the box.</teaching>",
            "strip_thinking",
            ("Use the box.", True),
        ),
        ("<teaching> a </teaching> trailing", "strip_thinking", ("a", True)),
        ("<teaching>cut off mid", "strip_thinking", ("cut off mid", True)),  # truncated teacher
        ("<teaching>a <thinking>secret</thinking>b</teaching>", "strip_thinking", ("a b", True)),
        ("<thinking>secret never closed <teaching>hint</teaching>", "strip_thinking", ("hint", True)),
        ("<thinking>secret never closed", "strip_thinking", ("", False)),
        ("<thinking>secret</thinking> plain hint", "strip_thinking", ("plain hint", False)),
        ("<thinking>secret</thinking> plain hint", "empty", ("", False)),
        ("just some advice", "strip_thinking", ("just some advice", False)),
        ("<TEACHING>Caps</TEACHING>", "empty", ("Caps", True)),
        ("<teaching>one</teaching><teaching>two</teaching>", "strip_thinking", ("one", True)),
    ],
)
def test_extract_teaching(completion, rule, expected):
    teaching, found = extract_teaching(completion, rule)
    assert (teaching, found) == expected
    assert "secret" not in teaching


def test_settings_from_the_job_config():
    from atlas_jax.protocol.settings import rollout_settings_from_config
    from configs.base import get_config

    c = get_config()
    s = rollout_settings_from_config(c)
    assert (s.k, s.m, s.group_size, s.max_probe_tokens) == (4, 4, 8, 50)
    assert s.reward == "asymmetric" and s.reward_params.degradation_penalty_multiplier == 2.0
    assert s.templates == Templates()  # empty strings keep the built-in templates
    c.protocol.teacher_template = "Q: {question} | plan: {approach} | {json: 1}"
    c.reward.leak_penalty = 1.5
    c.grpo.num_generations = 2
    s = rollout_settings_from_config(c)
    assert (
        s.templates.teacher.endswith("{json: 1}")
        and s.reward_params.leak_penalty == 1.5
        and s.group_size == 2
    )
    c.protocol.taught_template = "Q: {question}"
    with pytest.raises(ValueError, match=r"'student_taught' lacks placeholder"):
        rollout_settings_from_config(c)
    c.protocol.taught_template = ""
    c.reward.name = "nope"
    with pytest.raises(ValueError, match="known rewards"):
        rollout_settings_from_config(c)


def test_teacher_prompt_too_long_without_probe_is_an_error_naming_problem_and_flag():
    from protocol_helpers import HFEngine, make_model

    from atlas_jax.data.rl import Problem
    from atlas_jax.protocol.rollout import TwoPassRollout

    tok = make_tokenizer()
    engine = HFEngine(make_model(tok), tok)
    rollout = TwoPassRollout(engine, engine, RolloutSettings(max_prompt_tokens=10))
    # Too long even with the probe cut away (load-time screening drops such problems before a run).
    with pytest.raises(
        ValueError, match=r"problem 'p7' has \d+ tokens with an empty probe > protocol.max_prompt_tokens=10"
    ):
        rollout.teacher_prompts([Problem("p7", "What is 2+2?", "4")], ["add them"])
    with pytest.raises(ValueError, match="at least one problem"):
        rollout.run([])
