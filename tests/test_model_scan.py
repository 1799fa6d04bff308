"""Scanned (stacked) layers: same numbers as the unrolled loop, one layer traced once, remat policies, old layout.

Tolerances: scan vs unrolled over the same stacked parameters is the same arithmetic, compared at 1e-6; remat only
reorders the backward pass (gradients within 1e-5 relative to the largest gradient entry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atlas_jax.checkpoint import Checkpointer
from atlas_jax.models import KVCache, build_model, flatten
from atlas_jax.models.config import REMAT_POLICIES
from atlas_jax.models.decoder import remat_policy
from atlas_jax.models.params import stack_layers
from atlas_jax.models.presets import get_preset
from atlas_jax.training import train_step
from converters import mapping

CFG = get_preset("tiny_qwen3_untied").replace(num_layers=3, dtype="float32")


def _batch():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], jnp.int32)
    return ids, jnp.maximum(jnp.cumsum(mask, 1) - 1, 0).astype(jnp.int32), mask


def _loss_and_grads(cfg):
    ids, pos, mask = _batch()
    graphdef, params, rest = train_step.split_model(build_model(cfg, seed=3))

    def loss(p):
        logits, _ = train_step.merge_model(graphdef, p, rest)(ids, pos, mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * mask[:, 1:])

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(CFG)


def _assert_grads_close(got, want, rtol):
    scale = max(float(jnp.max(jnp.abs(g))) for g in want.values())
    for key in want:
        np.testing.assert_allclose(
            np.asarray(got[key]), np.asarray(want[key]), atol=rtol * scale, err_msg=key
        )


def test_params_are_stacked_with_a_replicated_layer_axis():
    model = build_model(CFG)
    flat = flatten(model)
    assert flat["layers/mlp/up_proj/kernel"].shape == (3, CFG.hidden_size, CFG.intermediate_size)
    assert not any(k.startswith("layers/0") for k in flat)
    assert model.layers.attn.q_proj.kernel.get_metadata()["logical_axes"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )
    assert set(flat) == set(mapping.flat_shapes(CFG))


def test_scan_equals_unrolled_loop(reference):
    loss, grads = _loss_and_grads(CFG.replace(scan_layers=False))
    np.testing.assert_allclose(float(loss), float(reference[0]), rtol=1e-6)
    _assert_grads_close(grads, reference[1], 1e-6)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_policies_keep_loss_and_grads(reference, policy):
    loss, grads = _loss_and_grads(CFG.replace(remat=True, remat_policy=policy))
    np.testing.assert_allclose(float(loss), float(reference[0]), rtol=1e-6)
    _assert_grads_close(grads, reference[1], 1e-5)


def test_unknown_remat_policy_names_the_flag():
    with pytest.raises(ValueError, match=r"remat_policy='everything'.*--config.model.remat_policy"):
        CFG.replace(remat_policy="everything")
    with pytest.raises(ValueError, match="remat_policy"):
        remat_policy("everything")


def _trace_len(num_layers: int, scan: bool) -> int:
    ids, pos, mask = _batch()
    graphdef, state = nnx.split(build_model(CFG.replace(num_layers=num_layers, scan_layers=scan)))
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, pos, mask)[0])(state)
    return len(str(jaxpr).splitlines())


def test_one_layer_is_traced_once_whatever_the_depth():
    # Scanned: the program does not grow with depth. Unrolled: it grows with every layer.
    assert _trace_len(2, True) == _trace_len(5, True)
    assert _trace_len(5, False) > _trace_len(2, False)


@pytest.mark.parametrize("scan", [False, True])
def test_rope_tables_are_computed_once_per_pass(scan):
    """The compiled forward+backward holds one cos and one sin op whatever the depth: without the barrier in
    `rope_cos_sin`, XLA:CPU fused a recomputation into every layer's q and k RoPE (2 x layers of each)."""
    ids, pos, mask = _batch()
    graphdef, params, rest = train_step.split_model(build_model(CFG.replace(num_layers=4, scan_layers=scan)))

    def loss(p):
        return jnp.sum(train_step.merge_model(graphdef, p, rest)(ids, pos, mask)[0])

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    counts = hlo.count(" cosine("), hlo.count(" sine(")
    assert counts == (1, 1), counts


def test_decode_with_cache_equals_full_forward_under_scan():
    model = build_model(CFG, seed=1)
    ids, pos, mask = _batch()
    full, _ = model(ids, pos, mask)
    cache = KVCache.init(CFG, 2, 12)
    hid, cache = model.hidden_states(ids[:, :6], pos[:, :6], mask[:, :6], cache, prefill=True)
    logits = [model.unembed(hid)]
    for t in range(6, 9):
        hid, cache = model.hidden_states(ids[:, t : t + 1], pos[:, t : t + 1], mask[:, t : t + 1], cache)
        logits.append(model.unembed(hid))
    got = jnp.concatenate(logits, axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=2e-5)
    assert int(cache.index) == 9


def _unstacked(flat):
    out = {}
    for key, value in flat.items():
        if key.startswith("layers/"):
            for i in range(value.shape[0]):
                out[key.replace("layers/", f"layers/{i}/", 1)] = np.asarray(value[i])
        else:
            out[key] = np.asarray(value)
    return out


