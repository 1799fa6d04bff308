"""Logit parity of our Decoder with HF transformers (torch, fp32) on tiny random models, left-padded batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _model_hf import FAMILIES, hf_logits, hf_model, left_padded_batch, ours_from_hf
from flax import nnx

from atlas_jax.models.params import build_model

FP32_TOL = 1e-4  # max |Δlogit| on real tokens, fp32 params + compute (measured ~4e-7)
BF16_TOL = (
    2.5e-2  # bf16 compute (fp32 accumulation), fp32 or bf16 params (measured <= 9.1e-3, logits |x| <~ 1.4)
)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = hf_model(request.param)
    ids, positions, mask = left_padded_batch()
    return request.param, model, (ids, positions, mask), hf_logits(model, ids, positions, mask)


@nnx.jit
def _forward(model, ids, positions, mask):
    return model(ids, positions, mask)


def _ours_logits(model, batch):
    ids, positions, mask = (jnp.asarray(x) for x in batch)
    # One compile per shape: eager op-by-op dispatch is slower on this CPU.
    logits, cache = _forward(model, ids, positions, mask)
    assert cache is None
    return np.asarray(logits)


def test_fp32_logits_match_transformers(family, tmp_path):
    name, hf, batch, ref = family
    cfg, flat = ours_from_hf(hf, tmp_path)
    logits = _ours_logits(build_model(cfg, flat), batch)
    assert logits.dtype == np.float32 and logits.shape == ref.shape
    real = batch[2] == 1
    err = np.abs(logits - ref)[real].max()
    assert err <= FP32_TOL, f"{name}: max|Δlogit|={err:.3g} > {FP32_TOL}"


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_logits_close_to_transformers_fp32(family, tmp_path, param_dtype):
    name, hf, batch, ref = family
    cfg, flat = ours_from_hf(hf, tmp_path, param_dtype=param_dtype, dtype="bfloat16")
    model = build_model(cfg, flat)
    assert model.layers.mlp.up_proj.kernel.get_value().dtype == jnp.dtype(param_dtype)
    logits = _ours_logits(model, batch)
    assert logits.dtype == np.float32  # logits are always f32
    err = np.abs(logits - ref)[batch[2] == 1].max()
    assert err <= BF16_TOL, f"{name} bf16 ({param_dtype} params): max|Δlogit|={err:.3g} > {BF16_TOL}"


def test_hidden_states_then_unembed_equals_call_under_jit(family, tmp_path):
    _, hf, batch, ref = family
    cfg, flat = ours_from_hf(hf, tmp_path)
    model = build_model(cfg, flat)
    ids, positions, mask = (jnp.asarray(x) for x in batch)

    @nnx.jit
    def two_step(m, ids, positions, mask):
        hidden, _ = m.hidden_states(ids, positions, mask)
        return hidden, m.unembed(hidden)

    hidden, logits = two_step(model, ids, positions, mask)
    assert hidden.shape == (*ids.shape, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(logits)[batch[2] == 1], ref[batch[2] == 1], atol=FP32_TOL, rtol=0)


def test_padding_does_not_change_real_token_logits(tmp_path):
    """The same sequence alone and left-padded inside a batch gives the same logits (pad tokens are ignored)."""
    hf = hf_model("qwen3_untied")
    cfg, flat = ours_from_hf(hf, tmp_path)
    model = build_model(cfg, flat)
    ids, positions, mask = left_padded_batch(lengths=(11, 4))
    alone = _ours_logits(model, (ids[1:, 7:], positions[1:, 7:], mask[1:, 7:]))
    padded = ids.copy()
    padded[1, :7] = 123  # arbitrary junk under the padding must not matter
    batched = _ours_logits(model, (padded, positions, mask))
    np.testing.assert_allclose(batched[1, 7:], alone[0], atol=1e-5, rtol=0)


def test_remat_gives_same_loss_and_grads(tmp_path):
    hf = hf_model("qwen2")
    cfg, flat = ours_from_hf(hf, tmp_path)
    ids, positions, mask = (jnp.asarray(x) for x in left_padded_batch())

    def loss_and_grads(remat):
        model = build_model(cfg.replace(remat=remat), flat)

        def loss_fn(m):
            logits, _ = m(ids, positions, mask)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -(tok * mask[:, 1:]).sum() / mask[:, 1:].sum()

        return nnx.jit(nnx.value_and_grad(loss_fn))(model)

    loss0, g0 = loss_and_grads(False)
    loss1, g1 = loss_and_grads(True)
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    flat0 = jax.tree.leaves(g0)
    flat1 = jax.tree.leaves(g1)
    assert len(flat0) == len(flat1) > 0
    for a, b in zip(flat0, flat1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)
    assert any(float(jnp.abs(g).max()) > 0 for g in flat0)
