"""The AMX bf16 matmul kernel (`atlas_jax.kernels.amx_matmul`) and the einsums `layers.einsum` routes to it.

The kernel is compiled from its C++ source with the machine's g++ and runs as a real XLA custom call on the
CPU's AMX tiles; products are compared with a float64 numpy product of the same bf16 operands. Tolerance: 1e-5
of the largest |reference| value (f32 accumulation in another order; measured <= 4e-7). Tests marked ``amx`` need
a CPU listing amx_tile/amx_bf16 (Sapphire Rapids or later): `make test` deselects them on one without, as it
does `gpu` tests (conftest `AMX_CPU`); the mapping, flag and fallback tests run everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.kernels import amx_matmul
from atlas_jax.models import layers

TOL = 1e-5
amx = pytest.mark.amx
ONE_DEVICE = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1), ("data",))


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv(amx_matmul.ENV, "1")  # must build, be granted AMX and register (an error says why not)
    amx_matmul.available.cache_clear()
    assert amx_matmul.available()
    yield
    amx_matmul.available.cache_clear()


@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setenv(amx_matmul.ENV, "0")
    amx_matmul.available.cache_clear()
    yield
    amx_matmul.available.cache_clear()


def _arr(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _err(y, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


@amx
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(32, 32, 64), (1, 7, 5), (33, 70, 130), (64, 512, 1408), (300, 96, 64), (2304, 64, 192), (96, 1000, 65)],
)
@pytest.mark.parametrize(("a_t", "b_t"), [(False, False), (True, False), (False, True), (True, True)])
def test_kernel_matches_a_float64_product(kernel, m, k, n, a_t, b_t):
    """Exact tile multiples and every kind of padding: M, K below/above 32, N not a multiple of 64, more rows
    than one 256-row task; each operand stored as is or transposed."""
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    a, b = _arr(rng, (m, k)), _arr(rng, (k, n))
    y = jax.jit(functools.partial(amx_matmul.matmul, a_t=a_t, b_t=b_t))(a.T if a_t else a, b.T if b_t else b)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert _err(y, np.asarray(a, np.float64) @ np.asarray(b, np.float64)) <= TOL


@amx
def test_bf16_output_is_the_rounded_f32_product(kernel):
    """out_dtype=bf16 equals the f32 product rounded to nearest even (what XLA's convert does), bit for bit."""
    rng = np.random.default_rng(5)
    a, b = _arr(rng, (96, 160)), _arr(rng, (160, 192))
    y32 = jax.jit(amx_matmul.matmul)(a, b)
    y16 = jax.jit(functools.partial(amx_matmul.matmul, out_dtype=jnp.bfloat16))(a, b)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(y16, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32)
    )


