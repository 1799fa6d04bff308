"""Issue-13 GRPO options as pure functions: reward scaling, GSPO ratios, rollout correction, over-long
handling, dynamic sampling, their config checks, and the learner batch they produce (hand-derived numbers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.training import advantages as adv_lib
from atlas_jax.training import dynamic_sampling, losses, overlong, rollout_correction
from atlas_jax.training.grpo_options import option_errors
from configs.base import get_config

# Group 0: one correct teaching among four (σ = √3/4); group 1: the same Δ everywhere, rewards differ
# only by a 0.02 efficiency term (σ = 0.02·√3/4 ≈ 0.00866).
R = np.array([[1.0, 0.0, 0.0, 0.0], [0.50, 0.50, 0.50, 0.52]], np.float32)


def test_group_scaling_blows_up_an_efficiency_only_spread_and_the_floor_stops_it():
    s3 = math.sqrt(3)
    a = np.asarray(adv_lib.group_advantages(R, "grpo", eps=0.0))
    np.testing.assert_allclose(a[0], [s3, -1 / s3, -1 / s3, -1 / s3], rtol=1e-5)
    np.testing.assert_allclose(a[1], [-1 / s3, -1 / s3, -1 / s3, s3], rtol=1e-3)  # ±1-sized, like group 0
    f = np.asarray(adv_lib.group_advantages(R, "grpo", eps=0.0, std_floor=0.1))
    np.testing.assert_allclose(f[0], a[0], rtol=1e-6)  # σ = 0.433 > floor: unchanged
    np.testing.assert_allclose(f[1], [-0.05, -0.05, -0.05, 0.15], atol=1e-6)  # (r − 0.505) / 0.1


def test_batch_and_no_scaling_hand_values():
    sigma_b = float(np.sqrt(np.mean((R - R.mean()) ** 2)))  # std of all 8 rewards (population)
    b = np.asarray(adv_lib.group_advantages(R, "grpo", eps=0.0, scale="batch"))
    np.testing.assert_allclose(b[0], (R[0] - 0.25) / sigma_b, rtol=1e-5)
    np.testing.assert_allclose(b[1], (R[1] - 0.505) / sigma_b, rtol=1e-4, atol=1e-6)
    n = np.asarray(adv_lib.group_advantages(R, "grpo", scale="none"))
    np.testing.assert_allclose(n, R - R.mean(axis=1, keepdims=True), atol=1e-7)
    np.testing.assert_allclose(n, adv_lib.group_advantages(R, "drgrpo"), atol=1e-7)
    with pytest.raises(ValueError, match="scale_rewards"):
        adv_lib.group_advantages(R, "grpo", scale="global")


def test_scaling_invariances():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    shift = np.array([[1.0], [-2.0], [5.0]], np.float32)
    g = adv_lib.group_advantages(r, "grpo", eps=0.0)
    # group: per-group shifts and a common positive scale change nothing
    np.testing.assert_allclose(adv_lib.group_advantages(3 * r + shift, "grpo", eps=0.0), g, atol=2e-5)
    # batch: a common positive scale changes nothing, but a per-group scale does (one σ for all groups)
    bt = adv_lib.group_advantages(r, "grpo", eps=0.0, scale="batch")
    np.testing.assert_allclose(adv_lib.group_advantages(3 * r, "grpo", eps=0.0, scale="batch"), bt, atol=2e-5)
    r2 = r * np.array([[1.0], [10.0], [1.0]], np.float32)
    assert not np.allclose(adv_lib.group_advantages(r2, "grpo", eps=0.0, scale="batch")[0], bt[0], atol=1e-3)


def _seq_case():
    old = jnp.log(jnp.array([[0.5, 0.2, 0.3]]))
    logp = old + jnp.array([[0.2, -0.1, 0.7]])  # the third token is padding
    mask = jnp.array([[1.0, 1.0, 0.0]])
    return logp, old, mask


def test_sequence_ratio_hand_values_and_whole_sequence_clipping():
    logp, old, mask = _seq_case()
    s = math.exp((0.2 - 0.1) / 2)  # length-normalised: exp(mean over the 2 real tokens) = 1.05127
    loss, clipped = losses.clipped_surrogate(
        logp, old, jnp.array([1.0]), 3e-4, 4e-4, level="sequence", mask=mask
    )
    np.testing.assert_allclose(loss[0, :2], [-(1 + 4e-4)] * 2, rtol=1e-6)  # A > 0, s > 1 + ε_h
    assert clipped[0, :2].tolist() == [1.0, 1.0]
    loss, clipped = losses.clipped_surrogate(
        logp, old, jnp.array([-1.0]), 3e-4, 4e-4, level="sequence", mask=mask
    )
    np.testing.assert_allclose(loss[0, :2], [s, s], rtol=1e-5)  # pessimistic branch, not clipped
    assert clipped[0, :2].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="mask"):
        losses.clipped_surrogate(logp, old, jnp.array([1.0]), 0.2, 0.2, level="sequence")
    with pytest.raises(ValueError, match="ratio_level"):
        losses.clipped_surrogate(logp, old, jnp.array([1.0]), 0.2, 0.2, level="word", mask=mask)


def test_sequence_ratio_gradient_is_s_times_the_mean_token_gradient():
    logp, old, mask = _seq_case()
    s = math.exp(0.05)

    def f(lp):
        per_token, _ = losses.clipped_surrogate(
            lp, old, jnp.array([-1.0]), 1.0, 1.0, level="sequence", mask=mask
        )
        return losses.aggregate(per_token, mask, "seq_mean_token_mean", 3)[0]

    # ℓ = −s·A with A = −1: ∂ℓ/∂logp_t = s / n on real tokens, 0 on padding
    np.testing.assert_allclose(jax.grad(f)(logp)[0], [s / 2, s / 2, 0.0], rtol=1e-5)


def test_token_and_sequence_ratios_agree_on_policy_with_sequence_mean():
    # μ = 1: old = stop_gradient(logp), every ratio is 1; with seq_mean_token_mean both give −A·Σ∇logp/n.
    rng = np.random.default_rng(1)
    logp = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (3, 4))), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    adv = jnp.array([0.7, -1.2, 0.4])

    def f(lp, level):
        s, d, _ = losses.grpo_loss(
            lp, jax.lax.stop_gradient(lp), None, adv, mask, epsilon_low=3e-4, epsilon_high=4e-4, beta=0.0,
            aggregation="seq_mean_token_mean", constant_length=4, ratio_level=level,
        )  # fmt: skip
        return s / d

    np.testing.assert_allclose(jax.grad(f)(logp, "token"), jax.grad(f)(logp, "sequence"), atol=1e-6)


D = jnp.log(jnp.array([[3.0, 0.25, 1.5, 1.0]]))  # trainer − sampler log-ratios; the last token is padding
M = jnp.array([[1.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "level", "expected"),
    [
        ("tis", "token", [2.0, 0.25, 1.5, 0.0]),  # min(ρ, C = 2)
        ("mis", "token", [0.0, 0.0, 1.0, 0.0]),  # ρ ∈ [1/2, 2] only for 1.5
        ("tis", "sequence", [1.125 ** (1 / 3)] * 3 + [0.0]),  # geometric mean of 3 · 0.25 · 1.5 = 1.125
        ("mis", "sequence", [1.0, 1.0, 1.0, 0.0]),
        ("none", "token", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_rollout_correction_weights_hand_values(mode, level, expected):
    w, sums = rollout_correction.correction_weights(
        D, jnp.zeros_like(D), M, mode=mode, level=level, threshold=2.0
    )
    np.testing.assert_allclose(w[0], expected, rtol=1e-5)
    if mode == "mis" and level == "token":
        assert float(sums["rc_masked"]) == 2.0 and float(sums["rc_truncated"]) == 1.0


def test_rollout_correction_scales_only_the_policy_gradient_term():
    logp = jnp.log(jnp.array([[0.5, 0.2, 0.3, 0.4]]))
    old = logp
    w, _ = rollout_correction.correction_weights(logp + D, logp, M, mode="tis", level="token", threshold=2.0)
    kw = dict(epsilon_low=0.2, epsilon_high=0.2, beta=0.0, aggregation="token_mean", constant_length=4)
    plain, d0, _ = losses.grpo_loss(logp, old, None, jnp.array([1.0]), M, **kw)
    weighted, d1, _ = losses.grpo_loss(logp, old, None, jnp.array([1.0]), M, weights=w, **kw)
    # ratio 1, A = 1: ℓ_t = −1 per token; weighted: −(2 + 0.25 + 1.5) over the same 3 tokens
    assert float(plain) == pytest.approx(-3.0) and float(weighted) == pytest.approx(-3.75)
    assert float(d0) == float(d1) == 3.0
    with pytest.raises(ValueError, match="threshold"):
        rollout_correction.correction_weights(D, D, M, mode="tis", level="token", threshold=1.0)
    with pytest.raises(ValueError, match="rollout_correction"):
        rollout_correction.correction_weights(D, D, M, mode="ppo", level="token", threshold=2.0)


def test_soft_overlong_penalty_hand_values():
    np.testing.assert_allclose(
        overlong.soft_overlong_penalty([10, 24, 28, 32], 32, 8, 1.0), [0, 0, -0.5, -1.0]
    )
    np.testing.assert_allclose(overlong.soft_overlong_penalty([30], 32, 4, 0.5), [-0.25])  # 2 of 4 · 0.5
    np.testing.assert_allclose(overlong.soft_overlong_penalty([32], 32, 0, 1.0), [0.0])
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong.soft_overlong_penalty([1], 32, 40, 1.0)


def test_dynamic_sampling_selection_and_stats():
    r = np.array([[0.2, 0.2, 0.2], [0.0, 0.5, 0.0], [1.0, 1.0 + 1e-9, 1.0], [0.3, 0.1, 0.3]])
    info = dynamic_sampling.informative_groups(r, 1e-6)
    assert info.tolist() == [False, True, False, True]  # the 1e-9 spread is within ε
    assert dynamic_sampling.informative_groups(r, 0.0).tolist() == [False, True, True, True]
    kept = dynamic_sampling.select([], info, 0, 3)
    assert kept == [1, 3]
    kept = dynamic_sampling.select(kept, np.array([True, True, True, False]), 4, 3)
    assert kept == [1, 3, 4]  # offset of the second round; stops at the target
    st = dynamic_sampling.stats(num_generated=8, num_informative=5, num_kept=3, rounds=2, target=4)
    assert st == {
        "dynamic/kept_fraction": 5 / 8, "dynamic/rounds": 2.0, "dynamic/extra_groups": 4.0,
        "dynamic/groups_kept": 3.0, "dynamic/target_met": 0.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="dynamic_sampling_eps"):
        dynamic_sampling.informative_groups(r, -1.0)


def test_option_errors_name_their_flags():
    g = get_config().grpo
    assert option_errors(g, 32) == []
    g.scale_rewards, g.ratio_level, g.rollout_correction = "global", "word", "ppo"
    g.max_staleness, g.dynamic_sampling_max_rounds, g.overlong_buffer, g.std_floor = -1, 0, 64, -0.1
    text = "\n".join(option_errors(g, 32))
    for flag in ("scale_rewards", "ratio_level", "rollout_correction=", "max_staleness", "dynamic_sampling_max_rounds",
                 "overlong_buffer", "std_floor"):  # fmt: skip
        assert f"--config.grpo.{flag}" in text, (flag, text)
    g2 = get_config().grpo
    g2.rollout_correction, g2.rollout_correction_threshold = "tis", 0.5
    assert any("rollout_correction_threshold" in x for x in option_errors(g2, 32))
