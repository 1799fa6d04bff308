"""``RolloutSource``: dynamic-sampling rounds and asynchronous (one-step-off) scheduling.

The scheduler is fed plain callables (a rollout function returning hand-made groups with chosen rewards,
a list as the data order); the end-to-end test runs it inside ``train_grpo`` with the real JAX engines.
"""

import threading

import numpy as np
import pytest

from atlas_jax.protocol.batch import Episode, ProblemGroup, RolloutBatch, StudentSamples
from atlas_jax.training.rollout_source import ROUND_STRIDE, RolloutSource, SourceSettings


def _samples() -> StudentSamples:
    return StudentSamples("p", ["a"], ["1"], [True], [1], ["stop"])


def _group(pid: str, rewards) -> ProblemGroup:
    eps = [
        Episode(
            "t", [1], [2], [-0.5], "stop", "x", "x", True, 1, False, _samples(), 1.0, 0.0, 0.0, float(r), {}
        )
        for r in rewards
    ]
    return ProblemGroup(pid, pid, "1", _samples(), 1.0, "probe", 1, eps)


class _World:
    """A data order over problem ids 0, 1, 2, … and a rollout whose rewards are set per problem id."""

    def __init__(self, informative: set[int]) -> None:
        self.next, self.informative = 0, informative
        self.calls: list[tuple[list[int], int, str, object]] = []  # (problems, seed step, thread, weights)
        self.weights: object = "live"
        self.pushes: list[object] = []

    def take(self, k):
        out = list(range(self.next, self.next + k))
        self.next += k
        return out

    def run(self, problems, seed_step):
        self.calls.append((list(problems), seed_step, threading.current_thread().name, self.weights))
        groups = [_group(str(p), [0.0, 1.0] if p in self.informative else [0.5, 0.5]) for p in problems]
        batch = RolloutBatch(groups)
        return batch, batch, {"time/gen_teacher": 1.0}

    def push(self, params):
        self.weights = "live" if params is None else params
        self.pushes.append(self.weights)

    def source(self, **kw) -> RolloutSource:
        return RolloutSource(
            self.run, self.take, lambda: {"index": self.next}, self.push, lambda: f"snapshot@{self.next}",
            SourceSettings(problems_per_step=4, **kw),
        )  # fmt: skip


def test_dynamic_sampling_rolls_out_more_until_the_target_and_keeps_only_informative_groups():
    w = _World(informative={1, 4, 5, 7, 9})
    sr = w.source(dynamic_sampling=True, dynamic_sampling_max_rounds=3).get(step=5)
    # round 1: problems 0-3 (1 informative), round 2: 4-7 (5, 7 and 4): target 4 reached after 2 rounds
    assert [c[0] for c in w.calls] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [c[1] for c in w.calls] == [5, 5 + ROUND_STRIDE]  # round k samples with its own seeds
    assert [g.problem_id for g in sr.batch.groups] == ["1", "4", "5", "7"]
    assert len(sr.generated.groups) == 8 and sr.position == {"index": 8}
    assert sr.stats["dynamic/kept_fraction"] == 4 / 8 and sr.stats["dynamic/rounds"] == 2.0
    assert sr.stats["dynamic/extra_groups"] == 4.0 and sr.stats["dynamic/target_met"] == 1.0
    assert sr.times["time/gen_teacher"] == 2.0  # summed over the rounds


def test_dynamic_sampling_cap_and_no_informative_group():
    w = _World(informative={2})
    sr = w.source(dynamic_sampling=True, dynamic_sampling_max_rounds=2).get(step=0)
    assert len(w.calls) == 2 and [g.problem_id for g in sr.batch.groups] == ["2"]
    assert sr.stats["dynamic/target_met"] == 0.0 and sr.stats["dynamic/groups_kept"] == 1.0
    w = _World(informative=set())
    sr = w.source(dynamic_sampling=True, dynamic_sampling_max_rounds=2).get(step=0)
    assert [g.problem_id for g in sr.batch.groups] == ["0", "1", "2", "3"]  # first round, zero advantages
    np.testing.assert_array_equal(sr.batch.rewards(), 0.5)


def test_off_by_default_one_round_on_policy_in_the_calling_thread():
    w = _World(informative=set())
    src = w.source()
    sr = src.get(step=3)
    src.prefetch(4, 10, weights_step=3)  # on-policy: nothing is submitted
    assert len(w.calls) == 1 and w.calls[0][2] == threading.current_thread().name
    assert w.pushes == ["live"] and sr.weights_step == 3 and sr.stats == {}
    assert sr.batch is sr.generated


@pytest.mark.parametrize("staleness", [1, 2])
def test_async_rollouts_run_ahead_in_a_thread_with_a_weight_snapshot(staleness):
    w = _World(informative=set())
    src = w.source(max_staleness=staleness)
    got = []
    for step in range(4):
        sr = src.get(step)
        src.prefetch(step + 1, 4, weights_step=step)
        got.append(sr)
    src.close()
    # the same problems, seeds and positions as on-policy, in order
    assert [c[0] for c in w.calls] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [c[1] for c in w.calls] == [0, 1, 2, 3]
    assert [sr.position["index"] for sr in got] == [4, 8, 12, 16]
    assert all(c[2].startswith("rollout") for c in w.calls)  # the worker thread, never the loop's
    # every rollout samples the snapshot pushed right before it, never the live weights
    assert all(c[3] != "live" and str(c[3]).startswith("snapshot") for c in w.calls)
    stale = [step - sr.weights_step for step, sr in enumerate(got)]
    assert stale == ([0, 1, 1, 1] if staleness == 1 else [0, 1, 2, 2])
    assert max(stale) == staleness


def test_rejects_bad_settings():
    w = _World(informative=set())
    with pytest.raises(ValueError, match="max_staleness"):
        w.source(max_staleness=-1)
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds"):
        w.source(dynamic_sampling=True, dynamic_sampling_max_rounds=0)