@amx
def test_kernel_is_a_custom_call_in_the_program(kernel):
    a, b = jnp.ones((64, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.bfloat16)
    text = jax.jit(amx_matmul.matmul).lower(a, b).as_text()
    assert amx_matmul.TARGET in text


SPECS = [  # the model's products (forward, and the backward ones layers.einsum forms from them); >= 64 rows
    ("btd,dhk->bthk", (4, 24, 64), (64, 4, 16)),
    ("bthk,hkd->btd", (4, 24, 4, 16), (4, 16, 64)),
    ("btd,df->btf", (4, 24, 64), (64, 96)),
    ("btd,vd->btv", (4, 24, 64), (300, 64)),
    ("btf,btd->fd", (4, 24, 96), (4, 24, 64)),  # a weight gradient: contracts the rows
    ("bthk,btd->dhk", (4, 24, 4, 16), (4, 24, 64)),  # output axes in another order than the product's
]


NO_COPY = {  # (a_t, b_t) each spec reaches the kernel with
    "btd,dhk->bthk": (False, False),
    "bthk,hkd->btd": (False, False),
    "btd,df->btf": (False, False),
    "btd,vd->btv": (False, True),
    "btf,btd->fd": (True, False),
    "bthk,btd->dhk": (True, False),  # operands swapped: c = ctᵀ·a
}


@pytest.mark.parametrize(("spec", "sa", "sb"), SPECS)
def test_einsum_mapping_matches_jnp(monkeypatch, spec, sa, sb):
    """The transpose/reshape onto [M,K]·[K,N] and back, with the kernel replaced by XLA's product of the same
    2-D operands (runs on any CPU): equal to jnp.einsum up to f32 summation order."""
    calls = []

    def reference(a, b, *, a_t, b_t, out_dtype):  # the kernel's contract, on XLA
        calls.append((a_t, b_t))
        a, b = a.T if a_t else a, b.T if b_t else b
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(out_dtype)

    monkeypatch.setattr(amx_matmul, "matmul", reference)
    rng = np.random.default_rng(len(spec))
    a, b = _arr(rng, sa), _arr(rng, sb)
    got = amx_matmul.einsum(spec, a, b)
    want = np.einsum(spec, np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert got is not None and got.shape == want.shape and got.dtype == jnp.float32
    assert _err(got, want) <= TOL
    assert calls == [NO_COPY[spec]]  # the stored layout goes to the kernel (no transposed copy)


def test_einsum_declines_what_it_does_not_take():
    a = jnp.ones((4, 24, 32), jnp.bfloat16)
    assert amx_matmul.plan("bqd,bkd->bqk") is None  # batch axis b in both operands and the output
    assert amx_matmul.plan("btd,d->bt") == ("bt", "d", "")
    assert amx_matmul.plan("btd,df->bf") is None  # t summed away in one operand
    assert amx_matmul.plan("...d,df->...f") is None
    assert amx_matmul.einsum("btd,df->btf", a.astype(jnp.float32), jnp.ones((32, 8), jnp.float32)) is None
    assert (
        amx_matmul.einsum("td,df->tf", a[0, :8], jnp.ones((32, 8), jnp.bfloat16)) is None
    )  # < MIN_ROWS rows


@amx
@pytest.mark.parametrize(("spec", "sa", "sb"), SPECS[:4])
def test_layers_einsum_gradients_on_the_kernel(kernel, spec, sa, sb):
    """Forward and both gradients of `layers.einsum` in bf16 run on the kernel (custom calls in the program)
    and agree with the same computation on XLA's dot within bf16 rounding of the outputs (2e-2 relative)."""
    rng = np.random.default_rng(3)
    a, b = _arr(rng, sa).astype(jnp.float32), _arr(rng, sb).astype(jnp.float32)
    w = _arr(rng, jnp.einsum(spec, a, b).shape).astype(jnp.float32)

    def loss(a, b):
        y = layers.einsum(spec, a, b, jnp.bfloat16).astype(jnp.float32)
        return jnp.sum(y * w), y  # compared element by element (the sum cancels: no scale for a tolerance)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    with jax.set_mesh(ONE_DEVICE):  # the tests' process has 8 CPU devices
        assert grad.lower(a, b).as_text().count(amx_matmul.TARGET_BF16) == 1  # forward, rounded in the kernel
        assert grad.lower(a, b).as_text().count("atlas_amx_matmul") == 3  # forward, ∂a, ∂b
        (_, got_y), got = grad(a, b)
    (_, want_y), want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(a, b)  # 8 devices
    assert _err(got_y, want_y) <= 1e-2
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _err(g, r) <= 2e-2


def test_off_uses_xla(no_kernel):
    with jax.set_mesh(ONE_DEVICE):
        assert not amx_matmul.available() and not amx_matmul.enabled()
        a, b = jnp.ones((64, 32), jnp.bfloat16), jnp.ones((32, 64), jnp.bfloat16)
        text = jax.jit(lambda a, b: layers._dot("td,df->tf", a, b, jnp.float32)).lower(a, b).as_text()
    assert amx_matmul.TARGET not in text


@amx
def test_a_mesh_of_several_devices_keeps_xla(kernel):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2), ("data",))
    with jax.set_mesh(mesh):
        assert not amx_matmul.enabled()
    with jax.set_mesh(ONE_DEVICE):
        assert amx_matmul.enabled()


def test_flag_parsing_and_cpu_detection(monkeypatch):
    assert amx_matmul.choice({}) == "auto"
    assert amx_matmul.choice({amx_matmul.ENV: " 1 "}) == "1"
    with pytest.raises(ValueError, match=amx_matmul.ENV):
        amx_matmul.choice({amx_matmul.ENV: "on"})
    full = "flags\t: fpu avx2 avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    assert amx_matmul.cpu_supports(full)
    assert not amx_matmul.cpu_supports(full.replace(" amx_bf16", ""))
    assert not amx_matmul.cpu_supports(None)
    # forced on a CPU without AMX: the error names what is missing
    monkeypatch.setenv(amx_matmul.ENV, "1")
    monkeypatch.setattr(amx_matmul, "read_cpuinfo", lambda: full.replace(" amx_tile", ""))
    amx_matmul.available.cache_clear()
    with pytest.raises(RuntimeError, match="amx_tile"):
        amx_matmul.available()
    monkeypatch.setenv(amx_matmul.ENV, "auto")
    amx_matmul.available.cache_clear()
    assert not amx_matmul.available()
    amx_matmul.available.cache_clear()


