"""GPU checks (``-m gpu``; run by tools/gpu_check.sh on a machine with an NVIDIA GPU, deselected in CI).

Each test needs a CUDA device and fails (it does not skip) without one. Tolerances: cuDNN vs XLA attention in
bfloat16 2e-2 absolute (bf16 rounding; cuDNN's flash kernel reorders the softmax); the GPU train step vs the
same step on CPU 1e-4 relative (fp32, different reduction order); the sampler's greedy tokens equal HF generate
exactly (fp32); DLPack hand-over is bit-exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atlas_jax.engines import weight_sync
from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.jax_sampler import JaxSampler
from atlas_jax.models import attention, build_model, flatten
from atlas_jax.models.sharding import make_mesh
from converters import mapping

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpus():
    try:
        devices = jax.devices("gpu")
    except RuntimeError as e:
        pytest.fail(f"no GPU visible to JAX (JAX_PLATFORMS={jax.config.jax_platforms!r}): {e}")
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    return devices


def _qkv(b=2, t=256, n=8, k=2, h=128, seed=0):
    r = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(r.standard_normal(s), jnp.bfloat16) for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h))
    )


def test_cudnn_attention_matches_xla(gpus):
    q, k, v = (jax.device_put(x, gpus[0]) for x in _qkv())
    seg = np.ones((2, 256), np.int32)
    seg[0, :37] = attention.PAD_SEGMENT  # left padding
    seg[1, 100:] = 2  # two packed examples
    seg = jax.device_put(jnp.asarray(seg), gpus[0])
    real = np.asarray(seg) != attention.PAD_SEGMENT

    def run(impl):
        f = jax.jit(lambda q, k, v, s: attention.self_attention(q, k, v, s, impl=impl, dtype=jnp.bfloat16))
        return f(q, k, v, seg)

    compiled = (
        jax.jit(lambda q, k, v, s: attention.self_attention(q, k, v, s, impl="cudnn", dtype=jnp.bfloat16))
        .lower(q, k, v, seg)
        .compile()
    )
    assert "cudnn" in compiled.as_text().lower()  # the fused cuDNN kernel, not an XLA fallback
    got, want = np.asarray(run("cudnn"), np.float32), np.asarray(run("xla"), np.float32)
    assert np.abs(got - want)[real].max() <= 2e-2

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            attention.self_attention(q, k, v, seg, impl=impl, dtype=jnp.bfloat16).astype(jnp.float32)
            * real[..., None, None]
        )

    g_cudnn = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_cudnn, g_xla, strict=True):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) <= 5e-2 * scale


def _train_once(mesh):
    from test_train_step import _setup, _sft_batch

    from atlas_jax.training import train_step
    from atlas_jax.training.sft import sft_loss_fn

    loss_fn = sft_loss_fn(chunk=8)
    graphdef, rest, tx, state = _setup(mesh, loss_fn)
    shardings = train_step.state_shardings(tx, state.params, mesh)
    step = train_step.make_train_step(
        graphdef, rest, tx, loss_fn, num_micro=2, mesh=mesh, shardings=shardings
    )
    batch = _sft_batch(np.random.default_rng(0), rows=8)
    state, m = step(state, batch)
    return jax.device_get(m), {k: np.asarray(v) for k, v in state.params.items()}


def test_sharded_train_step_on_gpu_equals_cpu(gpus):
    m_gpu, p_gpu = _train_once(make_mesh((1, len(gpus), 1), devices=gpus))
    m_cpu, p_cpu = _train_once(make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1]))
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(m_gpu[k], m_cpu[k], rtol=1e-4, err_msg=k)
    for k in p_cpu:
        np.testing.assert_allclose(p_gpu[k], p_cpu[k], rtol=1e-4, atol=2e-4, err_msg=k)


def test_sampler_on_gpu_matches_hf_generate(gpus):
    from test_jax_sampler import PROMPTS, _hf_greedy, _random_hf, _tokenizer

    from atlas_jax.models.config import ModelConfig

    hf = _random_hf(0)
    tok = _tokenizer()
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    flat = mapping.hf_to_flat({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    mesh = make_mesh((1, len(gpus), 1), devices=gpus)
    model = build_model(cfg, flat, mesh=mesh)
    assert all(d.platform == "gpu" for x in flatten(model).values() for d in x.devices())
    got = JaxSampler(model, tok, mesh=mesh).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20))
    want = _hf_greedy(hf, tok, PROMPTS, 20)  # HF reference on the CPU (fp32)
    assert [c[0].token_ids for c in got] == want


def test_dlpack_hands_sharded_params_to_torch_on_gpu(gpus):
    from atlas_jax.models.presets import get_preset

    cfg = get_preset("tiny_qwen3")
    mesh = make_mesh((1, len(gpus), 1), devices=gpus)
    flat = flatten(build_model(cfg, mesh=mesh, seed=1))
    assert all(
        x.sharding.mesh.devices.size == len(gpus) for x in flat.values()
    )  # NamedSharding over the GPU mesh
    host = {k: np.asarray(v) for k, v in flat.items()}
    want = dict(mapping.flat_to_hf(host, cfg))
    n = 0
    for name, t in weight_sync.hf_tensors(flat, cfg):
        assert t.is_cuda, name  # stays on the GPU (DLPack), no host round trip
        np.testing.assert_array_equal(t.cpu().numpy(), want[name], err_msg=name)
        n += 1
    assert n == len(want)
