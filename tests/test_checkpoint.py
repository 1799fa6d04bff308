"""atlas_jax.checkpoint: orbax save/restore, retention, async, and restore onto a 2x2x2 mesh."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from atlas_jax.checkpoint import Checkpointer, read_json, write_json


def make_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed/embedding": rng.standard_normal((16, 8), dtype=np.float32),
        "layers/0/attn/q_proj/kernel": rng.standard_normal((8, 2, 4)).astype(ml_dtypes.bfloat16),
        "final_norm/scale": rng.standard_normal(8, dtype=np.float32),
    }


def assert_equal_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        g = np.asarray(got[k])
        assert g.dtype == want[k].dtype and g.shape == want[k].shape, k
        np.testing.assert_array_equal(g, want[k], err_msg=k)


def test_save_restore_is_exact(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(3, state, meta={"tokens": 123, "note": "x"})
    ckpt = Checkpointer(tmp_path / "ck")  # a fresh manager reads what another wrote
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
    restored = ckpt.restore()
    assert all(isinstance(v, np.ndarray) for v in restored.values())
    assert_equal_state(restored, state)
    assert ckpt.restore_meta() == {"tokens": 123, "note": "x"}


def test_nested_train_state_round_trips(tmp_path: Path) -> None:
    state = {"params": {"w": np.arange(6.0).reshape(2, 3)}, "opt": {"mu": np.ones(3), "count": np.int32(7)}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        restored = ckpt.restore(1)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(restored["opt"]["mu"], state["opt"]["mu"])
    assert int(restored["opt"]["count"]) == 7


def test_restore_onto_mesh_with_shardings(tmp_path: Path) -> None:
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    state = make_state(1)
    specs = {
        "embed/embedding": PartitionSpec("fsdp", "tensor"),
        "layers/0/attn/q_proj/kernel": PartitionSpec("fsdp", "tensor", None),
        "final_norm/scale": PartitionSpec(),
    }
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, state)
        restored = ckpt.restore(shardings=shardings)
        replicated = ckpt.restore(mesh=mesh)
    for k, x in restored.items():
        assert isinstance(x, jax.Array) and x.sharding == shardings[k], k
        # each device holds only its shard: the embedding is split 2 x 2 across fsdp x tensor
    assert restored["embed/embedding"].addressable_shards[0].data.shape == (8, 4)
    assert_equal_state(restored, state)
    for x in replicated.values():
        assert x.sharding.spec == PartitionSpec() and x.sharding.mesh.shape == mesh.shape
    assert_equal_state(replicated, state)


def test_sharded_jax_arrays_save_and_restore(tmp_path: Path) -> None:
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    state = make_state(2)
    on_mesh = {k: jax.device_put(v, NamedSharding(mesh, PartitionSpec())) for k, v in state.items()}
    on_mesh["embed/embedding"] = jax.device_put(
        state["embed/embedding"], NamedSharding(mesh, PartitionSpec("data"))
    )
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, on_mesh)
        assert_equal_state(ckpt.restore(), state)  # back on the host as numpy


def test_retention_every_n_and_async(tmp_path: Path) -> None:
    state = make_state()
    ckpt = Checkpointer(tmp_path, max_to_keep=2, save_every=2, async_save=True)
    started = [
        ckpt.save(step, {k: v + step for k, v in state.items()}, meta={"step": step}) for step in range(7)
    ]
    assert started == [True, False, True, False, True, False, True]
    assert ckpt.save(5, state, force=True)  # forced steps ignore save_every
    ckpt.wait()
    assert ckpt.all_steps() == [5, 6]
    assert ckpt.restore_meta(6) == {"step": 6}
    assert_equal_state(ckpt.restore(6), {k: v + 6 for k, v in state.items()})
    ckpt.close()


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with (
        Checkpointer(tmp_path / "empty") as ckpt,
        pytest.raises(FileNotFoundError, match="no checkpoint steps"),
    ):
        ckpt.restore()
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(0, make_state())
        with pytest.raises(FileNotFoundError, match=r"no step 4 \(have \[0\]\)"):
            ckpt.restore(4)
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
        with pytest.raises(ValueError, match="shardings do not match"):
            ckpt.restore(shardings={"embed/embedding": NamedSharding(mesh, PartitionSpec())})
        with pytest.raises(TypeError):
            ckpt.save(1, make_state(), meta={"bad": object()})
    with pytest.raises(ValueError, match="save_every must be >= 1"):
        Checkpointer(tmp_path / "x", save_every=0)


def test_json_helpers(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"b": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"b": [1, 2]}
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: model config is not valid JSON"):
        read_json(tmp_path / "bad.json", "model config")
    with pytest.raises(FileNotFoundError, match=r"nope\.json: JSON file not found"):
        read_json(tmp_path / "nope.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": [1, 2]}
