"""The JAX sampler's rollout layout on the 8-device fake CPU mesh (conftest): the compute-dtype, per-layer copy it
decodes from, its shardings, its refresh, rows padded to the mesh, and the prompt bucket.

Model: a tiny random Qwen3 (hidden 64, 2 heads of 32, 1 kv head, MLP 160, vocab 320) with weights of scale
0.15, so greedy decoding has no near-ties. References: the same weights decoded without a mesh and without
a copy (the einsums then cast the fp32 masters to the compute dtype at every step, which must give the same
numbers). Tolerances: fp32 compute tokens exact, log-probs 1e-4; bf16 compute tokens exact, log-probs 1e-1
(tensor-parallel partial sums are added in another order before each bf16 rounding, ~0.4% of a value,
and the differences compound over the decode steps through the bf16 KV cache; measured up to 0.066).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.jax_sampler import JaxSampler
from atlas_jax.models.config import ModelConfig
from atlas_jax.models.decoder import TransposedTable
from atlas_jax.models.params import build_model, flatten
from atlas_jax.models.sharding import make_mesh
from converters import mapping

PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13]]


def _cfg(dtype: str) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True, dtype=dtype,
        param_dtype="float32",
    )  # fmt: skip


def _flat(cfg: ModelConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for ours, shape in mapping.flat_shapes(cfg).items():
        if ours.endswith("scale"):
            out[ours] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[ours] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 2, 2))  # data, fsdp, tensor


def _spec(x: jax.Array) -> PartitionSpec:
    return x.sharding.spec


def _arrays(value) -> tuple[jax.Array, ...]:
    """A copy leaf's arrays: the ``L`` per-layer arrays of a decoder-layer Variable, the ``[D, V]`` array of a
    transposed table, or the one array."""
    if isinstance(value, TransposedTable):
        return (value.dv,)
    return value if isinstance(value, tuple) else (value,)


def _refs(master: dict, k: str, value, layers: int) -> list[jax.Array]:
    """What the copy's arrays at ``k`` hold, from the source parameters."""
    if isinstance(value, TransposedTable):
        return [master[k].T]
    return [master[k][i] for i in range(layers)] if isinstance(value, tuple) else [master[k]]


def test_rollout_copy_is_compute_dtype_tensor_parallel_per_layer_and_refreshed(mesh):
    cfg = _cfg("bfloat16")
    model = build_model(cfg, _flat(cfg), mesh=mesh)
    master = flatten(model)
    # The training layout FSDP-shards the model dimension (so decoding from it would all-gather weights).
    assert "fsdp" in tuple(_spec(master["embed/embedding"]))
    eng = JaxSampler(model, None, mesh=mesh)
    copy = flatten(eng.rollout_params())
    assert eng.reshard_seconds > 0.0
    assert set(copy) == set(master)
    for k, value in copy.items():
        # Decoder-layer parameters: one array per layer (no stacked [L, ...] array left to slice per step).
        stacked = k.startswith("layers/")
        assert isinstance(value, tuple) == stacked, k
        refs = _refs(master, k, value, cfg.num_layers)
        assert len(_arrays(value)) == len(refs), k
        for x, ref in zip(_arrays(value), refs, strict=True):
            # Matrices in the compute dtype; norm scales (1-D) stay fp32 (the model applies them in fp32).
            want = jnp.bfloat16 if x.ndim >= 2 else jnp.float32
            assert x.dtype == want and x.shape == ref.shape, (k, x.dtype, x.shape)
            assert "fsdp" not in jax.tree.leaves(tuple(_spec(x))), (k, _spec(x))
            assert x.sharding.mesh.shape == mesh.shape
            np.testing.assert_array_equal(
                np.asarray(x.astype(jnp.float32)), np.asarray(ref.astype(want).astype(jnp.float32))
            )
    # The tied table is stored transposed on the CPU (TransposedTable [D, V]).
    assert isinstance(copy["embed/embedding"], TransposedTable)
    # Hand-derived layouts: heads / MLP / vocab over "tensor" (size 2 divides them), the rest replicated
    # (1 kv head does not divide). Per-layer tensors are found by suffix; every layer has the same layout.
    expected = {
        "embed/embedding": (None, "tensor"),
        "mlp/gate_proj/kernel": (None, "tensor"),
        "mlp/down_proj/kernel": ("tensor", None),
        "attn/q_proj/kernel": (None, "tensor", None),
        "attn/k_proj/kernel": (None, None, None),
        "final_norm/scale": (None,),
    }
    for suffix, want in expected.items():
        key = min(k for k in copy if k.endswith(suffix))
        for x in _arrays(copy[key]):
            assert x.ndim == len(want), (key, x.shape)
            spec = tuple(_spec(x)) + (None,) * (x.ndim - len(_spec(x)))
            assert spec == want, (key, spec)
    # Reused while the source arrays are the same; rebuilt when they change.
    again = eng.rollout_params()
    assert eng.reshard_seconds == 0.0
    assert _arrays(flatten(again)["embed/embedding"])[0] is _arrays(copy["embed/embedding"])[0]
    eng.update_weights({k: v * 2 for k, v in master.items()})
    assert eng.reshard_seconds > 0.0
    doubled = flatten(eng.rollout_params())["final_norm/scale"]
    np.testing.assert_allclose(
        np.asarray(doubled, np.float32), 2 * np.asarray(master["final_norm/scale"]), rtol=1e-2
    )


