"""Attention kernels vs the dense reference on CPU: left padding, packed segments, decode over the filled cache.

Tolerances (compared on real tokens only; pad rows are never read): float32 1e-5 absolute (same maths, different
fusion); bfloat16 inputs 2e-2 absolute (bf16 rounding of q/k/v and of the probabilities). Whole-model parity of
"xla" vs "dense" logits: 1e-4 (float32). The TPU/GPU kernels are compiled ahead of time in tests/test_aot_plan.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.models import KVCache, attention, build_model
from atlas_jax.models.presets import get_preset

B, T, N, K, H = 3, 12, 4, 2, 32


def _qkv(dtype, s=T):
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((B, T, N, H)), dtype)
    k = jnp.asarray(r.standard_normal((B, s, K, H)), dtype)
    v = jnp.asarray(r.standard_normal((B, s, K, H)), dtype)
    return q, k, v


def _segments():
    """Row 0 left-padded (3 pads), row 1 two packed examples + 2 trailing pads, row 2 full."""
    pad = attention.PAD_SEGMENT
    return jnp.asarray(
        [[pad] * 3 + [1] * 9, [1] * 5 + [2] * 5 + [pad] * 2, [1] * 12],
        jnp.int32,
    )


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_xla_self_attention_matches_dense(dtype, atol):
    q, k, v = _qkv(dtype)
    seg = _segments()
    want = attention.self_attention(q, k, v, seg, impl="dense", dtype=dtype)
    got = attention.self_attention(q, k, v, seg, impl="xla", dtype=dtype)
    real = np.asarray(seg) != attention.PAD_SEGMENT
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))[real]
    assert diff.max() <= atol, diff.max()


def test_self_attention_respects_segments_and_causality():
    q, k, v = _qkv(jnp.float32)
    seg = _segments()
    out = attention.self_attention(q, k, v, seg, impl="xla", dtype=jnp.float32)
    # Row 1, second example (tokens 5..9) must not see the first: changing tokens 0..4 keeps it.
    k2 = k.at[1, :5].set(7.0)
    v2 = v.at[1, :5].set(-3.0)
    out2 = attention.self_attention(q, k2, v2, seg, impl="xla", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(out2[1, 5:10]), np.asarray(out[1, 5:10]), atol=1e-6)
    assert not np.allclose(np.asarray(out2[1, :5]), np.asarray(out[1, :5]))
    # Causality: a future key does not change an earlier query (row 2, query 3 vs key 8).
    k3 = k.at[2, 8].set(9.0)
    out3 = attention.self_attention(q, k3, v, seg, impl="xla", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(out3[2, :8]), np.asarray(out[2, :8]), atol=1e-6)
    # Left padding: the real tokens of row 0 never attend to the pads.
    v4 = v.at[0, :3].set(100.0)
    out4 = attention.self_attention(q, k, v4, seg, impl="xla", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(out4[0, 3:]), np.asarray(out[0, 3:]), atol=1e-6)


@pytest.mark.parametrize(("dtype", "atol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_decode_attends_over_the_filled_slots_only(dtype, atol):
    s = 20
    q, k, v = _qkv(dtype, s=s)
    q1 = q[:, :1]
    # the cache layout: k [B, K, H, S], v [B, K, S, H]
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    slot_mask = jnp.asarray(np.arange(s)[None, :] >= np.array([[3], [0], [5]]))  # left pads per row
    index = jnp.int32(10)  # slots 0..10 filled; 11.. hold garbage
    want = attention.cached_attention(q1, k, v, slot_mask, index, impl="dense", dtype=dtype)
    got = attention.cached_attention(q1, k, v, slot_mask, index, impl="xla", dtype=dtype)
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))) <= atol
    garbage = k.at[:, :, :, 11:].set(50.0), v.at[:, :, 11:].set(50.0)
    again = attention.cached_attention(q1, *garbage, slot_mask, index, impl="xla", dtype=dtype)
    np.testing.assert_allclose(np.asarray(again, np.float32), np.asarray(got, np.float32), atol=1e-6)


def test_auto_resolves_per_platform():
    assert attention.resolve("auto", jnp.float32, "cpu") == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "tpu") == "splash"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN flash attention is 16-bit only
    assert attention.resolve("dense", jnp.float32, "tpu") == "dense"


def test_model_logits_xla_equal_dense_with_padding_packing_and_cache():
    cfg = get_preset("tiny_qwen3_untied").replace(dtype="float32")
    dense = build_model(cfg.replace(attention="dense"), seed=2)
    xla = build_model(cfg.replace(attention="xla"), seed=2)
    r = np.random.default_rng(1)
    ids = jnp.asarray(r.integers(0, cfg.vocab_size, (2, 10)), jnp.int32)
    mask = jnp.asarray([[0, 0, 0] + [1] * 7, [1] * 10], jnp.int32)
    seg = jnp.asarray([[0, 0, 0] + [1] * 7, [1] * 4 + [2] * 6], jnp.int32)
    pos = jnp.asarray([[0, 0, 0, *range(7)], [*range(4), *range(6)]], jnp.int32)
    real = np.asarray(mask, bool)
    a, _ = dense(ids, pos, mask, segment_ids=seg)
    b, _ = xla(ids, pos, mask, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-4)
    # Prefill + decode through the cache: xla == dense.
    outs = []
    for model in (dense, xla):
        cache = KVCache.init(cfg, 2, 14)
        pos1 = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0).astype(jnp.int32)
        h, cache = model.hidden_states(ids, pos1, mask, cache, prefill=True)
        h2, cache = model.hidden_states(ids[:, :1], pos1[:, -1:] + 1, jnp.ones((2, 1), jnp.int32), cache)
        outs.append((model.unembed(h)[real], model.unembed(h2)))
    np.testing.assert_allclose(np.asarray(outs[1][0]), np.asarray(outs[0][0]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(outs[1][1]), np.asarray(outs[0][1]), atol=1e-4)


def test_unknown_attention_impl_names_the_flag():
    cfg = get_preset("tiny_qwen3_untied")
    with pytest.raises(ValueError, match=r"attention='flash'.*--config.model.attention"):
        cfg.replace(attention="flash")
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match="attention impl"):
        attention.self_attention(q, k, v, _segments(), impl="flash", dtype=jnp.float32)
