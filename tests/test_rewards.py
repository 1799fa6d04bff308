"""Reward table: every case for each reward, hand-derived numbers, and the effect of each knob."""

import pytest

from atlas_jax.rewards import (
    REWARDS,
    RewardInputs,
    RewardParams,
    asymmetric_reward,
    efficiency_bonus,
    get_reward,
    rcl_compat_reward,
    student_shorter_efficiency,
    teaching_length_efficiency,
)

DEFAULT = RewardParams()  # μ = 2, w = 1, no leak penalty


@pytest.mark.parametrize(
    "p0, p1, eff, expected",
    [
        (0.0, 1.0, 0.5, 1.5),  # improve: 1·(1 + 0.5)
        (1.0, 1.0, 0.5, 0.0),  # keep (both right)
        (1.0, 0.0, 0.5, -2.0),  # degrade: −2·1
        (0.0, 0.0, 0.5, 0.0),  # both wrong
        (0.25, 0.75, 0.2, 0.6),  # fractional improve: 0.5·1.2
        (0.75, 0.5, 0.9, -0.5),  # fractional degrade: −2·0.25
        (0.5, 0.5, 1.0, 0.0),  # fractional keep
    ],
)
def test_asymmetric_table(p0, p1, eff, expected):
    terms = asymmetric_reward(RewardInputs(p0, p1, eff), DEFAULT)
    assert terms["reward"] == pytest.approx(expected)
    assert terms["reward"] == pytest.approx(terms["gain"] + terms["degradation"] + terms["leak"])
    assert terms["delta"] == pytest.approx(p1 - p0)


def test_asymmetric_multiplier_is_used():
    x = RewardInputs(0.75, 0.5, 0.0)
    assert asymmetric_reward(x, RewardParams(degradation_penalty_multiplier=0.0))["reward"] == 0.0
    assert asymmetric_reward(x, RewardParams(degradation_penalty_multiplier=3.0))["reward"] == pytest.approx(
        -0.75
    )
    # The multiplier does not touch improvements.
    up = RewardInputs(0.0, 0.5, 0.0)
    assert asymmetric_reward(up, RewardParams(degradation_penalty_multiplier=7.0))["reward"] == pytest.approx(
        0.5
    )


def test_asymmetric_efficiency_weight_is_used():
    x = RewardInputs(0.25, 0.75, 0.2)
    assert asymmetric_reward(x, RewardParams(efficiency_weight=0.0))["reward"] == pytest.approx(0.5)
    assert asymmetric_reward(x, RewardParams(efficiency_weight=2.0))["reward"] == pytest.approx(0.7)
    # The weight does not soften degradations.
    down = RewardInputs(1.0, 0.5, 1.0)
    assert asymmetric_reward(down, RewardParams(efficiency_weight=5.0))["reward"] == pytest.approx(-1.0)


def test_leak_penalty_removes_gain_and_subtracts():
    params = RewardParams(leak_penalty=1.0)
    up = asymmetric_reward(RewardInputs(0.0, 1.0, 0.5, leaked=True), params)
    assert (up["gain"], up["leak"], up["reward"]) == (0.0, -1.0, -1.0)
    down = asymmetric_reward(RewardInputs(0.75, 0.5, 0.0, leaked=True), params)
    assert down["reward"] == pytest.approx(-0.5 - 1.0)
    # A leak flag without a penalty changes nothing; a penalty without a leak changes nothing.
    assert asymmetric_reward(RewardInputs(0.0, 1.0, 0.5, leaked=True), DEFAULT)["reward"] == pytest.approx(
        1.5
    )
    assert asymmetric_reward(RewardInputs(0.0, 1.0, 0.5), params)["reward"] == pytest.approx(1.5)
    rcl = rcl_compat_reward(RewardInputs(0.0, 1.0, 0.3, leaked=True), params)
    assert rcl["reward"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "p0, p1, eff, expected",
    [
        (0.0, 1.0, 0.3, 1.3),  # improve: 1 + eff
        (1.0, 1.0, 0.3, 0.3),  # both right: eff
        (1.0, 0.0, 0.3, -1.0),  # degrade: −1
        (0.0, 0.0, 0.3, 0.0),  # both wrong: 0
        (0.5, 0.5, 0.0, 0.0),  # .5·.5·1 − .5·.5 = 0
        (0.5, 0.5, 0.2, 0.1),  # .25·1.2 + .25·.2 − .25
        (0.25, 1.0, 0.0, 0.75),  # 1·.75·1 + .25·0 − 0
    ],
)
def test_rcl_compat_table(p0, p1, eff, expected):
    terms = rcl_compat_reward(RewardInputs(p0, p1, eff), DEFAULT)
    assert terms["reward"] == pytest.approx(expected)
    assert terms["reward"] == pytest.approx(
        terms["improve"] + terms["keep"] + terms["degradation"] + terms["leak"]
    )


def test_rcl_compat_ignores_multiplier_and_weight():
    x = RewardInputs(0.5, 0.25, 0.4)
    a = rcl_compat_reward(x, RewardParams(degradation_penalty_multiplier=0.0, efficiency_weight=0.0))
    b = rcl_compat_reward(x, RewardParams(degradation_penalty_multiplier=5.0, efficiency_weight=3.0))
    assert a["reward"] == pytest.approx(b["reward"])


def test_efficiency_definitions():
    assert teaching_length_efficiency(64, 256) == pytest.approx(0.75)
    assert teaching_length_efficiency(0, 256) == 1.0
    assert teaching_length_efficiency(300, 256) == 0.0
    assert student_shorter_efficiency(100, 60) == pytest.approx(0.4)
    assert student_shorter_efficiency(100, 120) == 0.0
    assert student_shorter_efficiency(0, 5) == 0.0
    kw = dict(teaching_tokens=128, max_teaching_tokens=512, baseline_tokens=10.0, taught_tokens=5.0)
    assert efficiency_bonus("teaching_length", **kw) == pytest.approx(0.75)
    assert efficiency_bonus("student_shorter", **kw) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="teaching_length"):
        efficiency_bonus("nope", **kw)


def test_registry_and_validation():
    assert set(REWARDS) == {"asymmetric", "rcl_compat"}
    assert get_reward("asymmetric") is asymmetric_reward
    with pytest.raises(ValueError, match=r"unknown reward 'foo'.*asymmetric.*rcl_compat"):
        get_reward("foo")
    with pytest.raises(ValueError, match="p1"):
        RewardInputs(0.0, 1.5)
    with pytest.raises(ValueError, match="degradation_penalty_multiplier"):
        RewardParams(degradation_penalty_multiplier=-1.0)
    with pytest.raises(ValueError, match="efficiency"):
        RewardParams(efficiency="shortest")
