"""The CPU matmul kernels (`atlas_jax.kernels.cpu_matmul`, bf16 and float32) and the sampler's packed rollout copy.

The kernels are compiled from their C++ source with the machine's g++ and run as real XLA custom calls; their
products are compared with a float64 numpy product of the same bf16 / float32 operands. Tolerance: 1e-5 of the
largest |reference| value (the kernels' f32 accumulation order differs from numpy's; measured <= 3e-6, like XLA's
own dot). These tests need a CPU listing avx512_bf16; on one without, the flag tests still run and the kernel
tests fail with the reason (`available` raises under ATLAS_JAX_CPU_KERNEL=1) rather than skip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax.engines import jax_sampler
from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.jax_sampler import JaxSampler
from atlas_jax.kernels import cpu_matmul
from atlas_jax.kernels.cpu_matmul import PackedWeight
from atlas_jax.models import layers
from atlas_jax.models.config import ModelConfig
from atlas_jax.models.params import build_model, flatten
from converters import mapping

TOL = 1e-5


@pytest.fixture(scope="module")
def kernel(request):
    mp = pytest.MonkeyPatch()
    mp.setenv(cpu_matmul.ENV, "1")  # must build and register here (an error says why not)
    cpu_matmul.available.cache_clear()
    assert cpu_matmul.available()
    yield
    mp.undo()
    cpu_matmul.available.cache_clear()


def _arr(rng, shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _check(y, ref):
    ref = np.asarray(ref, np.float64)
    err = np.abs(np.asarray(y, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= TOL, err


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 16, 17, 64, 70])
@pytest.mark.parametrize(("k", "n"), [(7, 5), (33, 70), (64, 64), (96, 130), (255, 1000)])
def test_kernel_matches_a_float64_product(kernel, dtype, m, k, n):
    """Odd K (in bf16 the last k-pair is half padding), N not a multiple of the 16-lane tile or the 64-column
    panel, row counts around the 6-row register block."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = _arr(rng, (m, k), dtype), _arr(rng, (k, n), dtype)
    p = cpu_matmul.pack(w, dtype=dtype)
    assert p.wp.shape == cpu_matmul.packed_shape(k, n, dtype) and p.wp.dtype == jnp.dtype(dtype)
    y = jax.jit(cpu_matmul.matmul)(x, p)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    _check(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pack_round_trips_and_columns_are_the_lookup(dtype):
    rng = np.random.default_rng(0)
    w = _arr(rng, (9, 130), dtype)
    p = cpu_matmul.pack(w, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack(p), np.float32), np.asarray(w, np.float32))
    # Padding is zero: the product never reads anything but w.
    assert float(jnp.abs(p.wp.astype(jnp.float32)).sum()) == pytest.approx(
        float(jnp.abs(w.astype(jnp.float32)).sum())
    )
    ids = jnp.asarray([[0, 63, 64], [129, 1, 65]])
    np.testing.assert_array_equal(np.asarray(cpu_matmul.columns(p, ids)), np.asarray(w.T[ids]))
    w3 = _arr(rng, (4, 6, 10), dtype)
    p3 = cpu_matmul.pack(w3, contract=2, dtype=dtype)
    assert (p3.k, p3.n) == (24, 10)
    np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack(p3)), np.asarray(w3))
    with pytest.raises(ValueError, match="contract"):
        cpu_matmul.pack(w3, contract=3)
    with pytest.raises(ValueError, match="float16"):
        cpu_matmul.pack(w3, dtype="float16")
    with pytest.raises(ValueError, match="2-D"):
        cpu_matmul.columns(p3, ids)


@pytest.mark.parametrize(
    ("spec", "a_shape", "b_shape", "contract"),
    [
        ("btd,df->btf", (2, 3, 40), (40, 90), 1),
        ("btf,fd->btd", (2, 3, 90), (90, 40), 1),
        ("btd,dkh->btkh", (2, 1, 40), (40, 3, 16), 1),
        ("btnh,nhd->btd", (2, 3, 4, 16), (4, 16, 40), 2),
    ],
)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_layers_einsum_dispatches_every_model_spec_to_the_kernel(
    kernel, spec, a_shape, b_shape, contract, dtype
):
    rng = np.random.default_rng(1)
    a, b = _arr(rng, a_shape, dtype), _arr(rng, b_shape, dtype)
    packed = cpu_matmul.pack(b, contract, dtype)
    got = jax.jit(lambda a, p: layers.einsum(spec, a, p, jnp.float32))(a, packed)
    want = np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert got.shape == want.shape
    _check(got, want)
    with pytest.raises(ValueError, match="packed weight"):
        layers.einsum("btd,fd->btf", a if contract == 1 else a[..., 0, :], packed, jnp.float32)


