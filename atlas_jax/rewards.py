"""Teacher rewards: pure functions of the student's pass rates with and without one teaching.

Symbols (one teacher sample of one problem):
  p0   student pass rate without teaching (k baseline samples, cached per problem)
  p1   student pass rate with this teaching (m samples)
  Δ    p1 − p0
  eff  efficiency bonus in [0, 1] (see ``efficiency_*`` below), forced to 0 by ``guarded_efficiency``
       when the teaching is empty, the completion has no ``<teaching>`` tag, or the teacher completion
       was truncated (finish reason "length"): eff = 𝟙[non-empty ∧ tagged ∧ finished] · eff_raw
  w    ``efficiency_weight``;  μ  ``degradation_penalty_multiplier``;  λ  ``leak_penalty``

Rewards (select by name from ``REWARDS``; every function returns its terms separately, and the
``"reward"`` entry is their sum):

``asymmetric`` (default)::

    r = max(Δ, 0)·(1 + w·eff) − μ·max(−Δ, 0)

  With μ = 0 this is the seed's "no reward for degradation"; the default μ = 2 makes a degradation
  cost twice what an equal improvement earns.

``rcl_compat`` (the original system's table, for comparison). For one baseline sample and one taught
sample, both binary::

    taught right, baseline wrong   1 + eff
    both right                     eff
    taught wrong, baseline right   −1
    both wrong                     0

  For pass rates we take its expectation over independent pairs:
  ``r = p1(1−p0)(1+eff) + p1·p0·eff − (1−p1)·p0``, which is the table when p0, p1 ∈ {0, 1}.
  ``efficiency_weight`` and ``degradation_penalty_multiplier`` are ignored (the original table has
  neither).

Leak penalty (both rewards, off when λ = 0; the base config sets λ = 1): if the teaching states the
ground truth (``leaked``, ``protocol/leak.py``: the number in digits or words, or an arithmetic
expression equal to it), the positive part of the reward is dropped and λ is subtracted, so giving the
answer away can never beat honest teaching: ``r = −μ·max(−Δ,0) − λ`` for ``asymmetric`` and
``r = −(1−p1)·p0 − λ`` for ``rcl_compat``.

Empty teachings (``protocol.empty_teaching="baseline"``, the default) are no intervention: p1 = p0, so
Δ = 0 and, with eff = 0, r = 0 under ``asymmetric``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

EFFICIENCY_MODES = ("teaching_length", "student_shorter")


@dataclasses.dataclass(frozen=True)
class RewardParams:
    """Reward hyper-parameters.

    Attributes:
      degradation_penalty_multiplier: μ, weight of a drop in pass rate (asymmetric only).
      efficiency_weight: w, weight of the efficiency bonus on improvements (asymmetric only).
      leak_penalty: λ ≥ 0; 0 disables the leak check.
      efficiency: "teaching_length" (default: ``1 − L_teach / max_teaching_tokens``) or
        "student_shorter" (the original's: relative shortening of the student's answer vs baseline).
    """

    degradation_penalty_multiplier: float = 2.0
    efficiency_weight: float = 1.0
    leak_penalty: float = 0.0
    efficiency: str = "teaching_length"

    def __post_init__(self) -> None:
        if self.degradation_penalty_multiplier < 0:
            raise ValueError(
                f"degradation_penalty_multiplier must be >= 0, got {self.degradation_penalty_multiplier}"
            )
        if self.efficiency_weight < 0:
            raise ValueError(f"efficiency_weight must be >= 0, got {self.efficiency_weight}")
        if self.leak_penalty < 0:
            raise ValueError(f"leak_penalty must be >= 0 (0 disables it), got {self.leak_penalty}")
        if self.efficiency not in EFFICIENCY_MODES:
            raise ValueError(f"efficiency must be one of {EFFICIENCY_MODES}, got {self.efficiency!r}")


@dataclasses.dataclass(frozen=True)
class RewardInputs:
    """What a reward sees for one teacher sample.

    Attributes:
      p0: baseline pass rate in [0, 1].
      p1: pass rate with the teaching in [0, 1].
      eff: efficiency bonus in [0, 1] (computed with ``efficiency_bonus``).
      leaked: the teaching contains the ground-truth answer.
    """

    p0: float
    p1: float
    eff: float = 0.0
    leaked: bool = False

    def __post_init__(self) -> None:
        for name in ("p0", "p1", "eff"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RewardInputs.{name} must be in [0, 1], got {value}")


def teaching_length_efficiency(teaching_tokens: int, max_teaching_tokens: int) -> float:
    """eff = clip(1 − L_teach / max_teaching_tokens, 0, 1); shorter teaching scores higher."""
    if max_teaching_tokens <= 0:
        raise ValueError(f"max_teaching_tokens must be > 0, got {max_teaching_tokens}")
    return min(1.0, max(0.0, 1.0 - teaching_tokens / max_teaching_tokens))


def student_shorter_efficiency(baseline_tokens: float, taught_tokens: float) -> float:
    """The original's eff = (L_base − L_taught) / L_base when the taught answer is shorter, else 0.

    Lengths are mean student answer lengths in tokens (baseline samples vs samples with teaching).
    """
    if baseline_tokens <= 0 or taught_tokens >= baseline_tokens:
        return 0.0
    return min(1.0, (baseline_tokens - taught_tokens) / baseline_tokens)


def guarded_efficiency(eff: float, *, teaching: str, tag_found: bool, truncated: bool) -> float:
    """eff = 0 for an empty teaching, a missing ``<teaching>`` tag or a truncated teacher completion.

    Otherwise ``eff`` unchanged. A teacher must not earn a length bonus for saying nothing, for ignoring
    the format, or for being cut off (a truncated completion is short only because the budget ended).
    """
    return eff if (teaching.strip() and tag_found and not truncated) else 0.0


def efficiency_bonus(
    mode: str,
    *,
    teaching_tokens: int,
    max_teaching_tokens: int,
    baseline_tokens: float,
    taught_tokens: float,
) -> float:
    """Dispatches to the efficiency definition named by ``mode`` (see ``RewardParams.efficiency``)."""
    if mode == "teaching_length":
        return teaching_length_efficiency(teaching_tokens, max_teaching_tokens)
    if mode == "student_shorter":
        return student_shorter_efficiency(baseline_tokens, taught_tokens)
    raise ValueError(f"unknown efficiency mode {mode!r}; known: {EFFICIENCY_MODES}")


def asymmetric_reward(x: RewardInputs, params: RewardParams) -> dict[str, float]:
    """r = max(Δ,0)·(1 + w·eff) − μ·max(−Δ,0) [− λ and no gain when leaked].

    Returns:
      {"reward", "gain", "degradation", "leak", "delta", "eff"}; reward = gain + degradation + leak.
    """
    delta = x.p1 - x.p0
    leaked = x.leaked and params.leak_penalty > 0
    gain = 0.0 if leaked else max(delta, 0.0) * (1.0 + params.efficiency_weight * x.eff)
    degradation = -params.degradation_penalty_multiplier * max(-delta, 0.0)
    leak = -params.leak_penalty if leaked else 0.0
    return {
        "reward": gain + degradation + leak,
        "gain": gain,
        "degradation": degradation,
        "leak": leak,
        "delta": delta,
        "eff": x.eff,
    }


def rcl_compat_reward(x: RewardInputs, params: RewardParams) -> dict[str, float]:
    """Expected value of the original table over independent (baseline, taught) sample pairs.

    r = p1(1−p0)(1+eff) + p1·p0·eff − (1−p1)·p0  [− λ and no positive terms when leaked].

    Returns:
      {"reward", "improve", "keep", "degradation", "leak", "delta", "eff"}; reward is the sum of
      improve, keep, degradation and leak.
    """
    leaked = x.leaked and params.leak_penalty > 0
    improve = 0.0 if leaked else x.p1 * (1.0 - x.p0) * (1.0 + x.eff)
    keep = 0.0 if leaked else x.p1 * x.p0 * x.eff
    degradation = -(1.0 - x.p1) * x.p0
    leak = -params.leak_penalty if leaked else 0.0
    return {
        "reward": improve + keep + degradation + leak,
        "improve": improve,
        "keep": keep,
        "degradation": degradation,
        "leak": leak,
        "delta": x.p1 - x.p0,
        "eff": x.eff,
    }


RewardFn = Callable[[RewardInputs, RewardParams], dict[str, float]]

REWARDS: dict[str, RewardFn] = {
    "asymmetric": asymmetric_reward,
    "rcl_compat": rcl_compat_reward,
}


def get_reward(name: str) -> RewardFn:
    """Returns the reward function registered under ``name``.

    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}") from None
