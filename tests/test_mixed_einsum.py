"""The mixed-precision einsum of the decoder layers: values and gradients, and a backward pass in the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.models.layers import einsum


def _reference(spec, dtype):
    def f(a, b):
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32).astype(
            dtype
        )

    return f


@pytest.mark.parametrize("spec", ["btd,df->btf", "btd,dkh->btkh", "btnh,nhd->btd"])
def test_gradients_match_jax_transpose(spec):
    """f32: identical to JAX's own VJP; bf16: within bf16 rounding of it (the cotangent is rounded to bf16)."""
    sa, sb = spec.split("->")[0].split(",")
    sizes = dict(b=2, t=3, d=8, f=6, k=2, h=4, n=3)
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(keys[0], [sizes[c] for c in sa])
    b = jax.random.normal(keys[1], [sizes[c] for c in sb])
    ct = jax.random.normal(keys[2], [sizes[c] for c in spec.split("->")[1]])
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        out, vjp = jax.vjp(lambda x, y, dt=dtype: einsum(spec, x, y, dt), a, b)
        ref_out, ref_vjp = jax.vjp(_reference(spec, dtype), a, b)
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
        for g, r, x in zip(vjp(ct.astype(dtype)), ref_vjp(ct.astype(dtype)), (a, b), strict=True):
            assert g.dtype == x.dtype
            np.testing.assert_allclose(g, r, atol=tol * float(jnp.abs(r).max()), rtol=0)


def test_backward_products_take_compute_dtype_operands():
    """Every dot of the bf16 gradient reads bf16 operands (JAX's transpose read an f32 cotangent: f32 matmuls)."""
    a, b = jnp.ones((4, 8), jnp.float32), jnp.ones((8, 6), jnp.float32)
    loss = lambda x, y: einsum("td,df->tf", x, y, jnp.bfloat16).astype(jnp.float32).sum()  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # forward + two backward products
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), [
        [v.aval.dtype for v in e.invars] for e in dots
    ]


def _equations(jaxpr):
    """Equations of ``jaxpr`` and of the jaxprs nested in its equations' params (custom_vjp, pjit)."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                yield from _equations(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_qwen3_untied"])
def test_unembedding_logits_are_f32_and_its_gradient_products_bf16(preset):
    """The logits come out in float32 from bf16 operands, and the gradient's products read bf16 operands too
    (the logits' cotangent rounded to bf16, as in every other product) — tied and untied heads."""
    from atlas_jax.models import build_model
    from atlas_jax.models.presets import get_preset
    from atlas_jax.training import train_step

    cfg = get_preset(preset).replace(num_layers=1, dtype="bfloat16", scan_layers=False)
    graphdef, params, rest = train_step.split_model(build_model(cfg, seed=0))
    h = jax.random.normal(jax.random.key(1), (2, 3, cfg.hidden_size))

    def loss(p, h):
        logits = train_step.merge_model(graphdef, p, rest).unembed(h)
        assert logits.dtype == jnp.float32
        return jax.nn.logsumexp(logits, -1).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, h)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3, len(dots)
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), [
        [v.aval.dtype for v in e.invars] for e in dots
    ]
    g_h = jax.grad(loss, argnums=1)(params, h)
    want = jax.grad(
        lambda h: jax.nn.logsumexp(
            jnp.einsum(
                "btd,vd->btv" if cfg.tie_word_embeddings else "btd,dv->btv",
                h.astype(jnp.float32),
                (params["embed/embedding"] if cfg.tie_word_embeddings else params["lm_head/kernel"])
                .astype(jnp.bfloat16)
                .astype(jnp.float32),
            ),
            -1,
        ).sum()
    )(h)
    np.testing.assert_allclose(g_h, want, atol=2e-2 * float(jnp.abs(want).max()), rtol=0)