def test_flag_parsing_and_cpu_detection():
    assert cpu_matmul.choice({}) == "auto"
    assert cpu_matmul.choice({cpu_matmul.ENV: " 0 "}) == "0"
    assert cpu_matmul.choice({cpu_matmul.ENV: "AUTO"}) == "auto"
    with pytest.raises(ValueError, match=cpu_matmul.ENV):
        cpu_matmul.choice({cpu_matmul.ENV: "yes"})
    full = "processor: 0\nflags\t: fpu avx2 avx512f avx512bw avx512vl avx512_bf16\n"
    assert cpu_matmul.cpu_supports(full)
    assert not cpu_matmul.cpu_supports(full.replace(" avx512_bf16", ""))
    assert not cpu_matmul.cpu_supports(None)
    # auto: only where they won (no AMX); on an AMX Xeon XLA's dot (or amx_matmul) is faster
    amx = full.replace("avx512_bf16", "avx512_bf16 amx_bf16")
    assert cpu_matmul.pays(full, "bfloat16") and not cpu_matmul.pays(amx, "bfloat16")
    assert cpu_matmul.pays(full, "float32") and cpu_matmul.pays(amx, "float32")
    assert not cpu_matmul.pays(full.replace(" avx512_bf16", ""), "float32")
    # Packing is for one CPU device in bf16 or float32 only.
    assert not cpu_matmul.enabled("cpu", "float16", 1)
    assert not cpu_matmul.enabled("gpu", "bfloat16", 1)
    assert not cpu_matmul.enabled("cpu", "bfloat16", 8)


def test_forced_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-atlas")
    with pytest.raises(RuntimeError, match="no-such-compiler-atlas"):
        cpu_matmul.build(tmp_path / "k.so")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def _cfg(tied: bool, dtype: str = "bfloat16", model_type: str = "qwen2") -> ModelConfig:
    """Qwen2 (q/k/v bias) or Qwen3 (q/k RMSNorm, no bias: what the real configs train), tiny."""
    qwen3 = model_type == "qwen3"
    return ModelConfig(
        model_type=model_type, vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tied, qkv_bias=not qwen3,
        qk_norm=qwen3, dtype=dtype, param_dtype="float32",
    )  # fmt: skip


def _flat(cfg: ModelConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        k: (
            (1.0 + 0.2 * rng.standard_normal(s)) if k.endswith("scale") else 0.15 * rng.standard_normal(s)
        ).astype(np.float32)
        for k, s in mapping.flat_shapes(cfg).items()
    }


