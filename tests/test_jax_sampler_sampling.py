"""Pure sampling strategies (atlas_jax/engines/sampling.py) on crafted distributions.

Expected values come from numpy (sort-based nucleus, log-softmax) or from hand-made weights, never
from the code under test. A grid of evenly spaced uniforms turns the sampler into a deterministic
quantile function, so frequencies can be checked exactly (to within 1/grid size).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.engines.sampling import Candidates, Strategy, Temperature, TopK, TopP, draw

GRID = 4000


def _grid_draw(weights: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Draws GRID tokens from one weight row at u = (i + 0.5) / GRID."""
    w = jnp.asarray(np.tile(weights[None], (GRID, 1)), jnp.float32)
    i = None if ids is None else jnp.asarray(np.tile(ids[None], (GRID, 1)))
    u = jnp.asarray((np.arange(GRID) + 0.5) / GRID, jnp.float32)
    return np.asarray(jax.jit(draw)(Candidates(w, i), u))


@pytest.mark.parametrize("vocab", [7, 1000, 3001])  # flat and two-level (blocked, padded) cumsum
def test_draw_frequencies_match_weights_and_skip_zero_weights(vocab):
    rng = np.random.default_rng(vocab)
    w = np.zeros(vocab)
    # The last index stays 0 so that the clamp-to-last-positive path is exercised.
    allowed = rng.choice(vocab - 1, size=min(5, vocab - 2), replace=False)
    w[allowed] = rng.uniform(0.5, 3.0, size=allowed.size)
    tokens = _grid_draw(w)
    assert set(tokens.tolist()) == set(allowed.tolist())
    freq = np.bincount(tokens, minlength=vocab) / GRID
    np.testing.assert_allclose(freq, w / w.sum(), atol=2.0 / GRID)


def test_draw_maps_candidate_ids():
    tokens = _grid_draw(np.array([1.0, 0.0, 3.0]), ids=np.array([11, 22, 33]))
    assert set(tokens.tolist()) == {11, 33}
    assert abs(np.mean(tokens == 33) - 0.75) < 2.0 / GRID


def _crafted_logits(vocab: int = 2000, seed: int = 0) -> np.ndarray:
    """Three dominant tokens (0.45, 0.25, 0.10) at scattered ids, 0.2 spread unevenly over the rest."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.1, 1.0, size=vocab)
    top = np.array([1234, 17, 999])
    rest = np.setdiff1d(np.arange(vocab), top)
    p[rest] *= 0.2 / p[rest].sum()
    p[top] = [0.45, 0.25, 0.10]
    return np.log(p)


def _numpy_nucleus(logits: np.ndarray, p: float) -> set[int]:
    """Reference: sort descending, keep while the mass strictly before the token is < p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    return set(order[before < p].tolist())


@pytest.mark.parametrize("fast_k", [64, 1])  # fast top-k path and exact bisection fallback
@pytest.mark.parametrize("p", [0.6, 0.85, 0.999])
def test_top_p_keeps_exactly_the_nucleus(p, fast_k):
    logits = _crafted_logits()
    w = jnp.exp(jnp.asarray(logits[None], jnp.float32) - logits.max())
    kept = TopP(p, fast_k=fast_k).apply(Candidates(w, None))
    got = set(np.nonzero(np.asarray(kept.weights[0]) > 0)[0].tolist())
    want = _numpy_nucleus(logits, p)
    if p == 0.6:
        assert want == {1234, 17}  # hand-derived: 0.45 < 0.6 before 17, 0.70 >= 0.6 before 999
    assert got == want


@pytest.mark.parametrize(
    ("top_k", "top_p", "allowed"),
    [
        (2, 1.0, {1234, 17}),
        (0, 0.6, {1234, 17}),
        (3, 0.6, {1234, 17}),
        (1, 1.0, {1234}),
        (3, 1.0, {1234, 17, 999}),
    ],
)
def test_truncated_sampling_never_leaves_the_allowed_set(top_k, top_p, allowed):
    logits = _crafted_logits()
    strategy = Strategy.from_params(temperature=1.0, top_p=top_p, top_k=top_k)
    x = jnp.asarray(np.tile(logits[None], (GRID, 1)), jnp.float32)
    u = jnp.asarray((np.arange(GRID) + 0.5) / GRID, jnp.float32)
    tokens, logprobs = jax.jit(strategy.sample)(x, u)
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) == allowed
    # Frequencies follow the renormalised truncated distribution.
    probs = np.exp(logits) / np.exp(logits).sum()
    mass = sum(probs[t] for t in allowed)
    for t in allowed:
        assert abs(np.mean(tokens == t) - probs[t] / mass) < 2.0 / GRID
    # Log-probs are taken before truncation (engine convention).
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs[tokens]), atol=1e-5)


def test_temperature_scales_distribution_and_logprobs():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5])
    t = 0.5
    strategy = Strategy.from_params(temperature=t, top_p=1.0, top_k=0)
    x = jnp.asarray(np.tile(logits[None], (GRID, 1)), jnp.float32)
    u = jnp.asarray((np.arange(GRID) + 0.5) / GRID, jnp.float32)
    tokens, logprobs = strategy.sample(x, u)
    tokens = np.asarray(tokens)
    ref = np.exp(logits / t) / np.exp(logits / t).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=5) / GRID, ref, atol=2.0 / GRID)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(ref[tokens]), atol=1e-6)


def test_greedy_picks_first_argmax_with_untempered_logprob():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[2, [7, 30]] = 9.0  # tie: the first index wins, as in np.argmax
    strategy = Strategy.from_params(temperature=0.0, top_p=0.5, top_k=3)
    assert strategy == Strategy()  # greedy ignores truncation
    tokens, logprobs = strategy.sample(jnp.asarray(logits), jnp.zeros(6))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(logprobs), ref[np.arange(6), logits.argmax(-1)], atol=1e-5)


def test_strategies_are_hashable_static_values():
    a = Strategy.from_params(temperature=0.7, top_p=0.9, top_k=20)
    b = Strategy(Temperature(0.7), TopK(20), TopP(0.9))
    assert a == b and hash(a) == hash(b)
    assert Strategy.from_params(1.0, 1.0, 0) == Strategy(Temperature(1.0))
