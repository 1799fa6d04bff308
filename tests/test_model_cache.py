"""KV cache: prefill + token-by-token decode (one jitted call shape each) reproduces full-forward logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_hf import hf_logits, hf_model, left_padded_batch, ours_from_hf
from flax import nnx

from atlas_jax.models.kv_cache import KVCache
from atlas_jax.models.params import build_model
from atlas_jax.models.presets import TINY_QWEN3

TOL = 1e-4  # fp32 max |Δlogit| on real tokens


@nnx.jit
def _step(model, ids, positions, mask, cache):
    return model(ids, positions, mask, cache)


@pytest.mark.parametrize("family", ["qwen3_tied", "llama3"])
def test_prefill_then_decode_matches_full_forward(family, tmp_path):
    hf = hf_model(family)
    cfg, flat = ours_from_hf(hf, tmp_path)
    model = build_model(cfg, flat)
    ids, positions, mask = left_padded_batch(lengths=(11, 7, 3, 9))
    ref_hf = hf_logits(hf, ids, positions, mask)
    full, _ = model(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    full = np.asarray(full)

    prefill = 5  # rows 2 (3 tokens) and 1 (7 tokens) are still all padding / partly padding here
    cache = KVCache.init(cfg, batch=ids.shape[0], max_len=ids.shape[1] + 3)
    layers, kv, h = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    assert cache.k.shape == (layers, 4, kv, h, 14)  # kv-head major, slots last
    assert cache.v.shape == (layers, 4, kv, 14, h)  # values: slots, then head dim
    assert cache.max_len == 14
    chunks = []
    logits, cache = _step(model, *(jnp.asarray(x[:, :prefill]) for x in (ids, positions, mask)), cache)
    chunks.append(np.asarray(logits))
    assert int(cache.index) == prefill
    for t in range(prefill, ids.shape[1]):
        logits, cache = _step(model, *(jnp.asarray(x[:, t : t + 1]) for x in (ids, positions, mask)), cache)
        chunks.append(np.asarray(logits))
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, : ids.shape[1]], mask.astype(bool))
    assert not np.asarray(cache.mask)[:, ids.shape[1] :].any()

    decoded = np.concatenate(chunks, axis=1)
    real = mask == 1
    err_self = np.abs(decoded - full)[real].max()
    err_hf = np.abs(decoded - ref_hf)[real].max()
    assert err_self <= TOL, f"cached vs full forward: {err_self:.3g}"
    assert err_hf <= TOL, f"cached vs transformers: {err_hf:.3g}"


def test_chunked_prefill_and_stale_slots(tmp_path):
    """Prefill in two chunks into a cache that holds junk in unused slots: junk must never be attended."""
    hf = hf_model("qwen2")
    cfg, flat = ours_from_hf(hf, tmp_path)
    model = build_model(cfg, flat)
    ids, positions, mask = left_padded_batch(lengths=(8, 5), width=8)
    ref = hf_logits(hf, ids, positions, mask)
    cache = KVCache.init(cfg, batch=2, max_len=12)
    cache = cache.replace(k=cache.k + 7.0, v=cache.v - 3.0)  # junk everywhere; only masked slots keep it
    a, cache = model(*(jnp.asarray(x[:, :4]) for x in (ids, positions, mask)), cache)
    b, cache = model(*(jnp.asarray(x[:, 4:]) for x in (ids, positions, mask)), cache)
    out = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    err = np.abs(out - ref)[mask == 1].max()
    assert err <= TOL, f"chunked prefill vs transformers: {err:.3g}"


def test_cache_init_dtype_and_pytree():
    cache = KVCache.init(TINY_QWEN3.replace(dtype="bfloat16"), batch=3, max_len=16)
    assert cache.k.dtype == jnp.bfloat16 and cache.mask.dtype == jnp.bool_
    assert cache.index.dtype == jnp.int32 and int(cache.index) == 0
    assert cache.max_len == 16
    cache32 = KVCache.init(TINY_QWEN3, batch=3, max_len=16, dtype="float32")
    assert cache32.v.dtype == jnp.float32
    assert len(jax.tree.leaves(cache)) == 4


def test_cache_storage_dtype_is_f32_only_for_16_bit_compute_on_the_cpu():
    assert KVCache.storage_dtype("bfloat16", "cpu") == jnp.float32
    assert KVCache.storage_dtype("float16", "cpu") == jnp.float32
    assert KVCache.storage_dtype("float32", "cpu") == jnp.float32
    assert KVCache.storage_dtype("bfloat16", "tpu") == jnp.bfloat16
    assert KVCache.storage_dtype("bfloat16", "gpu") == jnp.bfloat16


def test_bf16_model_decodes_the_same_from_an_f32_and_a_bf16_cache():
    """The sampler's CPU storage (f32 cache, bf16 compute) vs the compute-dtype cache: same greedy logits."""
    cfg = TINY_QWEN3.replace(dtype="bfloat16")
    model = build_model(cfg, seed=3)
    ids, positions, mask = (jnp.asarray(x) for x in left_padded_batch(lengths=(6, 4), width=6))
    outs = []
    for dtype in ("bfloat16", "float32"):
        cache = KVCache.init(cfg, batch=2, max_len=9, dtype=dtype)
        _, cache = model(ids, positions, mask, cache)
        nxt = positions[:, -1:] + 1
        logits, cache = model(ids[:, -1:], nxt, jnp.ones((2, 1), jnp.int32), cache)
        assert cache.k.dtype == jnp.dtype(dtype)
        outs.append(np.asarray(logits, np.float32))
    scale = np.abs(outs[1]).max()
    assert np.abs(outs[0] - outs[1]).max() <= 0.05 * scale  # bf16 rounding of k/v and probabilities only


def test_cache_overflow_is_an_error_outside_jit():
    model = build_model(TINY_QWEN3)
    cache = KVCache.init(TINY_QWEN3, batch=1, max_len=4)
    ids = jnp.ones((1, 3), jnp.int32)
    _, cache = model(ids, jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32), cache)
    with pytest.raises(ValueError, match=r"overflow: index 3 \+ 2 tokens > max_len 4"):
        model(ids[:, :2], jnp.arange(3, 5)[None], jnp.ones((1, 2), jnp.int32), cache)