def test_old_per_layer_checkpoints_still_load(tmp_path):
    from atlas_jax.training.runtime import load_flat_params

    flat = {k: np.asarray(v) for k, v in flatten(build_model(CFG, seed=4)).items()}
    old = _unstacked(flat)
    assert "layers/2/attn/k_norm/scale" in old
    with Checkpointer(tmp_path / "old") as ckpt:  # a params-only checkpoint in the pre-scan layout
        ckpt.save(0, old, force=True)
        ckpt.wait()
    loaded = load_flat_params(str(tmp_path / "old"), CFG)
    assert set(loaded) == set(flat)
    for key in flat:
        np.testing.assert_array_equal(np.asarray(loaded[key]), flat[key], err_msg=key)
    model = build_model(CFG, old)  # build_model restacks too
    np.testing.assert_array_equal(
        np.asarray(flatten(model)["layers/mlp/down_proj/kernel"]), flat["layers/mlp/down_proj/kernel"]
    )


def test_restacking_errors_are_clear():
    flat = _unstacked({k: np.asarray(v) for k, v in flatten(build_model(CFG)).items()})
    del flat["layers/1/mlp/up_proj/kernel"]
    with pytest.raises(ValueError, match=r"layers/\{i\}/mlp/up_proj/kernel is missing layer\(s\) \[1\]"):
        stack_layers(flat)
    old = _unstacked({k: np.asarray(v) for k, v in flatten(build_model(CFG)).items()})
    with pytest.raises(mapping.MappingError, match=r"per-layer layout.*stack_layers"):
        next(mapping.flat_to_hf(old, CFG))


def test_training_resumes_from_a_per_layer_checkpoint_with_its_optimizer_state(tmp_path):
    """A train checkpoint of the pre-scan layout (params *and* AdamW moments under ``layers/{i}/...``) resumes:
    every moment lands restacked in the stacked template's sharding, equal to the stacked run's moments."""
    import optax

    from atlas_jax.models.sharding import make_mesh
    from atlas_jax.training.checkpointing import TrainCheckpointer
    from atlas_jax.training.optimizer import OptimSpec, make_optimizer

    mesh = make_mesh((1, 2, 1), devices=jax.devices()[:2])
    tx, _ = make_optimizer(OptimSpec(learning_rate=1e-2, total_steps=10, weight_decay=0.1))
    stacked = {k: np.asarray(v) for k, v in flatten(build_model(CFG, seed=4)).items()}
    rng = np.random.default_rng(1)
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in stacked.items()}

    def moments(params, g):  # two AdamW updates: non-zero, per-layer-distinct first and second moments
        opt = tx.init(params)
        for _ in range(2):
            _, opt = tx.update(g, opt, params)
        return opt

    old_params = _unstacked(stacked)
    old = train_step.TrainState(
        step=jnp.asarray(7, jnp.int32),
        params={k: jnp.asarray(v) for k, v in old_params.items()},
        opt_state=moments(old_params, _unstacked(grads)),
    )
    directory = tmp_path / "checkpoints"
    ck = TrainCheckpointer(directory, every_steps=1, keep=2, async_save=False)
    ck.save(7, old, jax.random.key(3), data_position={"index": 7}, extra={"ref_params": old.params})
    ck.wait()
    ck.close()

    params = {k: jax.device_put(v, s) for k, v, s in _with_shardings(stacked, mesh)}
    template = train_step.init_state(tx, params, mesh)
    ck = TrainCheckpointer(directory, every_steps=1, keep=2, async_save=False)
    state, _, extra, meta = ck.restore(template, jax.random.key(0), extra={"ref_params": params})
    ck.close()
    assert meta["step"] == 7 and int(state.step) == 7
    want = moments(stacked, grads)
    got_leaves, got_def = jax.tree.flatten(state.opt_state)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def
    tmpl_leaves = jax.tree.leaves(template.opt_state)
    for got, w, t in zip(got_leaves, want_leaves, tmpl_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-6, atol=1e-12)
        assert got.sharding.is_equivalent_to(t.sharding, got.ndim)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert mu["layers/mlp/down_proj/kernel"].shape[0] == CFG.num_layers
    for tree in (state.params, extra["ref_params"]):
        assert set(tree) == set(stacked)
        for k, v in stacked.items():
            np.testing.assert_array_equal(np.asarray(tree[k]), v, err_msg=k)
            assert tree[k].sharding.is_equivalent_to(params[k].sharding, v.ndim)


def _with_shardings(flat, mesh):
    from atlas_jax.models.sharding import state_shardings

    shardings = flatten(state_shardings(nnx.state(build_model(CFG), nnx.Param), mesh))
    return [(k, v, shardings[k]) for k, v in flat.items()]


def test_scan_layers_flag_reaches_the_model():
    """``--config.model.scan_layers`` (default True) is what the policy's ModelConfig gets."""
    from atlas_jax.training.runtime import model_config
    from configs import base

    c = base.get_config()
    c.model.teacher_preset = "tiny_qwen3_untied"
    assert model_config("", c.model.teacher_preset, model_section=c.model).scan_layers is True
    c.model.scan_layers = False
    assert model_config("", c.model.teacher_preset, model_section=c.model).scan_layers is False
