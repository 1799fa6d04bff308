"""Builds the protocol's frozen settings from the job ConfigDict (the only place that reads it).

Config fields read (see ``configs/base.py``):
``protocol.*`` (budgets, k = num_baseline_samples, m = num_student_samples, temperatures, templates,
chat flags, answer extractor/verifier, missing-teaching rule), ``reward.*`` (name and parameters),
``grpo.num_generations`` (G), ``grpo.temperature`` / ``grpo.top_p`` (teacher sampling) and ``seed``.
An empty template string means the built-in template.
"""

from __future__ import annotations

from typing import Any

from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.templates import Templates
from atlas_jax.rewards import RewardParams


def templates_from_config(protocol: Any) -> Templates:
    """``Templates`` from the ``protocol`` config section (empty strings keep the built-ins)."""
    overrides = {
        "student_baseline": protocol.baseline_template,
        "student_probe": protocol.probe_template,
        "teacher": protocol.teacher_template,
        "student_taught": protocol.taught_template,
    }
    return Templates(
        **{k: v for k, v in overrides.items() if v},
        student_chat=bool(protocol.student_chat),
        teacher_chat=bool(protocol.teacher_chat),
        student_system=protocol.student_system,
        teacher_system=protocol.teacher_system,
        student_enable_thinking=bool(protocol.get("student_enable_thinking", False)),
        teacher_enable_thinking=bool(protocol.get("teacher_enable_thinking", False)),
    )


def reward_params_from_config(reward: Any) -> RewardParams:
    """``RewardParams`` from the ``reward`` config section."""
    return RewardParams(
        degradation_penalty_multiplier=float(reward.degradation_penalty_multiplier),
        efficiency_weight=float(reward.efficiency_weight),
        leak_penalty=float(reward.leak_penalty),
        efficiency=reward.efficiency,
    )


def rollout_settings_from_config(config: Any) -> RolloutSettings:
    """``RolloutSettings`` from a full job config.

    Raises:
      ValueError: a bad value; the message names the setting (templates, reward name, budgets, ...).
    """
    p = config.protocol
    return RolloutSettings(
        k=int(p.num_baseline_samples),
        m=int(p.num_student_samples),
        group_size=int(config.grpo.num_generations),
        max_probe_tokens=int(p.max_probe_tokens),
        max_teaching_tokens=int(p.max_teaching_tokens),
        max_prompt_tokens=int(p.max_prompt_tokens),
        max_student_tokens=int(p.max_student_tokens),
        student_temperature=float(p.student_temperature),
        probe_temperature=float(p.probe_temperature),
        teacher_temperature=float(config.grpo.temperature),
        teacher_top_p=float(config.grpo.top_p),
        templates=templates_from_config(p),
        reward=config.reward.name,
        reward_params=reward_params_from_config(config.reward),
        answer_extractor=p.answer_extractor,
        verifier=p.verifier,
        missing_teaching=p.missing_teaching,
        empty_teaching=p.empty_teaching,
        seed=int(config.seed),
    )
