"""One process of a multi-host test run (started N times by tests/test_distributed.py or launch/multihost.sh).

``python tests/multihost_worker.py OUT_DIR [--quick]`` joins the run described by the ``ATLAS_*`` variables
(``atlas_jax.distributed.initialize()``), then on a (data=2, fsdp=2, tensor=1) mesh over all processes'
devices: feeds host-local rows and reduces them globally, runs the tiny decoder's forward pass and one SFT
train step with the parameters sharded over the global mesh, and writes its results to
``OUT_DIR/rank{process}.npz`` for the parent to compare with a single-process run. ``--quick`` stops after
the data checks. `case()` builds the shared inputs and is also used by the parent for its reference.

``python tests/multihost_worker.py SPEC.json --train`` instead runs real training jobs: for each entry of
``SPEC["runs"]`` (``{"dotted.config.key": value}`` overrides of ``configs.base``) it calls
``launch.train.train(config)`` in this process (after ``distributed.initialize()``; without ``ATLAS_*``
variables that is a plain single-process run, the parent's reference).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LR = 0.05
NUM_MICRO = 2
ROWS = 8


def case() -> dict:
    """Tiny model config, random parameters (numpy, no JAX ops) and one SFT batch; deterministic."""
    from atlas_jax.models.params import abstract_model, flatten
    from atlas_jax.models.presets import get_preset
    from atlas_jax.training import batching

    # One layer keeps compile time low; the sharding of every layer is the same.
    cfg = get_preset("tiny_qwen3_untied").replace(
        vocab_size=97, num_layers=1, param_dtype="float32", dtype="float32"
    )
    rng = np.random.default_rng(7)
    params = {}
    for k, spec in sorted(flatten(abstract_model(cfg)).items()):
        base = 1.0 if k.endswith("scale") else 0.0
        params[k] = (base + 0.05 * rng.standard_normal(spec.shape)).astype(np.float32)
    lengths = rng.integers(4, 15, ROWS)
    ids = [list(rng.integers(2, cfg.vocab_size, n)) for n in lengths]
    masks = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    batch = batching.sft_arrays(ids, masks, max_length=16, length_bucket=16)
    return {"cfg": cfg, "params": params, "batch": batch}


def forward_fn(graphdef, rest):
    """``logits(params, batch)`` of the decoder, jitted."""
    import jax

    from atlas_jax.training import train_step

    def fwd(params, batch):
        model = train_step.merge_model(graphdef, params, rest)
        return model(batch["tokens"], batch["positions"], batch["attention_mask"])[0]

    return jax.jit(fwd)


def make_step(cfg, params_np, mesh):
    """(state, step_fn, forward) for one plain-SGD SFT step on ``mesh`` (params placed by the model's rules)."""
    import optax

    from atlas_jax.models import build_model
    from atlas_jax.training import train_step
    from atlas_jax.training.sft import sft_loss_fn

    model = build_model(cfg, params_np, mesh=mesh)
    graphdef, params, rest = train_step.split_model(model)
    tx = optax.sgd(LR)
    shardings = train_step.state_shardings(tx, params, mesh)
    state = train_step.init_state(tx, params, mesh)
    step = train_step.make_train_step(
        graphdef, rest, tx, sft_loss_fn(8), num_micro=NUM_MICRO, mesh=mesh, shardings=shardings
    )
    return state, step, forward_fn(graphdef, rest)


def train_config(overrides: dict):
    """``configs.base.get_config()`` with ``{"a.b": value}`` overrides (JSON lists become tuples)."""
    from configs.base import get_config

    c = get_config()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return c


def run_training(spec_path: str) -> None:
    """Runs every config of the spec file through ``launch.train.train``, in order, in this process."""
    import json

    from atlas_jax import distributed

    distributed.initialize()
    from launch.train import train

    for k, overrides in enumerate(json.loads(Path(spec_path).read_text())["runs"]):
        train(train_config(overrides))
        if distributed.is_main_process():  # the run's metrics as they were after run k (resume checks)
            out = Path(overrides["output_dir"])
            (out.parent / f"{out.name}.metrics_after_run{k}.jsonl").write_bytes(
                (out / "metrics.jsonl").read_bytes()
            )
    distributed.sync("training-done")


def main(out_dir: str, quick: bool) -> None:
    import jax

    from atlas_jax import distributed

    settings = distributed.initialize()
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from atlas_jax.models.sharding import MESH_AXES, make_mesh

    out: dict[str, np.ndarray] = {
        "mode": np.array(settings.mode),
        "process_index": np.array(distributed.process_index()),
        "process_count": np.array(distributed.process_count()),
        "device_count": np.array(jax.device_count()),
        "local_device_count": np.array(jax.local_device_count()),
        "is_main": np.array(distributed.is_main_process()),
    }
    mesh = make_mesh((2, 2, 1))
    x = np.arange(ROWS * 3, dtype=np.float32).reshape(ROWS, 3)
    rows = distributed.host_local_batch(ROWS, mesh)
    arr = distributed.to_global_array(x[rows], mesh, global_rows=ROWS)
    weights = jnp.arange(1, ROWS + 1, dtype=jnp.float32)
    out["rows"] = rows
    out["weighted_sum"] = distributed.gather_to_host(jax.jit(lambda a: (a.sum(1) * weights).sum())(arr))
    out["roundtrip"] = distributed.gather_to_host(arr)

    # A mesh whose batch blocks alternate between processes: each host feeds two non-adjacent row blocks.
    by_proc = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
    interleaved = [d for pair in zip(*by_proc, strict=True) for d in pair]
    imesh = Mesh(np.array(interleaved).reshape(2, 2, 1), MESH_AXES)
    irows = distributed.host_local_batch(ROWS, imesh)
    out["interleaved_rows"] = irows
    out["interleaved_roundtrip"] = distributed.gather_to_host(
        distributed.to_global_array(x[irows], imesh, global_rows=ROWS)
    )
    distributed.assert_same_on_all_hosts({"x": x, "rows": np.arange(ROWS)}, "identical data")
    try:
        distributed.assert_same_on_all_hosts({"x": x + distributed.process_index()}, "per-host data")
        out["differ_error"] = np.array("")
    except RuntimeError as e:
        out["differ_error"] = np.array(str(e))
    distributed.sync("data-checks")
    if not quick:
        c = case()
        state, step, fwd = make_step(c["cfg"], c["params"], mesh)
        batch = distributed.shard_global_batch(c["batch"], mesh)
        out["logits"] = distributed.gather_to_host(fwd(state.params, batch))
        state, metrics = step(state, batch)
        m = distributed.gather_to_host(metrics)
        out["loss"], out["grad_norm"] = m["loss"], m["grad_norm"]
        for k, v in distributed.gather_to_host(state.params).items():
            out["param/" + k] = v
    np.savez(Path(out_dir) / f"rank{distributed.process_index()}.npz", **out)
    distributed.sync("done")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    if "--train" in sys.argv[2:]:
        run_training(sys.argv[1])
    else:
        main(sys.argv[1], quick="--quick" in sys.argv[2:])
