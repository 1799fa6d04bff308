"""Per-host rollouts in one process: shares of a rollout seeded by their row offsets equal the whole rollout.

The multi-process version (2 real processes vs 1) is ``tests/test_distributed.py::
test_grpo_job_two_processes_equals_one``; here the pieces are checked where a failure is easy to read:
share bounds, the prompt-width padding against ``batching.grpo_arrays``, and the protocol itself run as
two shares (each with the row offsets the other share's counts give) against one call for all problems.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from protocol_helpers import SAMPLES, make_jax_engine, make_tokenizer

from atlas_jax.data.rl import load_problems
from atlas_jax.engines.base import SamplingParams
from atlas_jax.models.sharding import make_mesh
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.rollout import TwoPassRollout
from atlas_jax.training import batching
from atlas_jax.training.host_rollout import even_bounds, pad_prompt_columns, process_shares

G = 2
SETTINGS = RolloutSettings(
    k=2, m=2, group_size=G, max_probe_tokens=5, max_teaching_tokens=10, max_student_tokens=6,
    student_temperature=1.0, teacher_temperature=1.0, probe_temperature=0.7, seed=3,
)  # fmt: skip


def test_even_bounds_cover_every_item_once():
    for n, count in ((10, 3), (4, 4), (7, 2), (3, 1)):
        bounds = [even_bounds(n, count, i) for i in range(count)]
        assert [b[0] for b in bounds] == [0] + [b[1] for b in bounds[:-1]]
        assert bounds[-1][1] == n
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    assert even_bounds(10, 3, 0) == (0, 4) and even_bounds(10, 3, 2) == (7, 10)


def test_single_process_share_is_every_problem():
    mesh = make_mesh((2, 2, 1), devices=jax.devices()[:4])
    assert process_shares(mesh, 4, G) == [(0, 4)]
    with pytest.raises(ValueError, match="multiple of 4"):
        process_shares(mesh, 3, 1)  # 3 rows do not split over 4 devices


def test_prompt_padding_equals_arrays_built_with_the_global_width():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 50, n)) for n in (3, 70, 5, 9)]  # row 1 needs a second bucket
    comps = [list(rng.integers(1, 50, n)) for n in (4, 2, 6, 1)]
    lps = [list(-rng.random(len(c))) for c in comps]
    adv = [0.5, -0.5, 1.0, -1.0]
    whole = batching.grpo_arrays(prompts, comps, lps, adv, completion_len=8, prompt_bucket=64)
    part = batching.grpo_arrays(prompts[2:], comps[2:], lps[2:], adv[2:], completion_len=8, prompt_bucket=64)
    assert part["tokens"].shape[1] < whole["tokens"].shape[1]
    widened = pad_prompt_columns(part, whole["tokens"].shape[1] - 8, 8)
    for k, v in whole.items():
        np.testing.assert_array_equal(widened[k], v[2:], err_msg=k)
    with pytest.raises(ValueError, match="prompt columns"):
        pad_prompt_columns(whole, 8, 8)


@pytest.mark.slow
def test_two_shares_with_row_offsets_equal_one_rollout():
    """Problems [0, 2) and [2, 3) rolled out apart, seeded by row offsets, give the same samples and rewards."""
    problems = load_problems(str(SAMPLES / "rl_sample.jsonl"))[:3]
    s_tok, t_tok = make_tokenizer(320), make_tokenizer(400)
    student, teacher = make_jax_engine(s_tok, seed=1), make_jax_engine(t_tok, seed=2)
    whole = TwoPassRollout(student, teacher, SETTINGS).run(problems, step=5)

    # Share 0 starts every phase at row 0; share 1 after share 0's 2 problems (its 2·G taught prompts).
    first = {"baseline": 0, "probe": 0, "teacher": 0, "taught": 0}
    second = {"baseline": 2, "probe": 2, "teacher": 2, "taught": 2 * G}
    seen: list[tuple[str, int]] = []

    def offsets(table):
        return lambda phase, count: seen.append((phase, count)) or table[phase]

    a = TwoPassRollout(student, teacher, SETTINGS, row_offsets=offsets(first)).run(problems[:2], step=5)
    b = TwoPassRollout(student, teacher, SETTINGS, row_offsets=offsets(second)).run(problems[2:], step=5)
    assert seen[:4] == [("baseline", 2), ("probe", 2), ("teacher", 2), ("taught", 2 * G)]
    groups = a.groups + b.groups
    assert [g.problem_id for g in groups] == [g.problem_id for g in whole.groups]
    for got, want in zip(groups, whole.groups, strict=True):
        assert got.baseline.texts == want.baseline.texts and got.probe == want.probe
        for e, f in zip(got.episodes, want.episodes, strict=True):
            assert e.teacher_completion_ids == f.teacher_completion_ids
            assert e.taught.texts == f.taught.texts
            assert e.reward == f.reward
    np.testing.assert_array_equal(np.concatenate([a.rewards(), b.rewards()]), whole.rewards())
    # Without the offsets the second share draws other samples (the offsets are what makes them equal).
    plain = TwoPassRollout(student, teacher, SETTINGS).run(problems[2:], step=5)
    assert [e.teacher_completion_ids for e in plain.episodes] != [
        e.teacher_completion_ids for e in b.episodes
    ]


def test_row_offset_share_of_a_batch_samples_what_the_whole_batch_samples():
    tok = make_tokenizer(320)
    engine = make_jax_engine(tok, seed=1)
    prompts = ["What is 2 + 3?", "Name a prime.", "Count to three.", "What is 7 - 4?"]
    p = SamplingParams(temperature=1.0, max_tokens=6, seed=9)
    whole = engine.generate(prompts, p, n=2)
    part = engine.generate(
        prompts[2:], SamplingParams(temperature=1.0, max_tokens=6, seed=9, row_offset=2), n=2
    )
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    assert ids(part) == ids(whole)[2:]
    assert ids(engine.generate(prompts[2:], p, n=2)) != ids(whole)[2:]
    with pytest.raises(ValueError, match="row_offset"):
        SamplingParams(row_offset=-1)
