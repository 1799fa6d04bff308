"""LR / NDR / LES / accuracy / completion rate on hand-computed examples."""

import pytest

from atlas_jax.metrics import (
    accuracy,
    completion_rate,
    learning_efficiency_score,
    learning_rate,
    non_degradation_rate,
    rollout_metrics,
)
from atlas_jax.protocol.batch import Episode, ProblemGroup, RolloutBatch, StudentSamples


def test_scalar_metrics():
    deltas = [0.5, 0.0, -0.25, 0.75]
    assert learning_rate(deltas) == pytest.approx(0.25)
    assert non_degradation_rate(deltas) == pytest.approx(0.75)
    # Σ Δ = 1.0 over 400 teaching tokens -> 2.5 per 1,000 tokens.
    assert learning_efficiency_score(deltas, [100, 100, 100, 100]) == pytest.approx(2.5)
    assert learning_efficiency_score(deltas, [0, 0, 0, 0]) == 0.0
    assert accuracy([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert completion_rate(["1", None, "3", "4"], ["stop", "stop", "length", "stop"]) == pytest.approx(0.5)
    assert learning_rate([]) == 0.0 and non_degradation_rate([]) == 0.0 and completion_rate([], []) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        learning_efficiency_score([0.1], [1, 2])


def _samples(correct, answers, reasons, tokens):
    return StudentSamples("p", ["t"] * len(correct), answers, correct, tokens, reasons)


def _episode(p0, taught, teaching_tokens, reward, leaked=False):
    return Episode(
        teacher_prompt="q",
        teacher_prompt_ids=[1, 2],
        teacher_completion_ids=[3, 4, 5],
        teacher_logprobs=[-1.0, -1.0, -1.0],
        teacher_finish_reason="stop",
        teacher_text="<teaching>x</teaching>",
        teaching="x",
        teaching_tag_found=True,
        teaching_tokens=teaching_tokens,
        leaked=leaked,
        taught=taught,
        p1=taught.pass_rate,
        delta=taught.pass_rate - p0,
        eff=0.0,
        reward=reward,
        reward_terms={"reward": reward, "gain": max(reward, 0.0)},
    )


def test_rollout_metrics_on_a_hand_built_batch():
    base = _samples([True, False], ["1", None], ["stop", "length"], [4, 8])  # p0 = 0.5
    e1 = _episode(0.5, _samples([True, True], ["1", "1"], ["stop", "stop"], [3, 3]), 10, 1.0)  # Δ = +0.5
    e2 = _episode(
        0.5, _samples([False, False], ["2", "2"], ["stop", "stop"], [3, 3]), 30, -1.0, True
    )  # Δ = −0.5
    batch = RolloutBatch([ProblemGroup("a", "q", "1", base, 0.5, "probe", 7, [e1, e2])])
    m = rollout_metrics(batch)
    assert m["lr_delta"] == pytest.approx(0.0)
    assert m["ndr"] == pytest.approx(0.5)
    assert m["les"] == pytest.approx(0.0)
    assert m["acc_with_teaching"] == pytest.approx(0.5)
    assert m["acc_without_teaching"] == pytest.approx(0.5)
    assert m["completion_with_teaching"] == pytest.approx(1.0)
    assert m["completion_without_teaching"] == pytest.approx(0.5)
    assert m["teaching_tokens_mean"] == pytest.approx(20.0)
    assert m["probe_tokens_mean"] == pytest.approx(7.0)
    assert m["leak_rate"] == pytest.approx(0.5)
    assert m["reward_mean"] == pytest.approx(0.0) and m["reward_std"] == pytest.approx(1.0)
    assert m["reward/gain"] == pytest.approx(0.5)
    assert batch.rewards().tolist() == [[1.0, -1.0]]
