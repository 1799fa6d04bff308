"""Start-up checks of the GRPO options of issue 13 (reward scaling, GSPO, rollout correction,
over-long handling, dynamic sampling, async rollouts); ``validate.py`` lists them with the rest."""

from __future__ import annotations

from typing import Any

from atlas_jax.training.advantages import REWARD_SCALES
from atlas_jax.training.losses import RATIO_LEVELS
from atlas_jax.training.rollout_correction import CORRECTION_LEVELS, CORRECTION_MODES


def option_errors(g: Any, max_teaching_tokens: int) -> list[str]:
    """One line per problem in ``config.grpo``'s issue-13 fields, each naming its flag."""
    e: list[str] = []
    choices = (
        ("scale_rewards", REWARD_SCALES),
        ("ratio_level", RATIO_LEVELS),
        ("rollout_correction", CORRECTION_MODES),
        ("rollout_correction_level", CORRECTION_LEVELS),
    )
    for name, allowed in choices:
        if name in g and g[name] not in allowed:
            e.append(f"--config.grpo.{name}={g[name]!r}: choose one of {allowed}")
    if g.get("std_floor", 0.0) < 0:
        e.append(f"--config.grpo.std_floor={g.std_floor} must be >= 0 (0 = no floor)")
    if g.get("rollout_correction", "none") != "none" and not g.get("rollout_correction_threshold", 2.0) > 1:
        e.append(f"--config.grpo.rollout_correction_threshold={g.rollout_correction_threshold} must be > 1")
    if g.get("ratio_level", "token") == "sequence" and not (
        0 <= g.sequence_epsilon_low < 1 and g.sequence_epsilon_high >= 0
    ):
        e.append(
            "--config.grpo.sequence_epsilon_low must be in [0, 1) and --config.grpo.sequence_epsilon_high >= 0"
        )
    if not 0 <= g.get("overlong_buffer", 0) <= max_teaching_tokens:
        e.append(
            f"--config.grpo.overlong_buffer={g.overlong_buffer} must be in [0, "
            f"--config.protocol.max_teaching_tokens={max_teaching_tokens}]"
        )
    if g.get("overlong_penalty", 1.0) < 0:
        e.append(f"--config.grpo.overlong_penalty={g.overlong_penalty} must be >= 0")
    if g.get("dynamic_sampling_eps", 0.0) < 0:
        e.append(f"--config.grpo.dynamic_sampling_eps={g.dynamic_sampling_eps} must be >= 0")
    if g.get("dynamic_sampling_max_rounds", 1) < 1:
        e.append(f"--config.grpo.dynamic_sampling_max_rounds={g.dynamic_sampling_max_rounds} must be >= 1")
    if g.get("max_staleness", 0) < 0:
        e.append(f"--config.grpo.max_staleness={g.max_staleness} must be >= 0 (0 = on-policy rollouts)")
    return e
