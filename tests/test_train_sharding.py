"""The train step is traced under the mesh: the compiled program carries the activation sharding constraints.

Without ``jax.set_mesh`` the model's ``constrain`` calls are no-ops; this test inspects the lowered and compiled
programs (not only the numbers): sharding constraints are present and the per-device activations are
``[micro_batch / (data·fsdp), T, D]``, which the same step traced outside the mesh does not produce.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_train_step import CFG, _setup, _sft_batch

from atlas_jax.models.sharding import make_mesh
from atlas_jax.training import train_step
from atlas_jax.training.sft import sft_loss_fn


@pytest.mark.slow
def test_train_step_program_has_the_activation_shardings():
    mesh = make_mesh((2, 2, 2))  # data 2 x fsdp 2: batch rows over 4 devices
    loss_fn = sft_loss_fn(chunk=8)
    graphdef, rest, tx, state = _setup(mesh, loss_fn)
    shardings = train_step.state_shardings(tx, state.params, mesh)
    batch = _sft_batch(np.random.default_rng(0), rows=8)
    t = batch["tokens"].shape[1]
    step = train_step.make_train_step(
        graphdef, rest, tx, loss_fn, num_micro=2, mesh=mesh, shardings=shardings
    )

    lowered = step.lower(state, batch)
    assert lowered.as_text().count("sharding_constraint") > 0
    bare = step.jitted.lower(state, batch)  # the same jit traced outside the mesh: constraints vanish
    assert bare.as_text().count("sharding_constraint") == 0

    per_device_act = f"f32[1,{t},{CFG.hidden_size}]"  # 8 rows / 2 micro-batches / 4 batch shards
    assert per_device_act in lowered.compile().as_text()
    assert not re.search(re.escape(per_device_act), bare.compile().as_text())
    state, metrics = step(state, batch)  # and it runs
    assert np.isfinite(float(metrics["loss"]))
