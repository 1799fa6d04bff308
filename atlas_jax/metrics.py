"""Learning metrics: pure functions shared by the training logs and the evaluation harness.

Symbols: an *interaction* is one teaching of one problem (one teacher sample); Δ_i = p1_i − p0_i.
- LR  (learning rate)             = mean_i Δ_i
- NDR (non-degradation rate)      = mean_i [Δ_i ≥ 0]
- LES (learning efficiency score) = Σ_i Δ_i / (Σ_i L_teach,i / 1000)   (Δ per 1,000 teaching tokens;
                                    0 when no teaching tokens were written)
- accuracy                        = mean pass rate (with teaching: p1; without: p0)
- completion rate                 = fraction of student answers with an extracted answer that were not
                                    cut off by the token limit (finish reason "length")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atlas_jax.protocol.batch import RolloutBatch, StudentSamples


def learning_rate(deltas: Sequence[float]) -> float:
    """LR = mean Δ (0 for no interactions)."""
    return float(np.mean(deltas)) if len(deltas) else 0.0


def non_degradation_rate(deltas: Sequence[float]) -> float:
    """NDR = fraction of interactions with Δ ≥ 0 (0 for no interactions)."""
    return float(np.mean(np.asarray(deltas) >= 0)) if len(deltas) else 0.0


def learning_efficiency_score(deltas: Sequence[float], teaching_tokens: Sequence[int]) -> float:
    """LES = Σ Δ / (Σ L_teach / 1000); 0 when no teaching tokens were written.

    Raises:
      ValueError: the two sequences differ in length.
    """
    if len(deltas) != len(teaching_tokens):
        raise ValueError(
            f"deltas ({len(deltas)}) and teaching_tokens ({len(teaching_tokens)}) differ in length"
        )
    total_tokens = float(np.sum(teaching_tokens)) if len(teaching_tokens) else 0.0
    if total_tokens <= 0:
        return 0.0
    return float(np.sum(deltas)) / (total_tokens / 1000.0)


def accuracy(pass_rates: Sequence[float]) -> float:
    """Mean pass rate (0 for none)."""
    return float(np.mean(pass_rates)) if len(pass_rates) else 0.0


def completion_rate(answers: Sequence[str | None], finish_reasons: Sequence[str]) -> float:
    """Fraction of answers that were extracted and not truncated (0 for none).

    Raises:
      ValueError: the two sequences differ in length.
    """
    if len(answers) != len(finish_reasons):
        raise ValueError(
            f"answers ({len(answers)}) and finish_reasons ({len(finish_reasons)}) differ in length"
        )
    if not answers:
        return 0.0
    done = [a is not None and r != "length" for a, r in zip(answers, finish_reasons, strict=True)]
    return float(np.mean(done))


def _samples_completion(samples: Sequence[StudentSamples]) -> float:
    answers = [a for s in samples for a in s.answers]
    reasons = [r for s in samples for r in s.finish_reasons]
    return completion_rate(answers, reasons)


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Scalar summary of a rollout for logs and evaluation reports.

    Keys: lr_delta (LR; named so it never collides with an optimiser "lr"), ndr, les, acc_with_teaching, acc_without_teaching, completion_with_teaching,
    completion_without_teaching, teaching_tokens_mean, probe_tokens_mean, teacher_tokens_mean,
    teaching_tag_rate, teacher_truncated_rate, leak_rate, reward_mean, reward_std, plus the mean of every
    reward term as ``reward/<term>``.
    """
    episodes = batch.episodes
    deltas = [e.delta for e in episodes]
    teach_tokens = [e.teaching_tokens for e in episodes]
    rewards = np.asarray([e.reward for e in episodes], dtype=np.float64)
    out = {
        "lr_delta": learning_rate(deltas),
        "ndr": non_degradation_rate(deltas),
        "les": learning_efficiency_score(deltas, teach_tokens),
        "acc_with_teaching": accuracy([e.p1 for e in episodes]),
        "acc_without_teaching": accuracy([g.p0 for g in batch.groups]),
        "completion_with_teaching": _samples_completion([e.taught for e in episodes]),
        "completion_without_teaching": _samples_completion([g.baseline for g in batch.groups]),
        "teaching_tokens_mean": float(np.mean(teach_tokens)) if episodes else 0.0,
        "probe_tokens_mean": float(np.mean([g.probe_tokens for g in batch.groups])) if batch.groups else 0.0,
        "teacher_tokens_mean": float(np.mean([len(e.teacher_completion_ids) for e in episodes]))
        if episodes
        else 0.0,
        "teaching_tag_rate": float(np.mean([e.teaching_tag_found for e in episodes])) if episodes else 0.0,
        "teacher_truncated_rate": float(np.mean([e.teacher_finish_reason == "length" for e in episodes]))
        if episodes
        else 0.0,
        "leak_rate": float(np.mean([e.leaked for e in episodes])) if episodes else 0.0,
        "reward_mean": float(rewards.mean()) if episodes else 0.0,
        "reward_std": float(rewards.std()) if episodes else 0.0,
    }
    for key in sorted({k for e in episodes for k in e.reward_terms}):
        out[f"reward/{key}"] = float(np.mean([e.reward_terms.get(key, 0.0) for e in episodes]))
    return out
