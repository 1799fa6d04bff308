"""Two-pass rollouts on real engines: shapes, probe budget, baseline caching, exact teacher ids,
and that thinking text never reaches the student.

Student and teacher use different locally trained tokenizers (vocab 320 vs 400).
"""

import pytest
from protocol_helpers import (
    SAMPLES,
    HFEngine,
    Recorder,
    make_jax_engine,
    make_model,
    make_tokenizer,
    train_to_emit,
)

from atlas_jax.data.rl import load_problems
from atlas_jax.protocol.answers import verify
from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.rollout import TwoPassRollout
from atlas_jax.rewards import RewardParams

P, G, K, M = 3, 3, 2, 2
SETTINGS = RolloutSettings(
    k=K,
    m=M,
    group_size=G,
    max_probe_tokens=5,
    max_teaching_tokens=12,
    max_student_tokens=8,
    student_temperature=1.0,
    teacher_temperature=1.0,
    seed=7,
)


@pytest.fixture(scope="module")
def problems():
    return load_problems(str(SAMPLES / "rl_sample.jsonl"))


@pytest.fixture(scope="module")
def student_tok():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def teacher_tok():
    return make_tokenizer(400)


def check_batch(batch, problems, settings, student: Recorder, teacher: Recorder, student_tok, teacher_tok):
    """Invariants every rollout must satisfy (shared by the JAX and vLLM tests)."""
    g_, k_, m_ = settings.group_size, settings.k, settings.m
    assert [g.problem_id for g in batch.groups] == [p.id for p in problems]
    assert batch.rewards().shape == (len(problems), g_)
    # Teacher: one call, G samples per problem, prompts passed as the exact teacher-token ids.
    assert len(teacher.calls) == 1
    t_prompts, t_params, t_n = teacher.calls[0]
    assert t_n == g_ and t_params.max_tokens == settings.max_teaching_tokens
    for group, ids in zip(batch.groups, t_prompts, strict=True):
        assert len(group.episodes) == g_
        assert len(group.baseline.texts) == k_ and len(group.baseline.correct) == k_
        assert group.probe_tokens <= settings.max_probe_tokens
        assert group.probe in teacher_tok.decode(ids)  # the teacher saw this problem's probe
        for ep in group.episodes:
            assert ep.teacher_prompt_ids == list(ids)  # same prompt for the whole group
            assert ep.teacher_prompt_ids == teacher_tok.encode(ep.teacher_prompt, add_special_tokens=False)
            assert len(ep.teacher_completion_ids) == len(ep.teacher_logprobs) <= settings.max_teaching_tokens
            assert all(lp <= 0.0 for lp in ep.teacher_logprobs)
            assert len(ep.taught.texts) == m_
            assert ep.p1 == sum(ep.taught.correct) / m_
            assert ep.delta == pytest.approx(ep.p1 - group.p0)
            for text, ans, ok in zip(ep.taught.texts, ep.taught.answers, ep.taught.correct, strict=True):
                assert ok == verify(ans, group.answer)
                assert text is not None
    # Student: prompts are text, tokenised by the student engine.
    for prompts, _, _ in student.calls:
        assert all(isinstance(p, str) for p in prompts)
    assert len(student_tok) != len(teacher_tok)


@pytest.mark.slow
def test_two_pass_rollout_on_jax_engines(problems, student_tok, teacher_tok):
    student = Recorder(make_jax_engine(student_tok, seed=1))
    teacher = Recorder(make_jax_engine(teacher_tok, seed=2))
    rollout = TwoPassRollout(student, teacher, SETTINGS)

    batch = rollout.run(problems[:P], step=0)
    check_batch(batch, problems[:P], SETTINGS, student, teacher, student_tok, teacher_tok)
    # Student phases: baseline (P prompts × k), probe (P × 1, ≤ max_probe_tokens), taught (P·G × m).
    (b_prompts, b_params, b_n), (p_prompts, p_params, p_n), (t_prompts, t_params, t_n) = student.calls
    assert (len(b_prompts), b_n, b_params.max_tokens) == (P, K, SETTINGS.max_student_tokens)
    assert (len(p_prompts), p_n, p_params.max_tokens) == (P, 1, SETTINGS.max_probe_tokens)
    assert (len(t_prompts), t_n) == (P * G, M)
    assert t_params.temperature == b_params.temperature == SETTINGS.student_temperature  # p0, p1 comparable
    for i, group in enumerate(batch.groups):
        for g, ep in enumerate(group.episodes):
            assert f"Teacher's guidance: {ep.teaching}" in t_prompts[i * G + g]
    assert batch.baseline_cache_hits == 0

    # Second step, overlapping problems: only the new problem gets baseline samples.
    student.calls.clear()
    teacher.calls.clear()
    first = {g.problem_id: g.baseline for g in batch.groups}
    batch2 = rollout.run(problems[1 : P + 1], step=1)
    check_batch(batch2, problems[1 : P + 1], SETTINGS, student, teacher, student_tok, teacher_tok)
    assert batch2.baseline_cache_hits == P - 1
    assert len(student.calls) == 3 and len(student.calls[0][0]) == 1  # one baseline prompt: the new problem
    assert rollout.num_baseline_calls == 2
    for g in batch2.groups[: P - 1]:
        assert g.baseline is first[g.problem_id]

    # Third step, all cached: no baseline call at all.
    student.calls.clear()
    teacher.calls.clear()
    batch3 = rollout.run(problems[:P], step=2)
    assert batch3.baseline_cache_hits == P and len(student.calls) == 2
    assert rollout.num_baseline_calls == 2


