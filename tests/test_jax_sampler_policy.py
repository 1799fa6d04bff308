"""The JAX teacher sampler on the policy the learner trains, with the run configs' own model settings (issue 10
item 2): ``configs/run/teacher_rcl.py`` has remat on, bfloat16 compute and float32 master weights, and the
policy is sharded on a (2, 2, 2) mesh of 8 CPU devices. Built the way ``run_grpo`` builds it
(``make_policy`` -> ``rl_setup.teacher_engine``). Also the learner's forward-only scoring of that policy
(``train_step.make_score_fn``: old and reference log-probs, micro-batch by micro-batch).

References come from transformers in float32 on the same weights. Tolerances: float32 compute, greedy tokens
exact and log-probs 1e-4; bfloat16 compute, log-probs of the sampled tokens within 0.15 nats (bf16 keeps 8
mantissa bits; the tiny model's logits span ~±10).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import HFReference, make_hf_dir

from atlas_jax.engines.base import SamplingParams
from atlas_jax.training import rl_setup
from atlas_jax.training.runtime import make_policy
from configs.run import teacher_rcl

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "3+3=", "the lazy dog 12 times; 12"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("teacher"), tied=False)


def _teacher(hf_dir, out, **model):
    c = teacher_rcl.get_config()
    c.model.teacher = str(hf_dir)
    c.output_dir = str(out)
    c.mesh.shape = (2, 2, 2)
    for k, v in model.items():
        c.model[k] = v
    policy = make_policy(c, learning_rate=1e-6, total_steps=1)
    return c, rl_setup.teacher_engine(c, policy)


def test_run_config_model_settings_are_the_ones_tested():
    m = teacher_rcl.get_config().model
    assert (m.remat, m.compute_dtype, m.param_dtype) == (True, "bfloat16", "float32")


def test_remat_fp32_policy_matches_transformers(hf_dir, tmp_path):
    c, engine = _teacher(hf_dir, tmp_path, compute_dtype="float32")
    assert c.model.remat and engine.cfg.remat and engine.mesh.devices.shape == (2, 2, 2)
    ref = HFReference(hf_dir)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10))
    for group in out:
        got = group[0]
        assert got.token_ids == ref.greedy(got.prompt_ids, len(got.token_ids))
        np.testing.assert_allclose(got.logprobs, ref.logprobs(got.prompt_ids, got.token_ids), atol=1e-4)


def test_remat_bf16_sharded_policy_samples(hf_dir, tmp_path):
    c, engine = _teacher(hf_dir, tmp_path)  # the run config's values: remat, bf16 compute, fp32 params
    assert (engine.cfg.remat, engine.cfg.dtype, engine.cfg.param_dtype) == (True, "bfloat16", "float32")
    ref = HFReference(hf_dir)
    t = float(c.grpo.temperature)
    out = engine.generate(PROMPTS, SamplingParams(temperature=t, max_tokens=12, seed=3), n=2)
    assert [len(g) for g in out] == [2, 2, 2]
    for group in out:
        for comp in group:
            assert len(comp.token_ids) > 0
            want = ref.logprobs(comp.prompt_ids, comp.token_ids, temperature=t)
            np.testing.assert_allclose(comp.logprobs, want, atol=0.15)


def test_remat_policy_scored_in_micro_batches_matches_transformers(hf_dir, tmp_path):
    """The learner's stored old/reference log-probs (``make_score_fn``: a ``lax.map`` over micro-batches)."""
    import jax

    from atlas_jax.training.logprobs import completion_logprobs
    from atlas_jax.training.train_step import make_score_fn

    c = teacher_rcl.get_config()
    c.model.teacher, c.output_dir, c.mesh.shape = str(hf_dir), str(tmp_path), (2, 2, 2)
    c.model.compute_dtype = "float32"  # remat stays on (the run config's value)
    policy = make_policy(c, learning_rate=1e-6, total_steps=1)
    assert policy.model_cfg.remat
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, policy.model_cfg.vocab_size, size=(8, 11)).astype(np.int32)  # 5 prompt + 6
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(11, dtype=np.int32), tokens.shape).copy()}  # fmt: skip

    def logprobs(model, mb):
        return completion_logprobs(model, mb["tokens"], mb["attention_mask"], mb["positions"], 5,
                                   temperature=0.7, chunk=4)[0]  # fmt: skip

    score = make_score_fn(policy.graphdef, policy.rest, logprobs, num_micro=2, mesh=policy.mesh,
                          param_shardings={k: v.sharding for k, v in policy.params.items()})  # fmt: skip
    got = np.asarray(jax.device_get(score(policy.params, batch)))
    ref = HFReference(hf_dir)
    want = [ref.logprobs(row[:5].tolist(), row[5:].tolist(), temperature=0.7) for row in tokens]
    np.testing.assert_allclose(got, np.array(want), atol=1e-4)
