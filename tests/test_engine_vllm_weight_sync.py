"""weight_sync: HF-layout views of our params (no copies on CPU), checked against converters.mapping."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_helpers import make_hf_dir, perturbed_state

from atlas_jax.engines import weight_sync
from atlas_jax.models.config import ModelConfig
from converters import mapping


@pytest.fixture(scope="module", params=[("qwen3", True), ("qwen3", False), ("qwen2", False)])
def model(request, tmp_path_factory):
    model_type, tied = request.param
    d = make_hf_dir(tmp_path_factory.mktemp(f"{model_type}{tied}"), tied=tied, model_type=model_type)
    cfg = ModelConfig.from_hf(d)
    flat = mapping.hf_to_flat(perturbed_state(d, seed=1), cfg)
    return cfg, flat


def test_hf_tensors_equal_flat_to_hf(model):
    cfg, flat = model
    want = dict(mapping.flat_to_hf(flat, cfg))
    got = list(weight_sync.hf_tensors(flat, cfg))
    assert [n for n, _ in got] == list(want)
    for name, t in got:
        np.testing.assert_array_equal(t.numpy(), want[name], err_msg=name)


def test_hf_tensors_share_memory_with_params(model):
    cfg, flat = model
    spans = [
        (x.__array_interface__["data"][0], x.__array_interface__["data"][0] + x.nbytes) for x in flat.values()
    ]
    for _, t in weight_sync.hf_tensors(flat, cfg):
        # A view into one of our (stacked) buffers, not a copy.
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans)


def test_hf_tensors_from_jax_arrays_are_zero_copy(model):
    cfg, flat = model
    jflat = {k: jnp.asarray(v) for k, v in flat.items()}
    spans = [(v.unsafe_buffer_pointer(), v.unsafe_buffer_pointer() + v.nbytes) for v in jflat.values()]
    want = dict(mapping.flat_to_hf(flat, cfg))
    for name, t in weight_sync.hf_tensors(jflat, cfg):
        assert any(lo <= t.data_ptr() < hi for lo, hi in spans), name  # inside a (stacked) JAX buffer
        np.testing.assert_array_equal(t.numpy(), want[name])


def test_hf_tensors_validates_before_streaming(model):
    cfg, flat = model
    bad = dict(flat)
    bad.pop("final_norm/scale")
    with pytest.raises(mapping.MappingError, match="final_norm/scale"):
        weight_sync.hf_tensors(bad, cfg)  # Raises at call time, before any tensor is consumed.
    wrong = dict(flat)
    wrong["embed/embedding"] = np.zeros((3, 3), np.float32)
    with pytest.raises(mapping.MappingError, match="embed/embedding"):
        weight_sync.hf_tensors(wrong, cfg)


def test_flat_params_accepts_nested_dict(model):
    _, flat = model
    nested: dict = {}
    for k, v in flat.items():
        node = nested
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    assert weight_sync.flat_params(nested).keys() == flat.keys()
    with pytest.raises(TypeError, match="flat dict"):
        weight_sync.flat_params([1, 2])


def test_serialize_round_trip_and_shape_check(model):
    cfg, flat = model
    data = weight_sync.serialize(weight_sync.hf_tensors(flat, cfg))
    back = weight_sync.deserialize(data)
    want = dict(mapping.flat_to_hf(flat, cfg))
    assert back.keys() == want.keys()
    for k, v in back.items():
        np.testing.assert_array_equal(v.numpy(), want[k])
    weight_sync.check_hf_shapes({k: v.shape for k, v in back.items()}, cfg)
    back["model.norm.weight"] = torch.zeros(7)
    with pytest.raises(mapping.MappingError, match=r"model\.norm\.weight"):
        weight_sync.check_hf_shapes({k: v.shape for k, v in back.items()}, cfg)
    with pytest.raises(ValueError, match="not valid safetensors"):
        weight_sync.deserialize(b"garbage")


def test_bfloat16_jax_arrays_hand_over_bit_exact(model):
    cfg, flat = model
    jflat = {k: jnp.asarray(v, dtype=jnp.bfloat16) for k, v in flat.items()}
    want = dict(mapping.flat_to_hf({k: np.asarray(v) for k, v in jflat.items()}, cfg))
    for name, t in weight_sync.hf_tensors(jflat, cfg):
        assert t.dtype == torch.bfloat16
        np.testing.assert_array_equal(t.view(torch.int16).numpy(), want[name].view(np.int16), err_msg=name)