@pytest.mark.parametrize(("dtype", "atol"), [("bfloat16", 5e-2), ("float32", 1e-4)])
@pytest.mark.parametrize(("tied", "model_type"), [(True, "qwen2"), (False, "qwen2"), (True, "qwen3")])
def test_packed_rollout_copy_samples_what_xla_dots_sample(kernel, monkeypatch, tied, model_type, dtype, atol):
    """A sampler whose copy is packed (every projection kernel, the tied table or the untied head) gives the
    same greedy tokens as one on XLA's dots; log-probs within 5e-2 in bf16 (same products, another f32
    summation order before each bf16 rounding), 1e-4 in float32."""
    cfg = _cfg(tied, dtype, model_type)
    flat = _flat(cfg)
    prompts = [[5, 17, 42, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    packed = JaxSampler(build_model(cfg, flat), None)
    copy = flatten(packed.rollout_params())
    assert isinstance(copy["layers/attn/o_proj/kernel"][0], PackedWeight)
    assert copy["layers/attn/o_proj/kernel"][0].wp.dtype == jnp.dtype(dtype)
    assert copy["layers/attn/o_proj/kernel"][0].contract == 2
    assert isinstance(copy["layers/mlp/down_proj/kernel"][1], PackedWeight)
    if cfg.qkv_bias:
        assert not isinstance(copy["layers/attn/q_proj/bias"][0], PackedWeight)  # biases stay arrays
    if cfg.qk_norm:
        assert not isinstance(copy["layers/attn/q_norm/scale"][0], PackedWeight)
    head = "embed/embedding" if tied else "lm_head/kernel"
    assert isinstance(copy[head], PackedWeight) and copy[head].shape == (cfg.hidden_size, cfg.vocab_size)
    if not tied:
        assert not isinstance(copy["embed/embedding"], PackedWeight)  # an untied table is only looked up
    got = packed.generate(prompts, params, n=2)
    frozen = JaxSampler.frozen(build_model(cfg, flat), None)  # the student: only the packed layout is kept
    assert isinstance(flatten(frozen.params)["layers/mlp/up_proj/kernel"][0], PackedWeight)
    got_frozen = frozen.generate(prompts, params, n=2)
    # A weight update (the teacher's push) re-packs: the new copy decodes the new weights.
    doubled = {
        k: v * (1.0 if k.endswith("scale") or "bias" in k else 1.5)
        for k, v in flatten(nnx.state(build_model(cfg, flat))).items()
    }
    packed.update_weights(doubled)
    assert isinstance(flatten(packed.rollout_params())["layers/mlp/up_proj/kernel"][0], PackedWeight)
    got_updated = packed.generate(prompts, params, n=2)
    monkeypatch.setattr(jax_sampler, "packs_weights", lambda cfg, mesh: False)
    plain = JaxSampler(build_model(cfg, flat), None)
    assert not any(
        isinstance(v, PackedWeight)
        for v in jax.tree.leaves(plain.rollout_params(), is_leaf=lambda x: isinstance(x, PackedWeight))
    )
    want = plain.generate(prompts, params, n=2)
    plain.update_weights(doubled)
    want_updated = plain.generate(prompts, params, n=2)
    assert [c.token_ids for g in want_updated for c in g] != [c.token_ids for g in want for c in g]
    for ours, theirs in ((got, want), (got_frozen, want), (got_updated, want_updated)):
        for g, r in zip(ours, theirs, strict=True):
            for a, b in zip(g, r, strict=True):
                assert a.token_ids == b.token_ids
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol)


def test_packed_float32_copy_holds_the_source_weights_exactly(kernel):
    """fp32 master, fp32 compute: every packed weight unpacks to its source array bit for bit (the tied table
    to ``Eᵀ``), other leaves are the source's values, per layer."""
    cfg = _cfg(True, "float32")
    model = build_model(cfg, _flat(cfg))
    source = flatten(model)
    copy = flatten(JaxSampler(model, None).rollout_params())
    assert set(copy) == set(source)
    for k, value in copy.items():
        layers_ = value if isinstance(value, tuple) else (value,)
        refs = [source[k][i] for i in range(cfg.num_layers)] if isinstance(value, tuple) else [source[k]]
        for v, ref in zip(layers_, refs, strict=True):
            if isinstance(v, PackedWeight):
                v, ref = cpu_matmul.unpack(v), (ref.T if k == "embed/embedding" else ref)
            assert v.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(v), np.asarray(ref), err_msg=k)
    assert isinstance(copy["embed/embedding"], PackedWeight)


def test_decoder_scan_path_stacks_packed_layers(kernel):
    """Without a per-layer cache `Decoder` stacks the per-layer tuples for the scan; packed weights stack too.
    Logits within 5e-2 of the model's own (bf16 roundings in another order; values up to ~3)."""
    cfg = _cfg(True)
    model = build_model(cfg, _flat(cfg))
    graphdef, state = nnx.split(model)
    copy = jax_sampler.rollout_copy(state, cfg.dtype, None, transpose_table=True, pack=True)
    ids = jnp.asarray([[0, 0, 5, 17, 42], [7, 8, 9, 10, 11]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    want, _ = model(ids, positions, mask)
    got, _ = nnx.merge(graphdef, copy)(ids, positions, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-2)
