"""SFT packing: segment-masked attention ≡ each example alone; packed loss/grads ≡ unpacked; packer edge cases.

Tolerances (float32 on CPU): per-token log-probs 1e-5 absolute; token-mean loss 1e-6 relative, gradients 1e-5
relative to each leaf's largest entry. Inside a packed row, masked keys get a finite -0.7·f32max logit whose
exp is exactly 0, so the only differences are summation order over the longer key axis.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from protocol_helpers import SAMPLES, make_model, make_tokenizer

from atlas_jax.models.kv_cache import KVCache
from atlas_jax.models.params import build_model
from atlas_jax.models.presets import get_preset
from atlas_jax.training import batching, train_step
from atlas_jax.training.logprobs import sequence_logprobs
from atlas_jax.training.sft import (
    EpochOrder,
    packing_supported,
    sft_loss_fn,
    sft_total_steps,
    take_step_examples,
)
from atlas_jax.training.validate import ConfigError, validate_config
from configs.base import get_config

LP_TOL = 1e-5


def _examples(seed, n, lo=3, hi=14, vocab=500):
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        k = int(rng.integers(lo, hi))
        ids.append([int(v) for v in rng.integers(1, vocab, k)])
        masks.append([0] * (k // 3) + [1] * (k - k // 3))
    return ids, masks


def _model(preset, remat=False):
    return build_model(get_preset(preset).replace(dtype="float32", remat=remat), seed=7)


@nnx.jit(static_argnames="packed")
def _logprobs(model, a, packed):
    seg = a["segment_ids"] if packed else None
    return sequence_logprobs(
        model, a["tokens"], a["attention_mask"], a["positions"], chunk=8, segment_ids=seg
    )


def _alone(model, x):
    a = batching.sft_arrays([x], [[1] * len(x)], max_length=len(x), length_bucket=16)
    return np.asarray(_logprobs(model, a, False)[0, : len(x)])


@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_qwen2", "tiny_llama"])
def test_packed_row_logprobs_equal_each_example_run_alone(preset):
    model = _model(preset)
    ids, masks = _examples(0, 7)
    p = batching.pack_rows(ids, masks, max_length=32)
    assert p["segment_ids"].max() >= 3  # several examples share a row
    packed = np.asarray(_logprobs(model, p, True))
    leaky = np.asarray(_logprobs(model, p, False))  # no segment mask: later examples see earlier ones
    worst, leak = 0.0, 0.0
    for r in range(len(p["tokens"])):
        for seg in range(1, int(p["segment_ids"][r].max()) + 1):
            where = np.flatnonzero(p["segment_ids"][r] == seg)
            x = [int(v) for v in p["tokens"][r, where]]
            ref = _alone(model, x)
            # the example's first token is predicted from the previous example's tokens: not scored, skip it
            worst = max(worst, float(np.abs(packed[r, where[1:]] - ref[1:]).max()))
            leak = max(leak, float(np.abs(leaky[r, where[1:]] - ref[1:]).max()))
    assert worst < LP_TOL, worst
    assert leak > 1e-3  # the test would catch attention across examples


def test_one_segment_per_row_is_bit_identical_to_the_unsegmented_path():
    model = _model("tiny_qwen3")
    ids, masks = _examples(1, 4)
    a = batching.sft_arrays(ids, masks, max_length=32, length_bucket=16)
    seg = a["attention_mask"].copy()  # right-padded rows: segment 1 on real tokens, 0 on padding
    h0, _ = model.hidden_states(a["tokens"], a["positions"], a["attention_mask"])
    h1, _ = model.hidden_states(a["tokens"], a["positions"], a["attention_mask"], segment_ids=seg)
    real = a["attention_mask"].astype(bool)
    np.testing.assert_array_equal(np.asarray(h0)[real], np.asarray(h1)[real])


def test_segment_ids_with_a_cache_is_refused():
    model = _model("tiny_qwen3")
    cache = KVCache.init(model.cfg, batch=1, max_len=8)
    x = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model.hidden_states(x, jnp.arange(4)[None], x, cache, segment_ids=x)


def _loss_grads(model, batch, num_micro):
    graphdef, params, rest = train_step.split_model(model)
    fn = jax.jit(lambda p, b: train_step.accumulate(graphdef, rest, sft_loss_fn(chunk=8), p, b, num_micro))
    g, s, d, _ = fn(params, batch)
    return float(s / d), float(d), jax.tree.map(lambda x: np.asarray(x / d), g)


@pytest.mark.slow
def test_packed_batch_loss_and_grads_equal_unpacked():
    model = _model("tiny_qwen3_untied", remat=True)  # the default run config rematerialises each layer
    ids, masks = _examples(2, 10)
    unpacked = batching.sft_arrays(ids, masks, max_length=32, length_bucket=16, pad_rows_to=2)
    p = batching.pack_rows(ids, masks, max_length=32)
    extra = batching.round_up(len(p["tokens"]), 2) - len(p["tokens"])
    packed = {k: np.pad(v, ((0, extra), (0, 0))) for k, v in p.items()}  # an all-padding row adds nothing
    assert len(packed["tokens"]) < len(unpacked["tokens"])
    lu, du, gu = _loss_grads(model, unpacked, 2)
    lp, dp, gp = _loss_grads(model, packed, 2)
    assert du == dp == sum(sum(m[1:]) for m in masks)  # completion tokens only; first tokens never targets
    np.testing.assert_allclose(lp, lu, rtol=1e-6)
    for k in gu:
        scale = float(np.abs(gu[k]).max())
        assert scale > 0, k
        assert float(np.abs(gp[k] - gu[k]).max()) <= 1e-5 * scale, k


def test_pack_rows_layout_first_fit_and_truncation():
    ids = [[1] * 6, [2] * 5, [3] * 4, [4] * 3, [5] * 12]
    masks = [[1] * 6, [0, 0, 1, 1, 1], [1] * 4, [0, 1, 1], list(range(12))]
    p = batching.pack_rows(ids, masks, max_length=10)
    # first fit: row0 = ex0(6) + ex2(4); row1 = ex1(5) + ex3(3); ex4 is cut to its last 10 tokens, alone in row2
    assert p["tokens"].shape == (3, 10)
    np.testing.assert_array_equal(p["tokens"][0], [1] * 6 + [3] * 4)
    np.testing.assert_array_equal(p["tokens"][1], [2] * 5 + [4] * 3 + [0, 0])
    np.testing.assert_array_equal(p["segment_ids"][1], [1] * 5 + [2] * 3 + [0, 0])
    np.testing.assert_array_equal(p["positions"][1], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(p["attention_mask"][1], [1] * 8 + [0, 0])
    np.testing.assert_array_equal(p["loss_mask"][1], [0, 0, 1, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(p["loss_mask"][0], [0] + [1] * 5 + [0] + [1] * 3)
    np.testing.assert_array_equal(p["loss_mask"][2], [0, *range(3, 12)])  # last 10 entries, first zeroed
    np.testing.assert_array_equal(p["positions"][2], np.arange(10))


def test_pack_rows_bad_rows_name_the_row():
    with pytest.raises(ValueError, match="row 1: empty example"):
        batching.pack_rows([[1, 2], []], [[0, 1], []], max_length=8)
    with pytest.raises(ValueError, match="row 1: 3 tokens but 2 loss-mask entries"):
        batching.pack_rows([[1, 2], [3, 4, 5]], [[0, 1], [0, 1]], max_length=8)


def test_first_fit_refuses_a_bin_beyond_max_bins():
    ff = batching.FirstFit(10, max_bins=2)
    assert ff.add(0, 7) and ff.add(1, 7) and ff.add(2, 3)
    assert not ff.add(3, 4)  # needs a third bin
    assert ff.bins == [[0, 2], [1]] and ff.add(4, 3)


def _sft_section(**kw):
    c = get_config()
    c.seed, c.data.shuffle = 5, True
    c.sft.packing, c.sft.batch_size, c.sft.max_length, c.sft.num_steps, c.sft.num_epochs = True, 2, 16, 0, 2
    for k, v in kw.items():
        c.sft[k] = v
    return c


def test_packed_steps_fill_rows_and_cover_each_epoch_once():
    config = _sft_section()
    lengths = [int(n) for n in np.random.default_rng(3).integers(2, 17, 23)]
    order = EpochOrder(len(lengths), config.seed, True)
    total = sft_total_steps(config, len(lengths), lengths)
    steps = [take_step_examples(order, lengths, config.sft) for _ in range(total + 1)]

    def rows(idx):
        ones = [[1] * lengths[i] for i in idx]
        return len(batching.pack_rows(ones, ones, max_length=16)["tokens"])

    for idx, nxt in itertools.pairwise(steps):
        assert (
            rows(idx) <= 2 < rows(idx + nxt[:1])
        )  # at most sft.batch_size rows, and filled: the next one spills
    seen = [i for idx in steps[:total] for i in idx]
    assert len(seen) >= 2 * len(lengths) > len(seen) - len(steps[total - 1])  # 2 epochs end in the last step
    assert sorted(seen[: len(lengths)]) == list(range(len(lengths)))  # epoch 1: each example exactly once
    assert total < len(lengths)  # unpacked: 2 epochs x 23 examples / 2 a step = 23 steps


def test_validation_accepts_packing():
    c = get_config()
    c.job, c.model.teacher_preset, c.data.sft_path = "sft", "tiny_qwen3", "x.jsonl"
    c.sft.packing, c.sft.batch_size, c.sft.micro_batch_size, c.sft.max_length = True, 8, 8, 512
    validate_config(c, num_devices=8)
    c.sft.max_length = 2048  # packed rows are exactly max_length tokens: they must fit the teacher's context
    with pytest.raises(ConfigError, match=r"sft\.max_length=2048 exceeds the teacher's context"):
        validate_config(c, num_devices=8)
    assert packing_supported(type(_model("tiny_qwen3")))


@pytest.mark.slow
def test_packed_sft_job_through_the_launcher_lowers_loss(tmp_path):
    from launch.train import train

    tok = make_tokenizer()
    make_model(tok, 0).save_pretrained(tmp_path / "teacher", safe_serialization=True)
    tok.save_pretrained(tmp_path / "teacher")
    rows = [json.loads(x) for x in (SAMPLES / "sft_sample.jsonl").read_text().splitlines()]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))  # 24 rows
    c = get_config()
    c.job, c.output_dir = "sft", str(tmp_path / "run")
    c.model.teacher, c.model.compute_dtype, c.model.remat = str(tmp_path / "teacher"), "float32", False
    c.data.sft_path, c.data.eval_fraction = str(data), 0.0
    c.logging.progress_bar, c.logging.tensorboard, c.checkpoint.async_save = False, False, False
    c.sft.packing, c.sft.max_length, c.sft.batch_size, c.sft.micro_batch_size = True, 256, 8, 8
    c.sft.num_steps, c.sft.num_epochs, c.sft.learning_rate = 0, 6, 3e-3
    train(c)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) >= 3
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss"] < 0.8 * recs[0]["loss"], [r["loss"] for r in recs]