def test_forced_without_a_compiler_says_so(monkeypatch, tmp_path):
    from atlas_jax.kernels import build

    monkeypatch.setenv("CXX", "no-such-compiler-atlas")
    with pytest.raises(RuntimeError, match="no-such-compiler-atlas"):
        build.build(amx_matmul.SOURCE, amx_matmul.CXX_FLAGS, tmp_path / "k.so", amx_matmul.ENV)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_kernel_builds(tmp_path):
    """The source compiles with this machine's g++ (any x86 CPU: building needs no AMX) into the cache name."""
    from atlas_jax.kernels import build

    out = amx_matmul.library_path(tmp_path)
    assert (
        build.build(amx_matmul.SOURCE, amx_matmul.CXX_FLAGS, out, amx_matmul.ENV) == out
        and out.stat().st_size
    )


@amx
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_decoder_trains_the_same_on_the_kernel(kernel, model_type):
    """A tiny bf16-compute decoder (fp32 master weights; scanned layers; Qwen2 with qkv bias and tied table,
    Qwen3 with q/k norms and an lm_head): loss and every parameter gradient with the kernel (one-device mesh)
    vs XLA's dot (8 devices, no mesh), within bf16 rounding (loss 1e-2, gradients 5e-2 of each leaf's max)."""
    from flax import nnx

    from atlas_jax.models.config import ModelConfig
    from atlas_jax.models.params import build_model

    qwen3 = model_type == "qwen3"
    cfg = ModelConfig(
        model_type=model_type, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=not qwen3,
        qkv_bias=not qwen3, qk_norm=qwen3, dtype="bfloat16", param_dtype="float32",
    )  # fmt: skip
    graphdef, state = nnx.split(build_model(cfg, seed=1))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 32)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), ids.shape)
    mask = jnp.ones_like(ids)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(ids, positions, mask)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    with jax.set_mesh(ONE_DEVICE):
        assert amx_matmul.TARGET in step.lower(state).as_text()
        got_loss, got = step(state)
    want_loss, want = jax.jit(jax.value_and_grad(loss))(state)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-2 * abs(float(want_loss))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _err(g, r) <= 5e-2


@amx
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 64), (16, 896, 300), (64, 512, 1408), (70, 33, 130)])
@pytest.mark.parametrize("contract", [1, 2])
def test_packed_weights_match_a_float64_product(kernel, m, k, n, contract):
    """The sampler's AMX layout (`cpu_matmul.pack(..., amx=True)`: K padded to 32): `cpu_matmul.matmul` on it
    (decode row counts 1-70) against float64, and `unpack`/`columns` read the same weight back."""
    from atlas_jax.kernels import cpu_matmul

    rng = np.random.default_rng(m + k + n + contract)
    shape = (k, n) if contract == 1 else (k // 16 if k % 16 == 0 else k, 16 if k % 16 == 0 else 1, n)
    w = _arr(rng, shape)
    x = _arr(rng, (m, *shape[:contract]))
    p = cpu_matmul.pack(w, contract, jnp.bfloat16, amx=True)
    assert p.amx and p.wp.shape == cpu_matmul.packed_shape(k, n, jnp.bfloat16, amx=True)
    assert p.wp.shape[1] % 16 == 0
    y = jax.jit(cpu_matmul.matmul)(x, p)
    ref = np.asarray(x, np.float64).reshape(m, k) @ np.asarray(w, np.float64).reshape(k, n)
    assert y.shape == (m, *shape[contract:]) and _err(y.reshape(m, n), ref) <= TOL
    np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack(p), np.float32), np.asarray(w, np.float32))
    if contract == 1:
        ids = jnp.asarray([0, n - 1, n // 2], jnp.int32)
        np.testing.assert_array_equal(np.asarray(cpu_matmul.columns(p, ids)), np.asarray(w[:, ids].T))


def test_amx_packing_needs_bf16():
    from atlas_jax.kernels import cpu_matmul

    with pytest.raises(ValueError, match="bfloat16"):
        cpu_matmul.pack(jnp.ones((64, 64)), 1, jnp.float32, amx=True)
