"""Schedules, clipping and weight-decay masking of the AdamW chain."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from atlas_jax.training import optimizer


def test_warmup_then_cosine_hand_values():
    spec = optimizer.OptimSpec(
        learning_rate=1e-3, total_steps=14, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1
    )
    lr = optimizer.make_schedule(spec)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    # cosine over the remaining 10 steps from 1e-3 to 1e-4: halfway = 1e-4 + 0.5 * 9e-4.
    np.testing.assert_allclose(float(lr(9)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)
    np.testing.assert_allclose(float(lr(14)), 1e-4, rtol=1e-5)


def test_constant_without_warmup():
    lr = optimizer.make_schedule(optimizer.OptimSpec(learning_rate=2e-6, total_steps=5))
    assert [float(lr(s)) for s in (0, 3, 100)] == pytest.approx([2e-6] * 3)


def test_spec_from_config_resolves_warmup_ratio_and_rejects_bad_values():
    c = ml_collections.ConfigDict(
        dict(schedule="cosine", warmup_steps=0, warmup_ratio=0.05, min_lr_ratio=0.0, weight_decay=1e-4,
             b1=0.9, b2=0.95, eps=1e-8, max_grad_norm=1.0)
    )  # fmt: skip
    spec = optimizer.spec_from_config(c, 1e-5, 200)
    assert spec.warmup_steps == 10 and spec.b2 == 0.95
    c.schedule = "linear"
    with pytest.raises(ValueError, match=r"optim\.schedule"):
        optimizer.spec_from_config(c, 1e-5, 200)
    c.schedule, c.warmup_steps = "cosine", 300
    with pytest.raises(ValueError, match="warmup"):
        optimizer.spec_from_config(c, 1e-5, 200)


def test_global_norm_clip_reaches_adam_moments():
    tx, _ = optimizer.make_optimizer(
        optimizer.OptimSpec(learning_rate=1e-2, total_steps=3, max_grad_norm=1.0)
    )
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    grads = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), 4.0)}  # global norm sqrt(36 + 32) = sqrt(68)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    adam_state = state[1][0]
    scale = 1.0 / math.sqrt(68.0)
    np.testing.assert_allclose(adam_state.mu["w"], 0.1 * 3.0 * scale, rtol=1e-6)  # mu = (1 - b1) * clipped g
    np.testing.assert_allclose(adam_state.mu["b"], 0.1 * 4.0 * scale, rtol=1e-6)


def test_weight_decay_only_on_matrices():
    tx, _ = optimizer.make_optimizer(
        optimizer.OptimSpec(learning_rate=0.1, total_steps=3, weight_decay=0.5, max_grad_norm=0.0)
    )
    params = {"w": jnp.ones((2, 3)), "scale": jnp.ones((3,))}
    zeros = {"w": jnp.zeros((2, 3)), "scale": jnp.zeros((3,))}
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 1.0 - 0.1 * 0.5, rtol=1e-6)  # decoupled decay: p -= lr * wd * p
    np.testing.assert_array_equal(new["scale"], 1.0)


def test_weight_decay_skips_stacked_norm_scales():
    """Scanned layers stack a norm scale to ``[L, D]``: still a norm (not decayed); a stacked ``[L, D, F]`` is."""
    tx, _ = optimizer.make_optimizer(
        optimizer.OptimSpec(learning_rate=0.1, total_steps=3, weight_decay=0.5, max_grad_norm=0.0)
    )
    params = {
        "layers/mlp/kernel": jnp.ones((2, 3, 4)),
        "layers/norm/scale": jnp.ones((2, 3)),
        "w": jnp.ones((3, 4)),
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["layers/norm/scale"], 1.0)
    np.testing.assert_allclose(new["layers/mlp/kernel"], 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["w"], 1.0 - 0.1 * 0.5, rtol=1e-6)
