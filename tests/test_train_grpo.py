"""GRPO on a tiny real decoder with the real JAX sampler: a reward preferring one token is learned."""

import jax
import ml_collections
import numpy as np
import pytest

from atlas_jax.engines.base import SamplingParams
from atlas_jax.engines.jax_sampler import JaxSampler
from atlas_jax.models.config import ModelConfig
from atlas_jax.training import train_step
from atlas_jax.training.grpo import GRPOLearner, GRPOSpec
from atlas_jax.training.runtime import make_policy
from configs.base import get_config

TARGET = 7
VOCAB = 53


def _config(tmp_path, **grpo) -> ml_collections.ConfigDict:
    c = get_config()
    c.output_dir = str(tmp_path)
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.mesh.shape = (1, -1, 1)
    c.optim.max_grad_norm = 1.0
    c.checkpoint.async_save = False
    for k, v in grpo.items():
        c.grpo[k] = v
    return c


TINY = ModelConfig(
    model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=32, qk_norm=True, tie_word_embeddings=True, eos_token_id=VOCAB - 1,
)  # fmt: skip


def _run(config, steps, completion_len=6, stop=None):
    policy = make_policy(
        config, learning_rate=float(config.grpo.learning_rate), total_steps=steps * int(config.grpo.num_iterations),
        extra_init=GRPOLearner.extra_init(float(config.grpo.beta)), model_cfg=TINY,
    )  # fmt: skip
    config.protocol.max_teaching_tokens = completion_len
    learner = GRPOLearner(policy, GRPOSpec.from_config(config))
    engine = JaxSampler(train_step.merge_model(policy.graphdef, policy.params, policy.rest), mesh=policy.mesh)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, VOCAB - 1, 5)) for _ in range(int(config.grpo.problems_per_step))]
    g = int(config.grpo.num_generations)
    rewards_per_step, metrics = [], []
    for step in range(policy.start_step, stop or steps):
        engine.update_weights(policy.params)  # on-policy: the new weights reach the sampler first
        sp = SamplingParams(temperature=float(config.grpo.temperature), max_tokens=completion_len, seed=step)
        out = engine.generate(prompts, sp, n=g)
        comps = [c for group in out for c in group]
        rewards = np.array(
            [[np.mean(np.array(c.token_ids) == TARGET) for c in grp] for grp in out], np.float32
        )
        batch = learner.build_batch(
            [c.prompt_ids for c in comps], [c.token_ids for c in comps], [c.logprobs for c in comps], rewards
        )
        metrics.append(jax.device_get(learner.update(batch, step)))
        rewards_per_step.append(float(rewards.mean()))
        policy.save(step + 1, data_position={"step": step + 1}, extra=policy.extra)
    policy.ckpt.wait()
    return rewards_per_step, metrics, policy


@pytest.mark.slow
def test_grpo_raises_reward_for_a_preferred_token(tmp_path):
    config = _config(
        tmp_path, learning_rate=3e-2, problems_per_step=4, num_generations=8, micro_batch_size=16,
        temperature=1.0, beta=0.0, num_iterations=1,
    )  # fmt: skip
    rewards, metrics, _ = _run(config, steps=8)
    first, last = np.mean(rewards[:2]), np.mean(rewards[-2:])
    print("mean reward per step:", [round(r, 3) for r in rewards])
    assert last > first + 0.2, rewards  # from ~1/53 per token to a large fraction of the tokens
    # μ = 1: the first update runs at the sampler's weights, so trainer and sampler log-probs agree.
    for m in metrics:
        assert float(m["logprob_mismatch_abs"]) < 1e-4, m
        assert np.isfinite(float(m["loss"])) and float(m["kl"]) == 0.0


@pytest.mark.slow
def test_grpo_multiple_iterations_clip_and_kl(tmp_path):
    config = _config(
        tmp_path, learning_rate=3e-2, problems_per_step=2, num_generations=4, micro_batch_size=4,
        temperature=1.0, beta=0.1, num_iterations=3, epsilon_low=0.05, epsilon_high=0.05,
        ref_update="ema", ref_sync_steps=1, ref_alpha=0.5,
    )  # fmt: skip
    _, metrics, policy = _run(config, steps=3)
    assert int(policy.state.step) == 9  # 3 batches × μ = 3 updates
    assert any(float(m["clip_frac"]) > 0 for m in metrics)  # later iterations move past ±5 %
    assert any(float(m["kl"]) > 0 for m in metrics)
    ref, params = jax.device_get(policy.extra["ref_params"]), jax.device_get(policy.params)
    assert not np.array_equal(ref["embed/embedding"], params["embed/embedding"])


@pytest.mark.slow
def test_grpo_resume_restores_params_optimizer_and_ema_reference(tmp_path):
    kw = dict(
        learning_rate=1e-2, problems_per_step=2, num_generations=4, micro_batch_size=8, temperature=1.0,
        beta=0.05, ref_update="ema", ref_sync_steps=1, ref_alpha=0.5,
    )  # fmt: skip
    a = _config(tmp_path / "a", **kw)
    a.checkpoint.every_steps = 2
    rewards_a, metrics_a, pa = _run(a, steps=4)
    b = _config(tmp_path / "b", **kw)
    b.checkpoint.every_steps = 2
    _, metrics_b1, _ = _run(b, steps=4, stop=2)
    rewards_b, metrics_b2, pb = _run(_config(tmp_path / "b", **kw), steps=4)  # resumes at step 2
    assert pb.start_step == 2 and pb.data_position == {"step": 2}
    assert rewards_b == rewards_a[2:]
    for ma, mb in zip(metrics_a, metrics_b1 + metrics_b2, strict=True):
        assert float(ma["loss"]) == float(mb["loss"]) and float(ma["kl"]) == float(mb["kl"])
    for tree in ("params", "ref"):
        xa = jax.device_get(pa.params if tree == "params" else pa.extra["ref_params"])
        xb = jax.device_get(pb.params if tree == "params" else pb.extra["ref_params"])
        for k in xa:
            np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"{tree}:{k}")
