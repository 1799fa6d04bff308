"""Trainer defaults for teacher GRPO (mirrors the seed's ``teacher_grpo`` + ``adaptive_teaching`` reward)."""

import ml_collections

from configs.base import get_config as base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.job = "grpo"
    c.reward.name = "asymmetric"  # our default; "rcl_compat" reproduces the seed's reward table
    c.reward.degradation_penalty_multiplier = (
        2.0  # seed: degradation_penalty_multiplier 2.0 (now actually used)
    )
    c.reward.efficiency_weight = 1.0  # seed: efficiency_weight 1.0 (now actually used)
    c.protocol.max_probe_tokens = 50  # seed: max_probe_tokens 50
    c.grpo.advantage = "grpo"  # group mean/std normalisation, as TRL GRPO
    c.grpo.loss_aggregation = "seq_mean_token_mean"  # the original GRPO aggregation
    c.grpo.epsilon_low = 0.2  # TRL default clip range
    c.grpo.epsilon_high = 0.2
    c.grpo.num_iterations = 1  # one update per rollout batch (TRL default)
    c.optim.schedule = "constant"  # seed: lr_scheduler_type constant
    c.optim.warmup_steps = 0
    c.optim.max_grad_norm = 1.0
    c.model.param_dtype = "float32"  # fp32 master weights with bf16 compute (seed: bf16 true)
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    return c