def test_copy_without_a_mesh_is_per_layer_and_exact_and_can_be_turned_off(monkeypatch):
    # The unpacked layout (the packed one, on AVX-512 CPUs: tests/test_cpu_kernel.py).
    monkeypatch.setattr("atlas_jax.engines.jax_sampler.packs_weights", lambda cfg, mesh: False)
    cfg = _cfg("float32")
    model = build_model(cfg, _flat(cfg))
    source = flatten(model)
    copy = flatten(JaxSampler(model, None).rollout_params())  # fp32 in, fp32 compute: only unstacked
    q = copy["layers/attn/q_proj/kernel"]
    assert isinstance(q, tuple) and len(q) == cfg.num_layers
    assert isinstance(copy["embed/embedding"], TransposedTable)  # tied, on the CPU
    for k, value in copy.items():
        refs = _refs(source, k, value, cfg.num_layers)
        for x, ref in zip(_arrays(value), refs, strict=True):
            assert x.dtype == ref.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    plain = JaxSampler(model, None, rollout_copy=False)
    used, leaves = jax.tree.leaves(plain.rollout_params()), jax.tree.leaves(nnx.state(model))
    assert all(a is b for a, b in zip(used, leaves, strict=True))  # rollout_copy=False: as is, no memory
    assert plain.reshard_seconds == 0.0


def test_decoder_runs_an_unstacked_state_like_the_stacked_one():
    """`Decoder` given per-layer tuples and a transposed table (the rollout copy) computes what the model's own
    parameters compute, on the training path (tuples stacked for the scan) and on the per-layer-cache path
    (each layer's array used directly). fp32; 1e-5 on values up to ~3 (unrolled and scanned layers fuse their
    float32 ops differently)."""
    from atlas_jax.engines.jax_sampler import rollout_copy
    from atlas_jax.models.kv_cache import KVCache

    cfg = _cfg("float32")
    model = build_model(cfg, _flat(cfg))
    graphdef, state = nnx.split(model)
    unstacked = nnx.merge(graphdef, rollout_copy(state, cfg.dtype, None, transpose_table=True))
    assert isinstance(nnx.state(unstacked)["embed"]["embedding"].get_value(), TransposedTable)
    ids = jnp.asarray([[0, 0, 5, 17, 42], [7, 8, 9, 10, 11]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    want, _ = model(ids, positions, mask)
    got, _ = unstacked(ids, positions, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    per_layer = KVCache.init(cfg, 2, 8).split_layers()
    want_h, _ = model.hidden_states(ids, positions, mask, per_layer)
    got_h, _ = unstacked.hidden_states(ids, positions, mask, per_layer)
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), atol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-4), ("bfloat16", 1e-1)])
def test_sampling_from_the_sharded_copy_equals_unsharded(mesh, dtype, atol):
    cfg = _cfg(dtype)
    flat = _flat(cfg)
    sharded = JaxSampler(build_model(cfg, flat, mesh=mesh), None, mesh=mesh)
    plain = JaxSampler(build_model(cfg, flat), None, rollout_copy=False)
    runs = [SamplingParams(temperature=0.0, max_tokens=10)]
    if dtype == "float32":  # a bf16 rounding difference may move a sampled token across a CDF boundary
        runs.append(SamplingParams(temperature=1.0, max_tokens=10, seed=3))
    for params in runs:
        got, ref = sharded.generate(PROMPTS, params, n=2), plain.generate(PROMPTS, params, n=2)
        for g, r in zip(got, ref, strict=True):
            for a, b in zip(g, r, strict=True):
                assert a.token_ids == b.token_ids
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol)