@pytest.mark.slow
def test_thinking_never_reaches_the_student(problems, student_tok, teacher_tok):
    """A real (HF, fitted) teacher that thinks before teaching; the JAX student must see only the teaching."""
    settings = RolloutSettings(
        k=1,
        m=1,
        group_size=2,
        max_probe_tokens=5,
        max_teaching_tokens=64,
        max_student_tokens=4,
        teacher_temperature=0.0,
        reward_params=RewardParams(leak_penalty=1.0),
    )
    student = Recorder(make_jax_engine(student_tok, seed=1))
    teacher_model = make_model(teacher_tok, seed=3)
    teacher = Recorder(HFEngine(teacher_model, teacher_tok))
    rollout = TwoPassRollout(student, teacher, settings)
    chosen = problems[:2]
    # Greedy probes are deterministic, so we know the exact teacher prompts and can fit the teacher to them.
    probes = [c.text.strip() for c in rollout.probes(chosen)]
    prompts = [text for text, _ in rollout.teacher_prompts(chosen, probes)[0]]
    secret = "zebra secret"
    train_to_emit(
        teacher_model, teacher_tok, prompts, f"<thinking>{secret}</thinking><teaching>use the box</teaching>"
    )
    student.calls.clear()

    batch = rollout.run(chosen)
    for group in batch.groups:
        assert group.probe in probes
        for ep in group.episodes:
            assert secret in ep.teacher_text  # the teacher really did think
            assert (ep.teaching, ep.teaching_tag_found) == ("use the box", True)
            assert ep.teaching_tokens == len(teacher_tok.encode("use the box", add_special_tokens=False))
            assert not ep.leaked
    taught_prompts = student.calls[-1][0]
    assert all("use the box" in p for p in taught_prompts)
    for prompts, _, _ in student.calls:
        for p in prompts:
            assert secret not in p and "<thinking>" not in p
    assert all(ep.eff > 0 and ep.teacher_finish_reason == "stop" for ep in batch.episodes)

    # Cut the same greedy teacher off inside its teaching: the partial teaching reaches the student, but a
    # truncated completion earns no efficiency bonus.
    import dataclasses

    cut = len(teacher_tok.encode(f"<thinking>{secret}</thinking><teaching>use", add_special_tokens=False))
    short = TwoPassRollout(student, teacher, dataclasses.replace(settings, max_teaching_tokens=cut))
    short.baseline_cache = rollout.baseline_cache
    for ep in short.run(chosen).episodes:
        assert ep.teacher_finish_reason == "length" and ep.teaching_tag_found and ep.teaching == "use"
        assert ep.eff == 0.0 and ep.reward_terms["eff"] == 0.0


@pytest.mark.slow
def test_empty_teaching_as_no_intervention(problems, student_tok, teacher_tok):
    """empty_teaching="baseline": an empty teaching makes no student call and scores Δ = 0 exactly;
    "template" asks the student with the empty teaching in the taught template."""
    import dataclasses

    settings = RolloutSettings(
        k=2, m=2, group_size=2, max_probe_tokens=5, max_teaching_tokens=16, max_student_tokens=4,
        student_temperature=1.0, teacher_temperature=0.0, empty_teaching="baseline",
    )  # fmt: skip
    student = Recorder(make_jax_engine(student_tok, seed=1))
    teacher_model = make_model(teacher_tok, seed=3)
    teacher = Recorder(HFEngine(teacher_model, teacher_tok))
    chosen = problems[:2]
    rollout = TwoPassRollout(student, teacher, settings)
    probes = [c.text.strip() for c in rollout.probes(chosen)]
    prompts = [text for text, _ in rollout.teacher_prompts(chosen, probes)[0]]
    train_to_emit(teacher_model, teacher_tok, prompts, "<teaching></teaching>")
    student.calls.clear()

    batch = rollout.run(chosen)
    # Only the baseline (k samples) and probe calls: no taught call for empty teachings.
    assert [n for _, _, n in student.calls] == [settings.k, 1]
    for group in batch.groups:
        for ep in group.episodes:
            assert (ep.teaching, ep.teaching_tag_found) == ("", True)
            assert ep.taught is group.baseline and ep.p1 == group.p0 and ep.delta == 0.0 and ep.eff == 0.0
            assert ep.reward == 0.0

    student.calls.clear()
    templ = TwoPassRollout(student, teacher, dataclasses.replace(settings, empty_teaching="template"))
    templ.baseline_cache = dict(rollout.baseline_cache)
    batch = templ.run(chosen)
    taught_calls = [c for c in student.calls if c[2] == settings.m]
    assert len(taught_calls) == 1 and len(taught_calls[0][0]) == len(chosen) * settings.group_size
    assert all(ep.taught is not g.baseline for g in batch.groups for ep in g.episodes)


def test_empty_teaching_rule_is_validated():
    with pytest.raises(ValueError, match="empty_teaching"):
        RolloutSettings(empty_teaching="skip")
