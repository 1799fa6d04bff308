"""The data a two-pass rollout produces: settings in, ``RolloutBatch`` out.

Shapes: a batch holds P problems (``groups``); each ``ProblemGroup`` holds the cached baseline
(k student samples), one probe, and G ``Episode``s (one per teacher sample, all conditioned on the same
probe, so the GRPO group is well defined); each episode holds m taught student samples.

Consumers:
- the GRPO learner reads, per episode, ``teacher_prompt_ids`` + ``teacher_completion_ids`` (exactly what
  the teacher engine conditioned on and sampled), ``teacher_logprobs`` (sampler log-probs, one per
  completion token, see ``engines/base.py`` for the convention) and ``reward``; ``RolloutBatch.rewards()``
  gives the [P, G] reward matrix for group normalisation.
- the evaluation harness and the training logs read p0 / p1 / Δ, lengths and the texts
  (``atlas_jax.metrics`` turns them into LR / NDR / LES and accuracies).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atlas_jax.protocol.templates import Templates
from atlas_jax.rewards import RewardParams

MISSING_TEACHING_RULES = ("strip_thinking", "empty")
EMPTY_TEACHING_RULES = ("template", "baseline")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How to run the protocol (built from the ConfigDict by the caller).

    Attributes:
      k: baseline student samples per problem (cached per problem id; the student is frozen).
      m: student samples per teaching.
      group_size: G, teacher samples per problem (all on the same probe).
      max_probe_tokens: token budget of the student's probe (pass 1).
      max_teaching_tokens: token budget of each teacher completion (thinking + teaching); the default
        ``eff`` = 1 − L_teach / max_teaching_tokens with L_teach the teaching length in teacher tokens.
      max_prompt_tokens: longest teacher prompt accepted (teacher tokens); longer is an error.
      max_student_tokens: generation cap of baseline and taught student answers.
      student_temperature: sampling temperature of baseline and taught answers (the same for both so
        p0 and p1 are comparable).
      probe_temperature: temperature of the probe (0 = greedy).
      teacher_temperature: temperature of the teacher samples.
      teacher_top_p: nucleus mass of the teacher samples.
      templates: prompt templates and chat/raw mode per role.
      reward: reward name in ``atlas_jax.rewards.REWARDS``.
      reward_params: reward hyper-parameters.
      answer_extractor: "default" or "rcl_compat" (see ``protocol/answers.py``).
      verifier: "auto" (math-verify, then normalised match), "math", "normalised" or "exact".
      missing_teaching: rule when the teacher wrote no <teaching> tag: "strip_thinking" (default; the
        completion with every <thinking> block removed is the teaching) or "empty" (no teaching).
      empty_teaching: what an empty teaching means: "baseline" (default; an empty teaching is no
        intervention: the student's cached baseline samples stand for its taught samples, so p1 = p0 and
        Δ = 0 exactly, and no student call is made for it) or "template" (the student answers the taught
        template with an empty teaching, m fresh samples).
      seed: base seed; each phase derives its own seed from it and the step.
    """

    k: int = 4
    m: int = 4
    group_size: int = 4
    max_probe_tokens: int = 50
    max_teaching_tokens: int = 512
    max_prompt_tokens: int = 1024
    max_student_tokens: int = 256
    student_temperature: float = 0.7
    probe_temperature: float = 0.0
    teacher_temperature: float = 1.0
    teacher_top_p: float = 1.0
    templates: Templates = dataclasses.field(default_factory=Templates)
    reward: str = "asymmetric"
    reward_params: RewardParams = dataclasses.field(default_factory=RewardParams)
    answer_extractor: str = "default"
    verifier: str = "auto"
    missing_teaching: str = "strip_thinking"
    empty_teaching: str = "baseline"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "m", "group_size", "max_probe_tokens", "max_teaching_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_student_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.missing_teaching not in MISSING_TEACHING_RULES:
            raise ValueError(
                f"RolloutSettings.missing_teaching must be one of {MISSING_TEACHING_RULES}, "
                f"got {self.missing_teaching!r}"
            )
        if self.empty_teaching not in EMPTY_TEACHING_RULES:
            raise ValueError(
                f"RolloutSettings.empty_teaching must be one of {EMPTY_TEACHING_RULES}, "
                f"got {self.empty_teaching!r}"
            )
        # Imported lazily to keep this module free of heavy imports; raises listing known names.
        from atlas_jax.protocol.answers import EXTRACTORS, VERIFIERS
        from atlas_jax.rewards import get_reward

        get_reward(self.reward)
        if self.answer_extractor not in EXTRACTORS:
            raise ValueError(f"answer_extractor must be one of {EXTRACTORS}, got {self.answer_extractor!r}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {self.verifier!r}")


