"""Where the GRPO loop gets each step's rollout: on-policy or up to ``max_staleness`` steps ahead.

``RolloutSource.get(step)`` returns a ``StepRollout``: the groups the learner trains on, every group that
was generated (for the logs), the data position after this step's problems and per-phase timings.

- **Dynamic sampling** (``grpo.dynamic_sampling``, ``training/dynamic_sampling.py``): a step rolls out
  ``problems_per_step`` problems per round and keeps the informative groups (rewards not all equal)
  until it has ``problems_per_step`` of them or ``dynamic_sampling_max_rounds`` rounds ran. Round k > 0
  of step s samples with the seeds of step ``s + k·ROUND_STRIDE`` (disjoint from every training and
  evaluation step). The learner batch is padded to its full shape with empty rows (no recompile).
- **Asynchronous rollouts** (``grpo.max_staleness`` = k ≥ 1): the rollout of step t + k is submitted
  (with a copy of the weights before update t) to one background thread before update t runs, so
  generation overlaps the update; step t trains on a rollout made with the weights before update
  t − k' for some k' ≤ k (exactly k once the pipeline is full). The importance-sampling correction of
  ``training/rollout_correction.py`` uses the engine's own log-probs, which then carry the staleness.
  Rollouts run in submission order in that one thread, so the problems each step sees (and the data
  position) are the same as on-policy. JAX releases the GIL while a compiled program runs, so the
  sampler's and the learner's programs overlap on the CPU's cores.

Multi-process runs keep ``max_staleness = 0`` (the weight push of other engines is a collective).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from atlas_jax.protocol.batch import RolloutBatch
from atlas_jax.training import dynamic_sampling

ROUND_STRIDE = 1_000_000  # seed-step offset of dynamic-sampling round k: step + k * ROUND_STRIDE


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """Rollout scheduling (from ``config.grpo``)."""

    problems_per_step: int
    dynamic_sampling: bool = False
    dynamic_sampling_eps: float = 1e-6
    dynamic_sampling_max_rounds: int = 3
    max_staleness: int = 0

    @classmethod
    def from_config(cls, config: Any) -> SourceSettings:
        g = config.grpo
        return cls(
            problems_per_step=int(g.problems_per_step),
            dynamic_sampling=bool(g.get("dynamic_sampling", False)),
            dynamic_sampling_eps=float(g.get("dynamic_sampling_eps", 1e-6)),
            dynamic_sampling_max_rounds=int(g.get("dynamic_sampling_max_rounds", 3)),
            max_staleness=int(g.get("max_staleness", 0)),
        )


@dataclasses.dataclass
class StepRollout:
    """One step's rollout.

    Attributes:
      batch: the groups the learner trains on (this host's share; with dynamic sampling the kept ones).
      generated: every group rolled out for this step (what the rollout metrics describe).
      position: the data position after this step's problems (checkpointed with the step).
      weights_step: how many rollout steps had updated the weights that sampled this rollout (the
        step's staleness is ``step − weights_step``: 0 on-policy, up to ``max_staleness`` otherwise).
      times: ``time/weight_push``, ``time/rollout`` and the per-phase ``time/gen_*`` of every round.
      stats: ``dynamic/*`` when dynamic sampling is on.
    """

    batch: RolloutBatch
    generated: RolloutBatch
    position: dict
    weights_step: int
    times: dict[str, float]
    stats: dict[str, float]


class RolloutSource:
    """Produces each step's ``StepRollout`` on-policy (``max_staleness = 0``) or ahead in a thread.

    Args:
      run_rollout: ``(problems, seed_step) -> (this host's RolloutBatch, every host's, phase_times)``
        (the two are one batch on one process; dynamic sampling and async rollouts need one process).
      take_problems: ``(k) -> problems``, the next k problems of the data order.
      position: ``() -> dict``, the data order's current position.
      push: ``(params or None) -> None``; ``None`` pushes the live policy weights (on-policy), otherwise
        the given snapshot.
      snapshot: ``() -> params``, a copy of the current weights that the update cannot donate.
      settings: scheduling.
    """

    def __init__(
        self,
        run_rollout: Callable[[Sequence[Any], int], tuple[RolloutBatch, RolloutBatch, dict[str, float]]],
        take_problems: Callable[[int], list[Any]],
        position: Callable[[], dict],
        push: Callable[[Any], None],
        snapshot: Callable[[], Any],
        settings: SourceSettings,
    ) -> None:
        if settings.max_staleness < 0:
            raise ValueError(
                f"max_staleness must be >= 0, got {settings.max_staleness} (--config.grpo.max_staleness)"
            )
        if settings.dynamic_sampling_max_rounds < 1:
            raise ValueError(
                "dynamic_sampling_max_rounds must be >= 1, got "
                f"{settings.dynamic_sampling_max_rounds} (--config.grpo.dynamic_sampling_max_rounds)"
            )
        self._run, self._take, self._position = run_rollout, take_problems, position
        self._push, self._snapshot, self.settings = push, snapshot, settings
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
            if settings.max_staleness > 0
            else None
        )

    # -- one step's rollout (runs in the worker thread when asynchronous) ----------------------------------
    def _produce(self, step: int, weights_step: int, params: Any) -> StepRollout:
        t0 = time.perf_counter()
        self._push(params)
        times = {"time/weight_push": time.perf_counter() - t0}
        s = self.settings
        rounds = s.dynamic_sampling_max_rounds if s.dynamic_sampling else 1
        groups, kept, informative_total, t_roll = [], [], 0, time.perf_counter()
        n_rounds = 0
        for k in range(rounds):
            problems = self._take(s.problems_per_step)
            local, batch, phases = self._run(problems, step + k * ROUND_STRIDE)
            n_rounds += 1
            for name, v in phases.items():
                times[name] = times.get(name, 0.0) + v
            if s.dynamic_sampling:
                info = dynamic_sampling.informative_groups(batch.rewards(), s.dynamic_sampling_eps)
                informative_total += int(info.sum())
                kept = dynamic_sampling.select(kept, info, len(groups), s.problems_per_step)
            groups.extend(batch.groups)
            if len(kept) >= s.problems_per_step:
                break
        times["time/rollout"] = time.perf_counter() - t_roll
        generated = RolloutBatch(groups) if s.dynamic_sampling else batch
        stats: dict[str, float] = {}
        train = local  # this host's share (all of it on one process)
        if s.dynamic_sampling:
            # no informative group at all: the first round's groups (zero advantages; only the KL acts)
            train = RolloutBatch([groups[i] for i in kept] if kept else groups[: s.problems_per_step])
            stats = dynamic_sampling.stats(
                len(groups), informative_total, len(kept), n_rounds, s.problems_per_step
            )
        return StepRollout(train, generated, self._position(), weights_step, times, stats)

    # -- scheduling ----------------------------------------------------------------------------------------
    def prefetch(self, step: int, end: int, weights_step: int) -> None:
        """Asynchronous: submits the rollouts of steps ``step .. step + max_staleness − 1`` (< ``end``)
        that are not in flight yet, with a copy of the current weights (``weights_step`` = the number of
        rollout steps already applied to them). On-policy: nothing."""
        if self._pool is None:
            return
        snap = None
        for s in range(step, min(step + self.settings.max_staleness, end)):
            if s in self._pending:
                continue
            if snap is None:
                snap = self._snapshot()
                jax.block_until_ready(snap)  # the copy is made before the update donates the weights
            self._pending[s] = self._pool.submit(self._produce, s, weights_step, snap)

    def get(self, step: int) -> StepRollout:
        """The rollout of ``step``: waits for the one in flight, or (on-policy) makes it now."""
        fut = self._pending.pop(step, None)
        if fut is not None:
            return fut.result()
        if self._pool is not None:  # first step, or after a resume: nothing in flight yet
            self.prefetch(step, step + 1, step)
            return self._pending.pop(step).result()
        return self._produce(step, step, None)

    def wait(self) -> None:
        """Blocks until every rollout in flight is done (before the loop uses the engines itself)."""
        for fut in self._pending.values():
            fut.exception()

    def close(self) -> None:
        """Waits for the rollouts in flight and stops the worker thread."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending.clear()
