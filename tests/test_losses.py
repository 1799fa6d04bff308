"""GRPO/SFT losses and advantages against hand-derived numbers and a plain-numpy loop reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.training import advantages as adv_lib
from atlas_jax.training import losses


def _np_reference(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, mode, length):
    """Loop-by-loop numpy reference of the GRPO loss (independent of the vectorised code)."""
    b, c = logp.shape
    seq_terms, total, tokens, seqs = [], 0.0, 0.0, 0
    for i in range(b):
        row = 0.0
        n = 0
        for t in range(c):
            if mask[i, t] == 0:
                continue
            ratio = math.exp(logp[i, t] - old[i, t])
            clipped_ratio = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
            term = -min(ratio * adv[i], clipped_ratio * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                term += beta * (math.exp(d) - d - 1)
            row += term
            n += 1
        if n:
            seqs += 1
            seq_terms.append(row / n)
        total += row
        tokens += n
    if mode == "seq_mean_token_mean":
        return sum(seq_terms) / seqs
    if mode == "token_mean":
        return total / tokens
    return total / length / seqs


def _random_batch(seed=0, b=5, c=7):
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 0.95, (b, c)))
    logp = old + rng.normal(0, 0.4, (b, c))  # ratios well outside [0.8, 1.2] on both sides
    ref = old + rng.normal(0, 0.3, (b, c))
    adv = rng.normal(0, 1, b)
    lengths = [7, 3, 0, 5, 1]  # includes an empty (padding) row
    mask = np.array([[1.0 if t < n else 0.0 for t in range(c)] for n in lengths])
    return logp, old, ref, adv, mask


def test_clipped_surrogate_hand_values_both_sides():
    ratios = np.array([[1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = np.array([1.0])
    old = np.zeros_like(ratios)
    per_token_pos, clipped_pos = losses.clipped_surrogate(jnp.log(ratios), old, adv, 0.2, 0.2)
    # A > 0: min(ρA, clip(ρ)A): 1.5 -> 1.2 (clipped), 0.5 -> 0.5 (not clipped: pessimistic branch), 1.1 -> 1.1.
    np.testing.assert_allclose(per_token_pos[0], [-1.2, -0.5, -0.5, -1.2, -1.1], rtol=1e-6)
    np.testing.assert_array_equal(clipped_pos[0], [1, 0, 0, 1, 0])
    per_token_neg, clipped_neg = losses.clipped_surrogate(jnp.log(ratios), old, -adv, 0.2, 0.3)
    # A < 0: ρ=1.5 -> -1.5 chosen (unclipped), ρ=0.5 -> clip at 1-0.2=0.8 -> 0.8.
    np.testing.assert_allclose(per_token_neg[0], [1.5, 0.8, 0.8, 1.5, 1.1], rtol=1e-6)
    np.testing.assert_array_equal(clipped_neg[0], [0, 1, 1, 0, 0])


def test_asymmetric_clip_uses_epsilon_high_only_above():
    logp = jnp.log(jnp.array([[1.25, 1.35]]))
    per_token, clipped = losses.clipped_surrogate(logp, jnp.zeros((1, 2)), jnp.array([2.0]), 0.2, 0.28)
    np.testing.assert_allclose(per_token[0], [-2.5, -2.56], rtol=1e-6)
    np.testing.assert_array_equal(clipped[0], [0, 1])


def test_clipped_tokens_have_zero_gradient():
    old = jnp.zeros((1, 3))
    adv = jnp.array([1.0])

    def f(logp):
        return losses.clipped_surrogate(logp, old, adv, 0.2, 0.2)[0].sum()

    grad = jax.grad(f)(jnp.log(jnp.array([[1.5, 1.0, 0.5]])))
    # d(−ρA)/dlogp = −ρA where unclipped; 0 where clipped.
    np.testing.assert_allclose(grad[0], [0.0, -1.0, -0.5], rtol=1e-6)


def test_k3_hand_value_and_zero_at_equality():
    kl = losses.k3_kl(jnp.log(jnp.array([0.5, 0.3])), jnp.log(jnp.array([0.25, 0.3])))
    expected = 0.5 - math.log(0.5) - 1.0  # d = log(0.25/0.5)
    np.testing.assert_allclose(kl, [expected, 0.0], atol=1e-7)
    assert expected > 0.19


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "constant_length"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_loss_matches_numpy_reference(mode, beta):
    logp, old, ref, adv, mask = _random_batch()
    loss_sum, denom, sums = losses.grpo_loss(
        jnp.asarray(logp, jnp.float32),
        jnp.asarray(old, jnp.float32),
        jnp.asarray(ref, jnp.float32),
        jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask, jnp.float32),
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        aggregation=mode,
        constant_length=11,
    )
    expected = _np_reference(logp, old, ref, adv, mask, 0.2, 0.28, beta, mode, 11)
    np.testing.assert_allclose(float(loss_sum / denom), expected, rtol=1e-5)
    assert float(sums["tokens"]) == 16.0
    assert (float(sums["kl"]) > 0) == (beta > 0)


def test_aggregation_denominators():
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ones = jnp.ones_like(mask)
    assert [float(x) for x in losses.aggregate(ones, mask, "token_mean", 5)] == [3.0, 3.0]
    assert [float(x) for x in losses.aggregate(ones, mask, "seq_mean_token_mean", 5)] == [2.0, 2.0]
    np.testing.assert_allclose(
        [float(x) for x in losses.aggregate(ones, mask, "constant_length", 5)], [0.6, 2.0]
    )
    with pytest.raises(ValueError, match="loss_aggregation"):
        losses.aggregate(ones, mask, "mean_of_everything", 5)


def test_beta_zero_ignores_reference_entirely():
    logp, old, ref, adv, mask = (jnp.asarray(x, jnp.float32) for x in _random_batch(1))
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.0, aggregation="token_mean", constant_length=7)
    with_none = losses.grpo_loss(logp, old, None, adv, mask, **kw)
    with_nan_ref = losses.grpo_loss(logp, old, jnp.full_like(ref, jnp.nan), adv, mask, **kw)
    assert float(with_none[0]) == float(with_nan_ref[0])
    assert math.isfinite(float(with_none[0]))
    assert float(with_none[2]["kl"]) == 0.0


def test_ratio_one_gradient_is_policy_gradient():
    """At ρ = 1 (μ = 1, old = stop_gradient(logp)) the gradient is −A·m/denominator per token."""
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = jnp.array([0.5, -2.0])
    logp0 = jnp.log(jnp.array([[0.3, 0.6, 0.9], [0.2, 0.4, 0.1]]))

    def f(logp):
        s, d, _ = losses.grpo_loss(
            logp,
            jax.lax.stop_gradient(logp),
            None,
            adv,
            mask,
            epsilon_low=0.2,
            epsilon_high=0.2,
            beta=0.0,
            aggregation="token_mean",
            constant_length=3,
        )
        return s / d

    np.testing.assert_allclose(jax.grad(f)(logp0), [[-0.5 / 3, -0.5 / 3, 0], [2.0 / 3, 0, 0]], rtol=1e-6)


def test_sft_loss():
    logp = jnp.log(jnp.array([[0.5, 0.25, 0.9]]))
    s, d = losses.sft_loss(logp, jnp.array([[0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(float(s / d), -(math.log(0.25) + math.log(0.9)) / 2, rtol=1e-6)


def test_group_advantages_modes():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    grpo = adv_lib.group_advantages(r, "grpo", eps=0.0 + 1e-6)
    np.testing.assert_allclose(grpo[0], [1, -1, -1, 1], rtol=1e-5)  # mean 0.5, std 0.5
    np.testing.assert_array_equal(grpo[1], [0, 0, 0, 0])
    np.testing.assert_allclose(adv_lib.group_advantages(r, "drgrpo")[0], [0.5, -0.5, -0.5, 0.5])
    # leave-one-out: 1 - mean(0,0,1) = 2/3; 0 - mean(1,0,1) = -2/3.
    np.testing.assert_allclose(
        adv_lib.group_advantages(r, "rloo")[0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"grpo\.advantage"):
        adv_lib.group_advantages(r, "ppo")
    with pytest.raises(ValueError, match="num_generations"):
        adv_lib.group_advantages(r[:, :1], "rloo")
