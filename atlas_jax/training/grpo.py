"""The GRPO learner: one rollout batch in, ``num_iterations`` optimiser updates out.

Per batch (P problems × G teacher samples):
1. rewards plus the soft over-long penalty (``training/overlong.py``), then advantages per group
   (``training/advantages.py``: group / batch / no scaling, optional floor on the scale);
2. rows padded into ``[prompt | completion]`` with the *exact* prompt ids each completion was sampled
   from (``training/batching.py``);
3. reference log-probs (only when β > 0: β = 0 never runs a reference forward) and, when μ > 1, the
   old log-probs of the current policy, both stored before the first update;
4. μ exact-accumulated updates of the clipped GRPO objective (``training/losses.py``, token- or
   sequence-level ratios) at the sampling temperature; with μ = 1 the old log-probs are
   ``stop_gradient`` of the current ones (ratio 1); the policy-gradient term is weighted by the rollout correction
   (``training/rollout_correction.py``: TIS/MIS on ``log π_old − log q_sampler``);
5. an EMA reference sync ``ref ← α·θ + (1−α)·ref`` every ``ref_sync_steps`` batches when
   ``ref_update == "ema"``.

The sampler-vs-trainer log-prob mismatch (mean |Δ| and a k3 KL estimate of KL(sampler ‖ trainer)) is
measured in the first update: with synchronous rollouts the trainer weights are exactly the ones the
sampler used (the mismatch is numerics); with asynchronous ones it also holds the policy's staleness.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.training import batching, overlong, train_step
from atlas_jax.training.advantages import group_advantages
from atlas_jax.training.logprobs import completion_logprobs
from atlas_jax.training.losses import grpo_loss
from atlas_jax.training.rollout_correction import correction_weights
from atlas_jax.training.runtime import Policy


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
    """GRPO hyper-parameters (from ``config.grpo`` / ``config.protocol``)."""

    temperature: float
    epsilon_low: float
    epsilon_high: float
    beta: float
    advantage: str
    loss_aggregation: str
    completion_len: int
    num_iterations: int
    micro_batch_size: int
    logprob_chunk: int
    ref_update: str = "frozen"
    ref_sync_steps: int = 1
    ref_alpha: float = 1.0
    prompt_bucket: int = 64
    scale_rewards: str = "group"
    std_floor: float = 0.0
    ratio_level: str = "token"
    rollout_correction: str = "none"
    rollout_correction_level: str = "token"
    rollout_correction_threshold: float = 2.0
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    pad_rows_to: int = 1

    @classmethod
    def from_config(cls, config: Any) -> GRPOSpec:
        g = config.grpo
        seq = str(g.get("ratio_level", "token")) == "sequence"
        return cls(
            temperature=float(g.temperature),
            epsilon_low=float(g.sequence_epsilon_low if seq else g.epsilon_low),
            epsilon_high=float(g.sequence_epsilon_high if seq else g.epsilon_high),
            beta=float(g.beta),
            advantage=str(g.advantage),
            loss_aggregation=str(g.loss_aggregation),
            completion_len=int(config.protocol.max_teaching_tokens),
            num_iterations=int(g.num_iterations),
            micro_batch_size=int(g.micro_batch_size),
            logprob_chunk=int(g.logprob_chunk),
            ref_update=str(g.ref_update),
            ref_sync_steps=int(g.ref_sync_steps),
            ref_alpha=float(g.ref_alpha),
            prompt_bucket=int(g.prompt_bucket),
            scale_rewards=str(g.get("scale_rewards", "group")),
            std_floor=float(g.get("std_floor", 0.0)),
            ratio_level=str(g.get("ratio_level", "token")),
            rollout_correction=str(g.get("rollout_correction", "none")),
            rollout_correction_level=str(g.get("rollout_correction_level", "token")),
            rollout_correction_threshold=float(g.get("rollout_correction_threshold", 2.0)),
            overlong_buffer=int(g.get("overlong_buffer", 0)),
            overlong_penalty=float(g.get("overlong_penalty", 1.0)),
            # dynamic sampling may keep fewer groups: pad to one learner batch shape (one compile)
            pad_rows_to=int(g.problems_per_step) * int(g.num_generations) if g.get("dynamic_sampling") else 1,
        )


def grpo_loss_fn(spec: GRPOSpec) -> train_step.LossFn:
    """``loss_fn(model, micro_batch)`` of the GRPO objective plus logging sums."""

    def fn(model, mb):
        c = mb["completion_mask"].shape[1]
        prompt_len = mb["tokens"].shape[1] - c
        lp, ent = completion_logprobs(
            model, mb["tokens"], mb["attention_mask"], mb["positions"], prompt_len,
            temperature=spec.temperature, chunk=spec.logprob_chunk, with_entropy=True,
        )  # fmt: skip
        mask = mb["completion_mask"]
        old = mb["old_logprobs"] if "old_logprobs" in mb else jax.lax.stop_gradient(lp)
        weights, rc_sums = correction_weights(
            old, mb["sampler_logprobs"], mask, mode=spec.rollout_correction,
            level=spec.rollout_correction_level, threshold=spec.rollout_correction_threshold,
        )  # fmt: skip
        s, d, sums = grpo_loss(
            lp, old, mb.get("ref_logprobs"), mb["advantages"], mask,
            epsilon_low=spec.epsilon_low, epsilon_high=spec.epsilon_high, beta=spec.beta,
            aggregation=spec.loss_aggregation, constant_length=spec.completion_len,
            ratio_level=spec.ratio_level, weights=None if spec.rollout_correction == "none" else weights,
        )  # fmt: skip
        sums.update(rc_sums)
        diff = jax.lax.stop_gradient(lp) - mb["sampler_logprobs"]  # log π_trainer − log π_sampler
        sums["mismatch_abs"] = (jnp.abs(diff) * mask).sum()
        sums["mismatch_kl"] = ((jnp.exp(diff) - 1.0 - diff) * mask).sum()
        sums["entropy"] = (jax.lax.stop_gradient(ent) * mask).sum()
        return s, d, sums

    return fn


class GRPOLearner:
    """Holds the compiled GRPO step/score functions and the reference policy of one ``Policy``."""

    def __init__(self, policy: Policy, spec: GRPOSpec) -> None:
        self.policy, self.spec = policy, spec
        self.loss_fn = grpo_loss_fn(spec)
        self._shardings = train_step.state_shardings(policy.tx, policy.params, policy.mesh)
        self._steps: dict[int, Any] = {}
        self._score: dict[int, Any] = {}
        self.logprob_seconds = 0.0  # the last update's reference/old log-prob scoring (``update``)
        if spec.beta > 0 and "ref_params" not in policy.extra:
            policy.extra["ref_params"] = copy_params(policy.params)
        self._ema = jax.jit(
            lambda ref, p: jax.tree.map(lambda r, x: spec.ref_alpha * x + (1 - spec.ref_alpha) * r, ref, p),
            donate_argnums=(0,),
        )

    @staticmethod
    def extra_init(beta: float):
        """``make_policy(extra_init=...)``: the reference is a checkpointed copy of the initial params."""
        return (lambda params: {"ref_params": copy_params(params)}) if beta > 0 else None

    def _num_micro(self, rows: int) -> int:
        if rows % self.spec.micro_batch_size:
            raise ValueError(
                f"{rows} teacher samples per step do not split into micro-batches of {self.spec.micro_batch_size}: "
                "make grpo.problems_per_step * grpo.num_generations a multiple of --config.grpo.micro_batch_size"
            )
        return rows // self.spec.micro_batch_size

    def _step_fn(self, n: int):
        if n not in self._steps:
            p = self.policy
            self._steps[n] = train_step.make_train_step(
                p.graphdef, p.rest, p.tx, self.loss_fn, num_micro=n, mesh=p.mesh, shardings=self._shardings
            )
        return self._steps[n]

    def _score_fn(self, n: int):
        if n not in self._score:
            p, spec = self.policy, self.spec

            def logprobs(model, mb):
                prompt_len = mb["tokens"].shape[1] - mb["completion_mask"].shape[1]
                return completion_logprobs(
                    model, mb["tokens"], mb["attention_mask"], mb["positions"], prompt_len,
                    temperature=spec.temperature, chunk=spec.logprob_chunk,
                )[0]  # fmt: skip

            self._score[n] = train_step.make_score_fn(
                p.graphdef, p.rest, logprobs, num_micro=n, mesh=p.mesh, param_shardings=self._shardings.params
            )
        return self._score[n]

    def build_batch(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        sampler_logprobs: Sequence[Sequence[float]],
        rewards: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Host arrays for one rollout; ``rewards`` is ``[P, G]`` and rows are problem-major.

        The soft over-long penalty is added to ``rewards`` before the advantages (truncated rows leave
        the loss in ``HostRollout.learner_batch`` with ``grpo.mask_truncated``). Rows are padded with
        empty ones up to a multiple of ``pad_rows_to``.
        """
        spec = self.spec
        rewards = np.asarray(rewards, np.float32)
        lengths = [len(c) for c in completion_ids]
        penalty = overlong.soft_overlong_penalty(
            lengths, spec.completion_len, spec.overlong_buffer, spec.overlong_penalty
        )
        rewards = rewards + penalty.reshape(rewards.shape)
        adv = group_advantages(
            jnp.asarray(rewards), spec.advantage, scale=spec.scale_rewards, std_floor=spec.std_floor
        )
        out = batching.grpo_arrays(
            prompt_ids, completion_ids, sampler_logprobs, np.asarray(adv).reshape(-1),
            completion_len=spec.completion_len, prompt_bucket=spec.prompt_bucket, pad_rows_to=spec.pad_rows_to,
        )  # fmt: skip
        return out

    def update(self, batch: dict[str, np.ndarray], rollout_step: int) -> dict[str, jax.Array]:
        """μ optimiser updates on one rollout batch; returns device metrics (fetch them later).

        ``logprob_seconds`` is then the time of the forward-only scoring passes before the updates (the
        reference log-probs when β > 0, the old-policy ones when μ > 1; 0 with neither).
        """
        p, spec = self.policy, self.spec
        n = self._num_micro(len(batch["advantages"]))
        dev = jax.device_put(batch, train_step.batch_sharding(p.mesh))
        t0 = time.perf_counter()
        if spec.beta > 0:
            dev["ref_logprobs"] = self._score_fn(n)(p.extra["ref_params"], dev)
        if spec.num_iterations > 1:
            dev["old_logprobs"] = self._score_fn(n)(p.params, dev)
        if spec.beta > 0 or spec.num_iterations > 1:  # wait, so the scoring passes are timed on their own
            jax.block_until_ready([dev.get("ref_logprobs"), dev.get("old_logprobs")])
        self.logprob_seconds = time.perf_counter() - t0
        step = self._step_fn(n)
        per_iter = []
        for _ in range(spec.num_iterations):
            p.state, m = step(p.state, dev)
            per_iter.append(m)
        if spec.beta > 0 and spec.ref_update == "ema" and (rollout_step + 1) % spec.ref_sync_steps == 0:
            p.extra["ref_params"] = self._ema(p.extra["ref_params"], p.params)
        return summarize(per_iter)


def summarize(per_iter: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Per-batch metrics: ratios of token sums, losses averaged over the μ updates, mismatch from the first."""
    first = per_iter[0]
    tokens = jnp.maximum(first["tokens"], 1.0)
    mean = lambda k: sum(m[k] for m in per_iter) / len(per_iter)  # noqa: E731
    return {
        "loss": mean("loss"),
        "grad_norm": mean("grad_norm"),
        "clip_frac": mean("clipped") / tokens,
        "kl": mean("kl") / tokens,
        "entropy": first["entropy"] / tokens,
        "logprob_mismatch_abs": first["mismatch_abs"] / tokens,
        "logprob_mismatch_kl": first["mismatch_kl"] / tokens,
        "rollout_correction/weight_mean": first["rc_weight"] / tokens,
        "rollout_correction/masked_frac": first["rc_masked"] / tokens,
        "rollout_correction/truncated_frac": first["rc_truncated"] / tokens,
        "completion_tokens": first["tokens"],
        "skipped": sum(m["skipped"] for m in per_iter),  # updates left out for a non-finite loss
    }


def copy_params(params: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A distinct copy (same shardings) so donating the train state never frees the reference."""
    return jax.tree.map(lambda x: x.copy(), params)
