"""Evaluation harness arithmetic against hand-computed values (NDR, LR, LES, accuracies, bootstrap CIs)."""

import json

import numpy as np
import pytest

from atlas_jax import evaluation
from atlas_jax.evaluation import ArmOutcomes, arm_summary, bootstrap_ci, summarize

# Two seeds x two problems (difficulty 1 and 2).
P0 = np.array([[1.0, 0.0], [0.5, 0.0]])
P1 = np.array([[1.0, 1.0], [0.25, 0.5]])
TOKENS = np.array([[10, 20], [30, 40]])


def _outcomes():
    student = ArmOutcomes(
        P0, ["1", None, "2", "3"], ["stop", "stop", "length", "stop"], generation_time_s=1.5
    )
    teacher = ArmOutcomes(
        P1, ["1", "2", "3", "4"], ["stop"] * 4, p0=P0, teaching_tokens=TOKENS,
        leaked=np.array([[False, True], [False, False]]), generation_time_s=2.0,
    )  # fmt: skip
    return {"student_alone": student, "teacher": teacher}


def test_teacher_arm_matches_hand_computation():
    s = arm_summary(_outcomes()["teacher"], [1, 2])
    # deltas (seed-major): 0, +1, -0.25, +0.5
    assert s["lr"] == pytest.approx(1.25 / 4)
    assert s["ndr"] == pytest.approx(0.75)
    assert s["les"] == pytest.approx(1.25 / (100 / 1000))  # 12.5 per 1,000 teaching tokens
    assert s["teaching_tokens_mean"] == pytest.approx(25.0)
    assert s["accuracy"] == pytest.approx((1 + 1 + 0.25 + 0.5) / 4)
    assert s["accuracy_by_difficulty"] == {"1": pytest.approx(0.625), "2": pytest.approx(0.75)}
    assert s["accuracy_per_seed"] == [pytest.approx(1.0), pytest.approx(0.375)]
    assert s["completion_rate"] == pytest.approx(1.0)
    assert s["leak_rate"] == pytest.approx(0.25)
    assert s["num_interactions"] == 4
    assert s["generation_time_s"] == pytest.approx(2.0)


def test_student_arm_has_null_teaching_metrics():
    s = arm_summary(_outcomes()["student_alone"], [1, 2])
    assert s["accuracy"] == pytest.approx(0.375)
    assert s["accuracy_by_difficulty"] == {"1": pytest.approx(0.75), "2": pytest.approx(0.0)}
    assert s["completion_rate"] == pytest.approx(0.5)  # None answer and a truncated one
    for key in ("ndr", "lr", "les", "teaching_tokens_mean"):
        assert s[key] is None


def test_summarize_gain_and_json_shape(tmp_path):
    summary = summarize(_outcomes(), [1, 2], num_resamples=500)
    # per-problem (mean over seeds) teacher − student: 0.625 − 0.75, 0.75 − 0
    assert summary["teacher"]["gain_over_student"] == pytest.approx((-0.125 + 0.75) / 2)
    lo, hi = summary["teacher"]["gain_over_student_ci"]
    assert -0.125 <= lo <= hi <= 0.75
    paths = evaluation.write_results(tmp_path, summary)
    loaded = json.loads(paths["summary"].read_text())
    assert loaded["student_alone"]["ndr"] is None
    table = paths["table"].read_text()
    assert "| student_alone | 37.5% |" in table and "| teacher | 68.8% |" in table
    assert "| 75.0% | 0.312 | 12.5 |" in table  # NDR, LR and LES columns of the teacher row


def test_bootstrap_ci_hand_computed_cases():
    # Constant values: every resample has the same mean.
    assert bootstrap_ci([0.3] * 5) == pytest.approx((0.3, 0.3))
    # [0, 1]: resample means are 0, 0.5, 1 with P = 1/4, 1/2, 1/4, so the 2.5% / 97.5% quantiles are 0 and 1
    # (the chance that 1000 draws contain no 0-mean resample is 0.75**1000).
    assert bootstrap_ci([0.0, 1.0], num_resamples=1000) == pytest.approx((0.0, 1.0))
    # [0, 0, 0, 1]: mean = Binomial(4, 1/4) / 4; CDF(0) = 0.316, CDF(0.5) = 0.949, CDF(0.75) = 0.996, so the
    # 2.5% quantile is 0 and the 97.5% quantile is 0.75 (both many standard errors from a boundary at 4000 draws).
    assert bootstrap_ci([0, 0, 0, 1], num_resamples=4000) == pytest.approx((0.0, 0.75))
    # 50% interval of [0, 1]: quartiles of {0: 1/4, 0.5: 1/2, 1: 1/4} are 0.5 and 0.5 (well inside the atom).
    assert bootstrap_ci([0.0, 1.0], num_resamples=4000, confidence=0.4) == pytest.approx((0.5, 0.5))


def test_bootstrap_ci_is_seeded_and_validates():
    x = np.linspace(0, 1, 37)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)


def test_arm_summary_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"pass_rates must be \[seeds, 3\]"):
        arm_summary(ArmOutcomes(P0, [], []), [1, 2, 3])
