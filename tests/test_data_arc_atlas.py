"""Arc-ATLAS-Teach v0/v1 fixtures (tests/fixtures/arc_atlas_teach) load; bad rows name file/row/field;
weighted sampling is seeded, follows the weights and resumes from its checkpointed position."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from protocol_helpers import make_tokenizer

from atlas_jax.data.loading import DataError
from atlas_jax.data.order import WeightedOrder
from atlas_jax.data.rl import content_hash, load_problems
from atlas_jax.data.sft import load_sft_examples
from atlas_jax.training.grpo_loop import problem_order
from atlas_jax.training.sft import EpochOrder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "arc_atlas_teach"
SFT_V0, RL_V0, RL_V1 = (str(FIXTURES / f) for f in ("sft_v0.jsonl", "rl_v0.jsonl", "rl_v1.jsonl"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_fixtures_have_the_exact_schemas():
    keys = {
        SFT_V0: {"problem_text", "student_approach", "teacher_diagnosis", "teacher_teaching"},
        RL_V0: {"prompt", "ground_truth", "problem_id", "student_level", "baseline_score"},
        RL_V1: {"prompt", "ground_truth", "problem_id", "student_level", "baseline_score", "outcome_bucket",
                "bandit_weight"},
    }  # fmt: skip
    for path, expected in keys.items():
        rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
        assert 30 <= len(rows) <= 60
        assert all(set(r) == expected for r in rows), path
    for r in (json.loads(x) for x in Path(RL_V0).read_text().splitlines()):
        assert r["ground_truth"].isdigit() and len(r["prompt"]) < 100  # short, checkable, tiny-model sized


def test_v0_rl_rows_load_with_ids_and_metadata():
    problems = load_problems(RL_V0)
    assert len(problems) == 40 and len({p.id for p in problems}) == 40
    first = problems[0]
    assert first.id == "aat-001"
    assert first.question == "Sam has 12 apples and buys 5 more. How many apples does Sam have now?"
    assert first.answer == "17" and first.weight is None
    assert first.meta == {"student_level": "strong", "baseline_score": 0.49}
    assert first.key == "aat-001#" + content_hash(first.question, "17")[:12]


def test_v1_rows_carry_bandit_weights_and_buckets():
    problems = load_problems(RL_V1)
    assert [p.id for p in problems] == [p.id for p in load_problems(RL_V0)]
    assert problems[1].weight == pytest.approx(0.366) and problems[0].weight == 0.0
    assert problems[2].meta["outcome_bucket"] == "degraded"
    assert isinstance(problem_order(problems, 0, True, {}), WeightedOrder)
    assert isinstance(problem_order(load_problems(RL_V0), 0, True, {}), EpochOrder)
    assert load_problems(RL_V1, weight_field="")[1].weight is None  # weights switched off


def test_v0_sft_rows_tokenise():
    tok = make_tokenizer()
    examples = load_sft_examples(SFT_V0, tok, max_length=512)
    assert len(examples) == 40
    for e in examples:
        assert e.input_ids[-1] == tok.eos_token_id and e.num_prompt_tokens > 0
        target = tok.decode([t for t, m in zip(e.input_ids, e.completion_mask, strict=True) if m])
        assert target.startswith("<thinking>") and "</teaching>" in target


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"bandit_weight": -1.0},
            r"v1\.jsonl line 2: field 'bandit_weight' must be a finite number >= 0, got -1\.0",
        ),
        ({"bandit_weight": "high"}, r"line 2: field 'bandit_weight' must be a number, got str"),
        ({"bandit_weight": True}, r"line 2: field 'bandit_weight' must be a number, got bool"),
        ({"bandit_weight": None}, r"line 2: missing field 'bandit_weight' \(other rows have it"),
        ({"baseline_score": "0.5"}, r"line 2: field 'baseline_score' must be a number, got str"),
        ({"baseline_score": float("nan")}, r"line 2: field 'baseline_score' must be a finite number"),
        ({"outcome_bucket": ["a"]}, r"line 2: field 'outcome_bucket' must be a string label, got list"),
        ({"problem_id": 1.5}, r"line 2: field 'problem_id' must be a string or integer id, got float"),
        ({"problem_id": " "}, r"line 2: field 'problem_id' is empty"),
        ({"ground_truth": 3}, r"line 2: field 'ground_truth' must be a string, got int"),
    ],
)
def test_bad_v1_rows_name_file_row_and_field(tmp_path, row, message):
    good = {"prompt": "What is 2 + 3?", "ground_truth": "5", "problem_id": "a", "bandit_weight": 1.0}
    second = {**good, "problem_id": "b", "prompt": "What is 4 + 4?", **row}
    with pytest.raises(DataError, match=message):
        load_problems(_write(tmp_path / "v1.jsonl", [good, second]))


def test_all_zero_weights_and_id_fallbacks(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "ground_truth": str(i + 1), "bandit_weight": 0} for i in range(3)]
    with pytest.raises(DataError, match=r"zero\.jsonl: every 'bandit_weight' is 0"):
        load_problems(_write(tmp_path / "zero.jsonl", rows))
    # No id column: a content hash (stable across loads); an explicit id_field wins over problem_id.
    a = load_problems(_write(tmp_path / "noid.jsonl", [{"prompt": "q", "ground_truth": "1"}]))
    assert a[0].id == content_hash("q", "1")[:16]
    both = [{"prompt": "q", "ground_truth": "1", "problem_id": "p1", "uid": "u1"}]
    assert load_problems(_write(tmp_path / "both.jsonl", both))[0].id == "p1"
    assert load_problems(str(tmp_path / "both.jsonl"), id_field="uid")[0].id == "u1"


def test_same_id_different_content_gets_a_different_cache_key(tmp_path):
    one = load_problems(_write(tmp_path / "a.jsonl", [{"prompt": "2 + 2?", "ground_truth": "4", "id": "x"}]))[
        0
    ]
    two = load_problems(_write(tmp_path / "b.jsonl", [{"prompt": "2 + 3?", "ground_truth": "5", "id": "x"}]))[
        0
    ]
    assert one.id == two.id and one.key != two.key


def test_weighted_order_is_seeded_follows_weights_and_resumes():
    w = [0.0, 1.0, 3.0, 0.5]
    a = WeightedOrder(w, seed=3)
    draws = a.take(5) + a.take(1) + a.take(20_000)
    assert WeightedOrder(w, seed=3).take(20_006) == draws  # independent of the step sizes
    assert WeightedOrder(w, seed=4).take(50) != draws[:50]
    counts = Counter(draws)
    assert 0 not in counts  # zero weight: never drawn
    freq = np.array([counts[i] for i in range(4)]) / len(draws)
    np.testing.assert_allclose(freq, np.array(w) / sum(w), atol=0.02)  # ±2 points on 20k draws (≈ 6σ)
    # Resume: a new order from the checkpointed position continues the same stream (across a block edge).
    b = WeightedOrder(w, seed=3)
    b.take(4090)
    pos = json.loads(json.dumps(b.position))
    assert pos == {"kind": "weighted", "draws": 4090}
    assert WeightedOrder(w, seed=3, position=pos).take(12) == draws[4090:4102]
    with pytest.raises(ValueError, match=r"unweighted .*epoch"):
        WeightedOrder(w, seed=3, position={"epoch": 1, "index": 2})
    with pytest.raises(ValueError, match="not all zero"):
        WeightedOrder([0.0, 0.0], seed=0)
