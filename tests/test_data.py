"""Data loading: RL/SFT schemas from jsonl/json/parquet/saved folders, seeded split, clear errors."""

import json
from pathlib import Path

import pytest
from protocol_helpers import SAMPLES, make_tokenizer

from atlas_jax.data.loading import DataError, load_rows, train_eval_split
from atlas_jax.data.rl import Problem, load_problems
from atlas_jax.data.sft import SFTFields, load_sft_examples, teacher_target
from atlas_jax.protocol.templates import Templates

RL_SAMPLE = str(SAMPLES / "rl_sample.jsonl")
SFT_SAMPLE = str(SAMPLES / "sft_sample.jsonl")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rl_sample_loads():
    problems = load_problems(RL_SAMPLE)
    assert len(problems) == 16
    assert problems[0] == Problem("rl-001", "A box holds 12 pencils. How many pencils are in 7 boxes?", "84")
    assert len({p.id for p in problems}) == 16


def test_json_parquet_and_saved_dir_give_the_same_problems(tmp_path):
    import datasets

    rows = [json.loads(line) for line in Path(RL_SAMPLE).read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    (tmp_path / "rl.json").write_text(json.dumps(rows))
    ds.to_parquet(str(tmp_path / "rl.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    expected = load_problems(RL_SAMPLE)
    assert load_problems(str(tmp_path / "rl.json")) == expected
    assert load_problems(str(tmp_path / "rl.parquet")) == expected
    assert load_problems(str(tmp_path / "saved")) == expected
    assert load_problems(str(tmp_path / "dd"), split="test") == expected[:3]
    with pytest.raises(DataError, match=r"no split 'dev'"):
        load_problems(str(tmp_path / "dd"), split="dev")


def test_bigmath_field_names_and_hashed_ids(tmp_path):
    path = _write_jsonl(
        tmp_path / "bm.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]
    )
    probs = load_problems(path, problem_field="problem", answer_field="answer")
    assert [p.answer for p in probs] == ["2", "4"]
    again = load_problems(path, problem_field="problem", answer_field="answer")
    assert [p.id for p in probs] == [p.id for p in again] and probs[0].id != probs[1].id


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "q1", "ground_truth": "1"}, {"prompt": "q2"}],
            r"bad\.jsonl line 2: missing field 'ground_truth'",
        ),
        (
            [{"prompt": "q1", "ground_truth": "1"}, {"prompt": "  ", "ground_truth": "1"}],
            r"line 2: field 'prompt' is empty",
        ),
        ([{"prompt": "q1", "ground_truth": 7}], r"line 1: field 'ground_truth' must be a string, got int"),
        ([{"prompt": None, "ground_truth": "7"}], r"line 1: field 'prompt' must be a string, got NoneType"),
    ],
)
def test_rl_row_errors_name_file_row_and_field(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_problems(path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "ground_truth": "1"}\n\n{"prompt": "b", "ground_truth": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 3: malformed JSON"):
        load_problems(str(path))
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_rows(str(path))


def test_missing_file_unknown_type_and_offline_hub(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_problems(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "x.csv"))
    # conftest sets HF_HUB_OFFLINE=1: a hub name fails at once with a message saying why.
    with pytest.raises(DataError, match="hub access is off"):
        load_problems("some-org/some-dataset")


def test_empty_and_duplicate_id_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_problems(str(tmp_path / "empty.jsonl"))
    rows = [
        {"id": "a", "prompt": "q1", "ground_truth": "1"},
        {"id": "a", "prompt": "q2", "ground_truth": "2"},
    ]
    with pytest.raises(DataError, match=r"line 2: id 'a' already used by .* line 1"):
        load_problems(_write_jsonl(tmp_path / "dup.jsonl", rows))


def test_seeded_split():
    items = list(range(100))
    train, ev = train_eval_split(items, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90
    assert sorted(train + ev) == items
    assert train_eval_split(items, 0.1, seed=3) == (train, ev)
    assert train_eval_split(items, 0.1, seed=4)[1] != ev
    assert train_eval_split([1, 2], 0.01, seed=0)[1] != []  # at least one held out
    assert train_eval_split(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(items, 1.0, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("chat", [False, True])
def test_sft_rendering_masks_only_the_target(tokenizer, chat):
    templates = Templates(teacher_chat=chat)
    examples = load_sft_examples(SFT_SAMPLE, tokenizer, templates=templates)
    assert len(examples) == 6
    row = json.loads(Path(SFT_SAMPLE).read_text().splitlines()[0])
    ex = examples[0]
    assert len(ex.input_ids) == len(ex.completion_mask)
    target = [t for t, m in zip(ex.input_ids, ex.completion_mask, strict=True) if m]
    prompt = [t for t, m in zip(ex.input_ids, ex.completion_mask, strict=True) if not m]
    assert ex.completion_mask == [0] * len(prompt) + [1] * len(target)  # prompt first, then target
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(target[:-1]) == (
        f"<thinking>\n{row['teacher_diagnosis']}\n</thinking>\n<teaching>\n{row['teacher_teaching']}\n</teaching>"
    )
    prompt_text = tokenizer.decode(prompt)
    assert row["problem_text"] in prompt_text and row["student_approach"] in prompt_text
    assert row["teacher_diagnosis"] not in prompt_text
    assert prompt_text.startswith("<|im_start|>user\n") is chat
    assert prompt_text.endswith("<|im_start|>assistant\n") is chat


def test_sft_truncates_from_the_left(tokenizer):
    full = load_sft_examples(SFT_SAMPLE, tokenizer)[0]
    n_target = sum(full.completion_mask)
    cut = load_sft_examples(SFT_SAMPLE, tokenizer, max_length=n_target + 5)[0]
    assert cut.input_ids == full.input_ids[-(n_target + 5) :]
    assert sum(cut.completion_mask) == n_target and cut.num_prompt_tokens == 5


def test_sft_errors(tmp_path, tokenizer):
    good = json.loads(Path(SFT_SAMPLE).read_text().splitlines()[0])
    bad = {k: v for k, v in good.items() if k != "teacher_teaching"}
    path = _write_jsonl(tmp_path / "sft.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"sft\.jsonl line 2: missing field 'teacher_teaching'"):
        load_sft_examples(path, tokenizer)
    renamed = {"q": good["problem_text"], "a": "x", "d": "y", "t": "z"}
    fields = SFTFields(problem="q", approach="a", diagnosis="d", teaching="t")
    ex = load_sft_examples(_write_jsonl(tmp_path / "r.jsonl", [renamed]), tokenizer, fields=fields)[0]
    assert tokenizer.decode([t for t, m in zip(ex.input_ids, ex.completion_mask, strict=True) if m][:-1]) == (
        teacher_target("y", "z")
    )


def test_unreachable_hub_fails_quickly(monkeypatch):
    import socket

    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match="hub is not reachable"):
        load_problems("some-org/some-dataset")
