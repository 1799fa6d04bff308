"""The shipped arithmetic teaching task: generator, splits, annotator, curriculum and tokenizer."""

import collections
import random
import re

import pytest

from atlas_jax.data import arith_task as task
from atlas_jax.protocol.answers import contains_answer


def test_problem_and_hint_chain_by_hand():
    p = task.Problem((7, 5, 9, 4))
    assert (p.text, p.answer, p.steps) == ("7+5+9+4", "25", 3)
    assert task.hint_chain(p.operands) == "7+5=12;12+9=21"
    assert task.hint_chain(p.operands, error_at=0, error=1) == "7+5=13;13+9=22"
    assert task.hint_chain((3, 4)) == ""  # 1-step problems have no intermediate result
    # A trusting student builds on the last partial sum: 22 + 4.
    assert task.followed_answer(p, "7+5=13;13+9=22") == "26"
    assert task.followed_answer(p, "check each step") == "25"
    assert task.answer_text("25") == "\\boxed{25}"
    assert task.probe_text(p) == "add 4 numbers"
    assert task.teaching_completion("x") == "<teaching>x</teaching>"


def test_correct_chain_never_states_the_answer():
    rng = random.Random(0)
    for steps in (2, 3):
        for _ in range(500):
            p = task.sample_problem(rng, steps)
            assert not contains_answer(task.hint_chain(p.operands), p.answer), p.text


def test_splits_are_fixed_and_held_out():
    settings = (task.TaskSizes(student_rows=3000, sft_rows=600, rl_problems=600, eval_per_level=20),
                task.StudentCurriculum(), task.AnnotatorMix())  # fmt: skip
    a, b = task.make_splits(*settings), task.make_splits(*settings)
    assert [p.text for p in a.eval] == [p.text for p in b.eval]
    assert [r.completion for r in a.student] == [r.completion for r in b.student]
    assert collections.Counter(p.steps for p in a.eval) == {1: 20, 2: 20, 3: 20}
    assert len({p.text for p in a.eval}) == 60
    held_out = {p.text for p in a.eval if p.steps > 1}
    used = {p.text for p in a.rl} | {r.problem.text for r in a.sft} | {r.problem.text for r in a.student}
    assert not held_out & used


def test_annotator_mix_frequencies():
    mix = task.AnnotatorMix()
    rng = random.Random(1)
    multi = [task.annotate(task.Problem((1, 2, 3)), rng, mix) for _ in range(4000)]
    counts = collections.Counter(style for style, _ in multi)
    for style, p in (
        ("useful", mix.multi_useful),
        ("generic", mix.multi_generic),
        ("wrong", mix.multi_wrong),
    ):
        assert abs(counts[style] / 4000 - p) < 0.03  # ~4 standard errors
    assert {t for s, t in multi if s == "useful"} == {"1+2=3"}
    assert all(t != "1+2=3" and "=" in t for s, t in multi if s == "wrong")
    single = collections.Counter(task.annotate(task.Problem((1, 2)), rng, mix)[0] for _ in range(4000))
    assert set(single) == {"empty", "generic", "long"}
    with pytest.raises(ValueError, match="sum to 1"):
        task.AnnotatorMix(multi_useful=0.9)


def test_student_curriculum_trusts_hints_and_never_solves_hard_problems_alone():
    cur = task.StudentCurriculum(trust_fraction=0.5)
    rows = task.student_rows(7, 6000, cur)
    kinds = collections.Counter((r.kind, r.problem.steps) for r in rows)
    assert kinds[("baseline", 3)] == 0 and kinds[("baseline", 1)] > 0
    chained = [r for r in rows if r.kind == "taught" and "=" in r.teaching]
    assert all(r.completion == task.answer_text(task.followed_answer(r.problem, r.teaching)) for r in chained)
    wrong = [r for r in chained if r.completion != task.answer_text(r.problem.answer)]
    assert 0.4 < len(wrong) / len(chained) < 0.6
    # Wrong partial sums are far off as well as near (so the student follows any value, not only ±1..3).
    sums = [int(x) for r in wrong for x in re.findall(r"=(\d+)", r.teaching)]
    assert min(sums) == 1 and max(sums) > 18
    offs = [abs(int(r.completion[len("\\boxed{") : -1]) - int(r.problem.answer)) for r in wrong]
    assert sum(o > 3 for o in offs) > len(offs) / 3
    probes = [r for r in rows if r.kind == "probe"]
    assert all(r.completion == task.probe_text(r.problem) for r in probes)


@pytest.mark.slow  # importing transformers takes ~30 s on a busy 2-core machine
def test_tokenizer_digits_tags_and_chat_template(tmp_path):
    from atlas_jax.data.task_tokenizer import load_tokenizer, train_tokenizer

    texts = ["Q: 7+5+9\nPlan: add 3 numbers\nTeach:<teaching>7+5=12</teaching>", "Q: 3+4\nA: \\boxed{7}"] * 20
    tok = load_tokenizer(train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300))
    ids = tok.encode("12+345", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "+", "3", "4", "5"]
    for tag in ("<teaching>", "</teaching>", "<thinking>", "</thinking>"):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    text = "<teaching>7+5=12</teaching>"
    ids = tok.encode(text + tok.eos_token, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text  # tags survive, EOS does not
    assert tok.eos_token_id == tok.pad_token_id
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="not empty"):
        train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
