"""Reward guards (issue 10 item 5): on by default, Qwen3 <think> stripped, enable_thinking reaches the chat
template, no efficiency bonus for empty/untagged/truncated teachings, truncated rows maskable from the loss."""

import numpy as np
import pytest
from protocol_helpers import CHAT_TEMPLATE, make_tokenizer

from atlas_jax.data.loading import Row
from atlas_jax.data.sft import encode_sft_row
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.settings import rollout_settings_from_config
from atlas_jax.protocol.teaching import extract_teaching
from atlas_jax.protocol.templates import Templates, render
from atlas_jax.rewards import RewardInputs, asymmetric_reward, guarded_efficiency
from atlas_jax.training.host_rollout import mask_rows
from configs.run.teacher_rcl import get_config as rcl_config

# The enable_thinking branch of Qwen3's chat template, on our ChatML template.
QWEN3_LIKE = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}",
)


def test_guards_are_on_in_the_base_config_and_teacher_rcl():
    c = rcl_config()
    c.model.student = "unused"
    settings = rollout_settings_from_config(c)
    assert settings.empty_teaching == "baseline"
    assert settings.reward_params.leak_penalty == 1.0
    assert c.data.overlong == "skip" and c.grpo.mask_truncated is False
    assert RolloutSettings().empty_teaching == "baseline"
    # A leaked teaching that helped still loses its gain and pays λ under the default reward.
    r = asymmetric_reward(RewardInputs(p0=0.0, p1=1.0, eff=0.5, leaked=True), settings.reward_params)
    assert r["reward"] == -1.0 and r["gain"] == 0.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>secret</think><teaching>Use the box.</teaching>", ("Use the box.", True)),
        ("<think>\nsecret\n</think>\n\nPlain hint.", ("Plain hint.", False)),
        ("<think>secret never closed", ("", False)),
        ("<think>secret never closed <teaching>hint</teaching>", ("hint", True)),
        ("secret reasoning</think><teaching>hint</teaching>", ("hint", True)),  # <think> was in the prompt
        ("<teaching>a <think>secret</think>b</teaching>", ("a b", True)),
        ("<THINK>secret</THINK>hint", ("hint", False)),
    ],
)
def test_qwen3_think_is_stripped_like_thinking(completion, expected):
    teaching, found = extract_teaching(completion, "strip_thinking")
    assert (teaching, found) == expected and "secret" not in teaching


def test_enable_thinking_reaches_the_chat_template():
    tok = make_tokenizer()
    tok.chat_template = QWEN3_LIKE
    off = render("q", tokenizer=tok, chat=True, enable_thinking=False)
    on = render("q", tokenizer=tok, chat=True, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    # The config flags reach the protocol templates and the SFT prompts (the same teacher prompt as RL).
    c = rcl_config()
    c.protocol.teacher_chat, c.protocol.teacher_enable_thinking = True, True
    t = rollout_settings_from_config(c).templates
    assert (t.teacher_enable_thinking, t.student_enable_thinking) == (True, False)
    row = Row("sft.jsonl", 1, {"problem_text": "q", "student_approach": "a", "teacher_diagnosis": "d",
                               "teacher_teaching": "t"})  # fmt: skip
    for flag, closed in ((False, True), (True, False)):
        ex = encode_sft_row(row, tok, templates=Templates(teacher_chat=True, teacher_enable_thinking=flag))
        prompt = tok.decode(ex.input_ids[: ex.num_prompt_tokens])
        assert prompt.endswith("<think>\n\n</think>\n\n") is closed


def test_no_efficiency_bonus_without_a_proper_teaching():
    assert guarded_efficiency(0.8, teaching="hint", tag_found=True, truncated=False) == 0.8
    assert guarded_efficiency(0.8, teaching="  ", tag_found=True, truncated=False) == 0.0
    assert guarded_efficiency(0.8, teaching="hint", tag_found=False, truncated=False) == 0.0
    assert guarded_efficiency(0.8, teaching="hint", tag_found=True, truncated=True) == 0.0


def test_truncated_rows_are_masked_from_the_loss():
    arrays = {"completion_mask": np.ones((4, 3), np.float32)}  # 3 episodes + 1 padding row
    mask_rows(arrays, [False, True, False])
    np.testing.assert_array_equal(arrays["completion_mask"].sum(axis=1), [3, 0, 3, 3])