def test_rows_not_prompts_are_padded_to_the_mesh_and_prompt_bucket(mesh):
    cfg = _cfg("float32")
    eng = JaxSampler(build_model(cfg, _flat(cfg), mesh=mesh), None, mesh=mesh, prompt_bucket=32)
    shapes = []
    prefill = eng._prefill

    def spy(weights, ids, *args, **kwargs):
        st = prefill(weights, ids, *args, **kwargs)
        shapes.append((ids.shape, st.tokens.shape[0]))
        return st

    eng._prefill = spy
    out = eng.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=4, seed=0), n=2)
    # 1 prompt x 2 samples = 2 rows, padded to the 4 batch shards (data x fsdp); the prompt is not padded
    # to 4 prompts (8 rows). Prompt length 4 rounds up to the 32 bucket.
    assert shapes == [((1, 32), 4)]
    assert [len(c.token_ids) for c in out[0]] == [4, 4]
    with pytest.raises(ValueError, match="prompt_bucket"):
        JaxSampler(nnx.Module.__new__(nnx.Module), None, prompt_bucket=0)


def test_per_layer_cache_decodes_like_the_stacked_cache():
    """The per-layer KV-cache layout gives the stacked layout's hidden states (fp32; 1e-5 on values up to ~3:
    the unrolled layers and the scanned ones fuse their float32 ops differently, measured 2.4e-6)."""
    from atlas_jax.models.kv_cache import KVCache

    cfg = _cfg("float32")
    model = build_model(cfg, _flat(cfg))
    ids = jnp.asarray([[0, 0, 5, 17, 42], [7, 8, 9, 10, 11]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    outs = []
    for split in (False, True):
        cache = KVCache.init(cfg, 2, 12)
        cache = cache.split_layers() if split else cache
        assert cache.per_layer == split and cache.max_len == 12
        hidden, cache = model.hidden_states(ids, positions, mask, cache)
        steps = [hidden[:, -1]]
        pos = positions[:, -1:]
        for tok in (3, 99, 250):
            pos = pos + 1
            hidden, cache = model.hidden_states(
                jnp.full((2, 1), tok, jnp.int32), pos, jnp.ones((2, 1)), cache
            )
            steps.append(hidden[:, -1])
        assert isinstance(cache.k, tuple) == split
        outs.append(np.stack([np.asarray(s) for s in steps]))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_a_frozen_sampler_keeps_only_the_decode_layout_and_samples_the_same(mesh):
    """`JaxSampler.frozen` (the student): its parameters are the decode layout (per-layer tuples, no stacked
    source kept), no further copy is made, and it samples what an ordinary sampler of the same weights does
    (fp32: tokens exact, log-probs 1e-4)."""
    cfg = _cfg("float32")
    flat = _flat(cfg)
    frozen = JaxSampler.frozen(build_model(cfg, flat, mesh=mesh), None, mesh=mesh)
    held = flatten(frozen.params)
    assert isinstance(held["layers/mlp/up_proj/kernel"], tuple)
    assert isinstance(held["embed/embedding"], TransposedTable)
    used = jax.tree.leaves(frozen.rollout_params())
    assert all(a is b for a, b in zip(used, jax.tree.leaves(frozen.params), strict=True))
    assert frozen.reshard_seconds == 0.0
    ref = JaxSampler(build_model(cfg, flat, mesh=mesh), None, mesh=mesh)
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=5)
    for g, r in zip(frozen.generate(PROMPTS, params, n=2), ref.generate(PROMPTS, params, n=2), strict=True):
        for a, b in zip(g, r, strict=True):
            assert a.token_ids == b.token_ids
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
