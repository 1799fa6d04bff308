"""The fused CPU decode-attention kernel (`atlas_jax.kernels.cpu_attention`) and its use in `cached_attention`.

Built from its C++ source with the machine's g++ and run as a real XLA custom call; compared with a float64
numpy softmax attention of the same float32 operands. Tolerance 1e-5 of the largest |reference| value (f32
sums in another order and a polynomial exp; measured <= 7e-7). Needs avx512f/bw/vl (both CPU kinds this
project runs on have them); without, the kernel tests fail with the reason rather than skip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.kernels import cpu_attention
from atlas_jax.models import attention

TOL = 1e-5
ONE_DEVICE = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv(cpu_attention.ENV, "1")
    cpu_attention.available.cache_clear()
    assert cpu_attention.available()
    yield
    cpu_attention.available.cache_clear()


def _reference(q, k, v, allowed, scale):
    logits = np.einsum("bkgh,bkhs->bkgs", q.astype(np.float64), k.astype(np.float64)) * scale
    logits = np.where(allowed[:, None, None, :], logits, attention.NEG_INF)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgs,bksh->bkgh", p, v.astype(np.float64))


def _err(y, ref) -> float:
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    ("b", "k", "g", "h", "s"),
    [(3, 2, 4, 64, 144), (2, 1, 7, 16, 5), (1, 8, 4, 128, 300), (5, 2, 1, 32, 64), (2, 2, 9, 48, 65)],
)
def test_kernel_matches_a_float64_softmax_attention(kernel, b, k, g, h, s):
    """Slot counts below/at/above the 64-slot block, 1-9 query heads per kv head (the 4-row block and its
    remainder), head dims 16-128; random allowed slots, and row 0 with none allowed (uniform, as XLA's)."""
    rng = np.random.default_rng(b * 100 + s)
    q = rng.standard_normal((b, k, g, h)).astype(np.float32)
    keys = rng.standard_normal((b, k, h, s)).astype(np.float32)
    values = rng.standard_normal((b, k, s, h)).astype(np.float32)
    allowed = rng.random((b, s)) < 0.6
    allowed[0] = False
    scale = h**-0.5
    fn = jax.jit(lambda *a: cpu_attention.decode_attention(*a, scale, attention.NEG_INF))
    y = fn(q, keys, values, allowed)
    assert y.shape == (b, k, g, h) and y.dtype == jnp.float32
    assert _err(y, _reference(q, keys, values, allowed, scale)) <= TOL


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cached_attention_uses_it_for_one_token(kernel, dtype):
    """`cached_attention` with one query token on one device runs the kernel (a custom call in the program) and
    equals its XLA path (8 devices, no mesh) within float32 rounding; two query tokens keep XLA's path."""
    rng = np.random.default_rng(1)
    b, n, kh, h, s = 4, 8, 2, 64, 40
    q = jnp.asarray(rng.standard_normal((b, 1, n, h)), dtype)
    keys = jnp.asarray(rng.standard_normal((b, kh, h, s)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, kh, s, h)), jnp.float32)
    slot_mask = jnp.asarray(rng.random((b, s)) < 0.8)
    index = jnp.int32(30)

    def run(q):
        return attention.cached_attention(q, keys, values, slot_mask, index, impl="xla", dtype=dtype)

    with jax.set_mesh(ONE_DEVICE):
        assert cpu_attention.TARGET in jax.jit(run).lower(q).as_text()
        assert cpu_attention.TARGET not in jax.jit(run).lower(jnp.concatenate([q, q], 1)).as_text()
        got = jax.jit(run)(q)
    assert cpu_attention.TARGET not in jax.jit(run).lower(q).as_text()  # 8 devices: XLA
    want = jax.jit(run)(q)
    assert got.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _err(got, np.asarray(want, np.float64)) <= tol


def test_flags_and_fallbacks(monkeypatch):
    full = "flags\t: fpu avx2 avx512f avx512bw avx512vl\n"
    assert cpu_attention.cpu_supports(full) and not cpu_attention.cpu_supports(full.replace(" avx512bw", ""))
    assert not cpu_attention.cpu_supports(None)
    monkeypatch.setenv(cpu_attention.ENV, "maybe")
    cpu_attention.available.cache_clear()
    with pytest.raises(ValueError, match=cpu_attention.ENV):
        cpu_attention.available()
    monkeypatch.setenv(cpu_attention.ENV, "1")
    monkeypatch.setattr(cpu_attention, "read_cpuinfo", lambda: "flags\t: fpu avx2\n")
    cpu_attention.available.cache_clear()
    with pytest.raises(RuntimeError, match="avx512f"):
        cpu_attention.available()
    monkeypatch.setenv(cpu_attention.ENV, "0")
    cpu_attention.available.cache_clear()
    with jax.set_mesh(ONE_DEVICE):
        assert not cpu_attention.enabled(64)
    cpu_attention.available.cache_clear()
    assert not cpu_attention.enabled(20)  # head dim not a multiple of 16: never


def test_kernels_only_on_one_cpu_device():
    """`placement.one_cpu_device`: a one-device CPU mesh yes; two devices, or none set in an 8-device process, no."""
    from atlas_jax.kernels import placement

    assert not placement.one_cpu_device()  # the tests' process has 8 CPU devices and no mesh is set
    with jax.set_mesh(ONE_DEVICE):
        assert placement.one_cpu_device()
    with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))):
        assert not placement.one_cpu_device()
