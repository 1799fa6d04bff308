"""Sharding: rules -> PartitionSpecs, sharded == unsharded forward on a 2x2x2 mesh, zero-memory 8B shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_hf import hf_model, left_padded_batch, ours_from_hf
from flax import nnx
from jax.sharding import PartitionSpec as P

from atlas_jax.models import sharding
from atlas_jax.models.params import abstract_model, build_model, flatten, param_count, unflatten
from atlas_jax.models.presets import QWEN3_0_6B, QWEN3_8B, TINY_QWEN3

SHARDED_TOL = 1e-5  # fp32 max |Δlogit| sharded vs unsharded


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_model("qwen3_untied")
    return ours_from_hf(hf, tmp_path_factory.mktemp("hf"))


def test_make_mesh_validates_shape():
    with pytest.raises(ValueError, match="8 devices"):
        sharding.make_mesh((2, 2, 1))
    with pytest.raises(ValueError, match="3 positive ints"):
        sharding.make_mesh((2, 4))
    m = sharding.make_mesh((1, 8, 1))
    assert m.axis_names == ("data", "fsdp", "tensor") and m.devices.shape == (1, 8, 1)


def test_spec_for_rules_and_divisibility():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.spec_for(("embed", "heads", "head_dim"), (64, 4, 32), sizes) == P("fsdp", "tensor", None)
    # 1 kv head cannot be split over tensor=2: replicated instead of failing.
    assert sharding.spec_for(("embed", "kv_heads", "head_dim"), (64, 1, 32), sizes) == P("fsdp", None, None)
    assert sharding.spec_for(("batch", "length", "act_embed"), (8, 5, 64), sizes) == P(
        ("data", "fsdp"), None, None
    )
    assert sharding.spec_for(("batch", "length"), (2, 5), sizes) == P(None, None)
    # A mesh axis of size 1 is never named.
    assert sharding.spec_for(("mlp", "embed"), (96, 64), {"data": 8, "fsdp": 1, "tensor": 1}) == P(None, None)


def test_sharded_forward_equals_unsharded(tiny, mesh):
    cfg, flat = tiny
    ids, positions, mask = (jnp.asarray(x) for x in left_padded_batch())
    ref, _ = build_model(cfg, flat)(ids, positions, mask)

    model = build_model(cfg, flat, mesh=mesh)
    gate = model.layers.mlp.gate_proj.kernel.get_value()  # stacked [L, D, F]; the layer axis is replicated
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {
        (cfg.num_layers, cfg.hidden_size // 2, cfg.intermediate_size // 2)
    }
    assert model.layers.attn.q_proj.kernel.get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.layers.attn.k_proj.kernel.get_value().sharding.spec == P(
        None, "fsdp", None, None
    )  # 1 kv head
    assert model.lm_head.kernel.get_value().sharding.spec == P("fsdp", None)  # vocab 257 is prime
    assert model.final_norm.scale.get_value().sharding.spec == P(None)

    @nnx.jit
    def forward(m, ids, positions, mask):
        hidden, _ = m.hidden_states(ids, positions, mask)
        return hidden, m.unembed(hidden)

    with jax.set_mesh(mesh):
        hidden, logits = forward(model, ids, positions, mask)
    assert hidden.sharding.spec[0] == ("data", "fsdp"), hidden.sharding
    err = float(jnp.abs(logits - ref).max())
    assert err <= SHARDED_TOL, f"sharded vs unsharded: {err:.3g}"


def test_sharded_random_init_matches_unsharded_init(mesh):
    cfg = TINY_QWEN3
    model = build_model(cfg, mesh=mesh, seed=3)
    plain = build_model(cfg, seed=3)
    emb = model.embed.embedding.get_value()
    assert emb.sharding.spec == P("tensor", "fsdp")  # vocab 512, hidden 64
    sharded = flatten(model)
    for key, value in flatten(plain).items():  # jit vs eager init: same draws up to float rounding
        np.testing.assert_allclose(
            np.asarray(sharded[key]), np.asarray(value), rtol=1e-6, atol=1e-8, err_msg=key
        )
    moved = sharding.shard_model(plain, mesh)
    assert moved.embed.embedding.get_value().sharding.spec == P("tensor", "fsdp")


def test_qwen3_8b_eval_shape_param_count_and_plan(mesh):
    # Hand count from the public Qwen3-8B config: V=151936 D=4096 N=32 K=8 H=128 F=12288 L=36, untied head.
    v, d, n, k, h, f, layers = 151936, 4096, 32, 8, 128, 12288, 36
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 2 * h + 3 * d * f + 2 * d
    expected = 2 * v * d + layers * per_layer + d
    assert expected == 8_190_735_360
    assert param_count(QWEN3_8B) == expected
    # 0.6B, tied: one V x D matrix.
    v, d, n, k, h, f, layers = 151936, 1024, 16, 8, 128, 3072, 28
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 2 * h + 3 * d * f + 2 * d
    assert param_count(QWEN3_0_6B) == v * d + layers * per_layer + d

    abstract = abstract_model(QWEN3_8B)
    state = nnx.state(abstract)
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    plan = flatten(sharding.state_shardings(state, mesh))
    assert plan["embed/embedding"].spec == P("tensor", "fsdp")
    assert plan["layers/attn/k_proj/kernel"].spec == P(None, "fsdp", "tensor", None)
    assert plan["lm_head/kernel"].spec == P("fsdp", "tensor")


def test_flatten_unflatten_roundtrip(tiny):
    cfg, flat = tiny
    model = build_model(cfg, flat)
    out = flatten(model)
    assert set(out) == set(flat)
    assert out["layers/attn/q_norm/scale"].shape == (cfg.num_layers, cfg.head_dim) and "lm_head/kernel" in out
    nested = unflatten(out)
    assert set(nested["layers"]) == {"attn", "mlp", "input_norm", "post_attn_norm"}
    other = build_model(cfg, seed=5)
    nnx.update(other, nnx.State(nested))
    for key, value in flatten(other).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[key]), err_msg=key)
    with pytest.raises(ValueError, match=r"duplicate|nests"):
        unflatten({"a/b": 1, "a/b/c": 2})


def test_build_model_rejects_mismatched_params(tiny):
    cfg, flat = tiny
    missing = {k: v for k, v in flat.items() if k != "layers/mlp/up_proj/kernel"}
    with pytest.raises(ValueError, match=r"missing.*layers/mlp/up_proj/kernel"):
        build_model(cfg, missing)
    with pytest.raises(ValueError, match=r"unexpected.*extra/kernel"):
        build_model(cfg, {**flat, "extra/kernel": np.zeros(3)})
    bad = dict(flat)
    bad["final_norm/scale"] = np.ones(cfg.hidden_size + 1, np.float32)
    with pytest.raises(ValueError, match=r"final_norm/scale.*shape \(65,\)"):
        build_model(cfg, bad)


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((4, 3, 2))
    assert sharding.constrain(x, ("batch", "length", "act_embed")) is x
