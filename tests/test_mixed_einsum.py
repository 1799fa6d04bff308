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
