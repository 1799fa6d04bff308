"""The fused CPU attention kernels (`atlas_jax.kernels.cpu_attention`): decode (and its use in `cached_attention`),
and training self-attention with its backward (and its use by `self_attention(impl="auto")`).

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


def test_kernel_on_a_cache_filled_from_the_front(kernel):
    """A rollout's cache: each row allowed up to its own fill mark (1 slot, inside and at the end of a 64-slot
    block, all of it) with holes before it (left padding); the kernel reads only up to the mark, and garbage
    beyond it (NaN, as in never-written slots of a reused buffer) must not reach the output."""
    b, k, g, h, s = 5, 2, 4, 64, 144
    rng = np.random.default_rng(7)
    q = rng.standard_normal((b, k, g, h)).astype(np.float32)
    keys = rng.standard_normal((b, k, h, s)).astype(np.float32)
    values = rng.standard_normal((b, k, s, h)).astype(np.float32)
    marks = [1, 37, 64, 100, 144]
    allowed = np.arange(s)[None, :] < np.asarray(marks)[:, None]
    allowed[1:, :3] = False  # left padding
    for row, mark in enumerate(marks):
        keys[row, :, :, mark:] = np.nan
        values[row, :, mark:] = np.nan
    scale = h**-0.5
    y = jax.jit(lambda *a: cpu_attention.decode_attention(*a, scale, attention.NEG_INF))(
        q, keys, values, allowed
    )
    ref = _reference(q, np.nan_to_num(keys), np.nan_to_num(values), allowed, scale)
    assert np.isfinite(np.asarray(y)).all()
    assert _err(y, ref) <= TOL


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


# ------------------------------------------------------------------------------------ training self-attention
def _segments(b: int, t: int, rng) -> np.ndarray:
    """Row 0 left-padded (-1), row 1 packed (1, 1, ..., 2, ..., 3), others one segment with right pads."""
    seg = np.ones((b, t), np.int32)
    seg[0, : t // 3] = attention.PAD_SEGMENT
    if b > 1:
        cuts = sorted(rng.choice(np.arange(1, t), size=min(2, t - 1), replace=False))
        for i, c in enumerate(cuts):
            seg[1, c:] = i + 2
    for r in range(2, b):
        seg[r, t - r :] = attention.PAD_SEGMENT
    return seg


def _self_reference(q, k, v, seg):
    """float64 causal attention within equal segment ids, q [B,T,N,H], k/v [B,T,K,H]."""
    _, t, n, h = q.shape
    g = n // k.shape[2]
    kk = np.repeat(k.astype(np.float64), g, axis=2)
    vv = np.repeat(v.astype(np.float64), g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), kk) * h**-0.5
    allowed = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((t, t), bool))[None]
    logits = np.where(allowed[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, vv)


SELF_SHAPES = [
    (2, 144, 8, 2, 64),
    (3, 37, 7, 1, 16),
    (2, 1, 4, 4, 32),
    (2, 200, 4, 2, 128),
    (4, 65, 9, 3, 48),
]


@pytest.mark.parametrize(("b", "t", "n", "kh", "h"), SELF_SHAPES)
def test_self_attention_forward_and_gradients(kernel, b, t, n, kh, h):
    """Query counts below/at/above the 16- and 64-key blocks (1-200), 1-9 query heads per kv head (4-row blocks
    and remainders), head dims 16-128, left pads / packed segments / right pads. Forward vs a float64 numpy
    attention (1e-5 of max |ref|); q/k/v gradients of <out, w> vs XLA's autodiff of the float32 dense path
    (1e-4 of each gradient's max |ref|: two float32 computations in different orders)."""
    rng = np.random.default_rng(b * 1000 + t)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    v = rng.standard_normal((b, t, kh, h)).astype(np.float32)
    w = rng.standard_normal((b, t, n, h)).astype(np.float32)
    seg = jnp.asarray(_segments(b, t, rng))
    out = jax.jit(cpu_attention.self_attention)(q, k, v, seg)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert _err(out, _self_reference(q, k, v, np.asarray(seg))) <= TOL

    def dense(q, k, v):
        return attention.self_attention(q, k, v, seg, impl="dense", dtype=jnp.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

    got = grads(lambda q, k, v: cpu_attention.self_attention(q, k, v, seg))
    want = grads(dense)
    for name, g_, r_ in zip("qkv", got, want, strict=True):
        assert g_.shape == r_.shape and g_.dtype == jnp.float32, name
        if not np.any(np.asarray(r_)):  # one query over one key: dq is exactly 0
            assert float(np.abs(np.asarray(g_)).max()) <= 1e-6, name
            continue
        assert _err(g_, np.asarray(r_, np.float64)) <= 1e-4, name


def test_self_attention_bf16_rounds_the_float32_result(kernel):
    """bf16 operands: the output is the float32 computation on the same (bf16) values rounded to bf16
    (within one bf16 ulp: 2^-8 relative), gradients come back in bf16 within bf16 rounding (1e-2 of max)."""
    rng = np.random.default_rng(7)
    b, t, n, kh, h = 2, 50, 4, 2, 32
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
        for s in [(b, t, n, h), (b, t, kh, h), (b, t, kh, h)]
    )
    seg = jnp.asarray(_segments(b, t, rng))
    out = jax.jit(cpu_attention.self_attention)(q, k, v, seg)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = np.asarray(jax.jit(cpu_attention.self_attention)(*f32, seg), np.float64)
    assert out.dtype == jnp.bfloat16
    assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= 2**-8 * np.abs(ref) + 1e-30)
    g = jax.jit(jax.grad(lambda q: jnp.sum(cpu_attention.self_attention(q, k, v, seg).astype(jnp.float32))))(
        q
    )
    g32 = jax.jit(jax.grad(lambda q: jnp.sum(cpu_attention.self_attention(q, *f32[1:], seg))))(f32[0])
    assert g.dtype == jnp.bfloat16 and _err(g, np.asarray(g32, np.float64)) <= 1e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_self_attention_auto_uses_it_on_one_cpu_device(kernel, dtype):
    """``impl="auto"`` on a one-device mesh lowers to the kernel (forward and backward custom calls) and equals
    XLA's path (8 devices, no mesh) within float32 / bf16 rounding; explicit "xla" / "dense" keep XLA."""
    rng = np.random.default_rng(3)
    b, t, n, kh, h = 3, 40, 8, 2, 64
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, n, h), (b, t, kh, h), (b, t, kh, h)]
    )
    seg = jnp.asarray(_segments(b, t, rng))

    def run(impl):
        def loss(q, k, v):
            out = attention.self_attention(q, k, v, seg, impl=impl, dtype=dtype)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    with jax.set_mesh(ONE_DEVICE):
        text = run("auto").lower(q, k, v).as_text()
        assert "atlas_self_attention" in text and "atlas_self_attention_bwd" in text
        for impl in ("xla", "dense"):
            assert "atlas_self_attention" not in run(impl).lower(q, k, v).as_text()
        (_, got), got_g = run("auto")(q, k, v)
    assert "atlas_self_attention" not in run("auto").lower(q, k, v).as_text()  # 8 devices: XLA
    (_, want), want_g = run("auto")(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert got.dtype == want.dtype == dtype
    assert _err(got, np.asarray(want, np.float64)) <= tol
    for g_, r_ in zip(got_g, want_g, strict=True):
        assert _err(g_, np.asarray(r_, np.float64)) <= 10 * tol


def test_self_attention_rejects_bad_shapes(kernel):
    """The kernel names its contract when XLA hands it what it does not take (head dim not a multiple of 16)."""
    q = jnp.zeros((1, 4, 2, 20), jnp.float32)
    k = jnp.zeros((1, 4, 1, 20), jnp.float32)
    with pytest.raises(Exception, match="H % 16 == 0"):
        jax.block_until_ready(cpu_attention.self_attention(q, k, k, jnp.ones((1, 4), jnp.int32)))