@dataclasses.dataclass
class StudentSamples:
    """Student answers to one prompt, scored.

    Attributes:
      prompt: the prompt text the student engine received.
      texts: the m (or k) completions.
      answers: the extracted answer of each completion (None = no answer found).
      correct: verification result of each completion.
      num_tokens: completion length in student tokens.
      finish_reasons: "stop" or "length" per completion.
    """

    prompt: str
    texts: list[str]
    answers: list[str | None]
    correct: list[bool]
    num_tokens: list[int]
    finish_reasons: list[str]

    @property
    def pass_rate(self) -> float:
        """Fraction of correct completions."""
        return float(np.mean(self.correct)) if self.correct else 0.0

    @property
    def mean_tokens(self) -> float:
        """Mean completion length in tokens."""
        return float(np.mean(self.num_tokens)) if self.num_tokens else 0.0


def samples_state(s: StudentSamples) -> dict:
    """What a checkpoint keeps of cached baseline samples: everything rewards and metrics read (scores,
    extracted answers, lengths, finish reasons), not the prompt and completion texts (they can be long)."""
    return {"answers": list(s.answers), "correct": [bool(c) for c in s.correct],
            "num_tokens": [int(n) for n in s.num_tokens], "finish_reasons": list(s.finish_reasons)}  # fmt: skip


def samples_from_state(state: dict) -> StudentSamples:
    """Inverse of ``samples_state``; ``prompt`` is "" and every text is "" (not checkpointed)."""
    n = len(state["correct"])
    return StudentSamples(prompt="", texts=[""] * n, answers=list(state["answers"]), correct=list(state["correct"]),
                          num_tokens=list(state["num_tokens"]), finish_reasons=list(state["finish_reasons"]))  # fmt: skip


@dataclasses.dataclass
class Episode:
    """One teacher sample and what it did to the student.

    Attributes:
      teacher_prompt: the rendered teacher prompt text.
      teacher_prompt_ids: exact prompt token ids the teacher engine conditioned on.
      teacher_completion_ids: exact sampled token ids (a trailing stop token is kept).
      teacher_logprobs: sampler log-prob of each completion token.
      teacher_finish_reason: "stop" or "length".
      teacher_text: the decoded teacher completion (including any <thinking>).
      teaching: the text shown to the student (extracted from <teaching>, thinking removed).
      teaching_tag_found: the completion contained a <teaching> tag.
      teaching_tokens: length of the teaching in teacher tokens.
      leaked: the teaching contains the normalised ground truth.
      taught: the m student samples with this teaching.
      p1: pass rate of ``taught``.
      delta: p1 − p0.
      eff: efficiency bonus in [0, 1].
      reward: scalar reward.
      reward_terms: every reward term (see ``atlas_jax.rewards``), for logging.
    """

    teacher_prompt: str
    teacher_prompt_ids: list[int]
    teacher_completion_ids: list[int]
    teacher_logprobs: list[float]
    teacher_finish_reason: str
    teacher_text: str
    teaching: str
    teaching_tag_found: bool
    teaching_tokens: int
    leaked: bool
    taught: StudentSamples
    p1: float
    delta: float
    eff: float
    reward: float
    reward_terms: dict[str, float]


@dataclasses.dataclass
class ProblemGroup:
    """One problem: its cached baseline, its probe and its G episodes.

    Attributes:
      problem_id: stable id (the baseline cache key).
      problem: problem text.
      answer: ground-truth answer.
      baseline: the k student samples without teaching (cached across steps).
      p0: baseline pass rate.
      probe: the student's probe text (pass 1).
      probe_tokens: probe length in student tokens (≤ max_probe_tokens).
      episodes: G episodes, all conditioned on ``probe``.
    """

    problem_id: str
    problem: str
    answer: str
    baseline: StudentSamples
    p0: float
    probe: str
    probe_tokens: int
    episodes: list[Episode]


@dataclasses.dataclass
class RolloutBatch:
    """The result of one rollout: P problem groups of G episodes each.

    Attributes:
      groups: one entry per problem, in the order given.
      baseline_cache_hits: how many problems reused a cached baseline in this call.
      probes_cut: how many probes were shortened so the teacher prompt fits ``max_prompt_tokens``.
    """

    groups: list[ProblemGroup]
    baseline_cache_hits: int = 0
    probes_cut: int = 0

    @property
    def episodes(self) -> list[Episode]:
        """All episodes, problem-major (group i's episodes are [i*G, (i+1)*G))."""
        return [e for g in self.groups for e in g.episodes]

    def rewards(self) -> np.ndarray:
        """Reward matrix [P, G] (float32) for group-relative advantages."""
        return np.asarray([[e.reward for e in g.episodes] for g in self.groups], dtype=np.float32)

    def deltas(self) -> np.ndarray:
        """Δ matrix [P, G] (float32)."""
        return np.asarray([[e.delta for e in g.episodes] for g in self.groups], dtype=np.float32)
