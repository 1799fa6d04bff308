"""Config → protocol objects and engines for the GRPO loop (templates, rollout settings, student/teacher).

Kept apart from the loop so the loop only sees ``Engine``s and ``RolloutSettings``. The engines are built in
``engine_setup`` (``student_engine(config, mesh=None)``, ``teacher_engine(config, policy)``, re-exported here).
"""

from __future__ import annotations

from typing import Any

from atlas_jax.protocol.batch import RolloutSettings
from atlas_jax.protocol.templates import Templates
from atlas_jax.rewards import RewardParams
from atlas_jax.training.engine_setup import load_tokenizer, student_engine, teacher_engine

__all__ = [
    "load_tokenizer",
    "reward_params_from_config",
    "rollout_settings",
    "student_engine",
    "teacher_engine",
    "templates_from_config",
]

# config.protocol field -> Templates field (empty config value = the built-in template).
_TEMPLATE_FIELDS = {
    "probe_template": "student_probe",
    "teacher_template": "teacher",
    "taught_template": "student_taught",
    "baseline_template": "student_baseline",
}


def templates_from_config(config: Any) -> Templates:
    """The protocol templates; raises ``ValueError`` naming the flag when a placeholder is missing."""
    p = config.protocol
    values = {field: getattr(p, key) for key, field in _TEMPLATE_FIELDS.items() if getattr(p, key, "")}
    for flag in ("student_chat", "teacher_chat", "student_system", "teacher_system", "student_enable_thinking",
                 "teacher_enable_thinking"):  # fmt: skip
        if flag in p:
            values[flag] = p[flag]
    try:
        return Templates(**values)
    except ValueError as e:
        flags = ", ".join(f"--config.protocol.{k}" for k in _TEMPLATE_FIELDS)
        raise ValueError(f"{e} (templates are set by {flags})") from e


def reward_params_from_config(config: Any) -> RewardParams:
    r = config.reward
    kwargs = {
        "degradation_penalty_multiplier": float(r.degradation_penalty_multiplier),
        "efficiency_weight": float(r.efficiency_weight),
    }
    for name in ("leak_penalty", "efficiency"):
        if name in r:
            kwargs[name] = r[name]
    return RewardParams(**kwargs)


def rollout_settings(config: Any) -> RolloutSettings:
    """``RolloutSettings`` from ``config.protocol`` / ``config.grpo`` / ``config.reward`` (the protocol's builder)."""
    from atlas_jax.protocol.settings import rollout_settings_from_config

    return rollout_settings_from_config(config)
