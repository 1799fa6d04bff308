"""The GRPO training loop: push weights → two-pass rollout → update → log / checkpoint / eval.

``train_grpo(config, train, eval, teacher, student, policy)`` is the library call (the pipeline uses it
with its own engines); ``run_grpo(config)`` builds data, policy and engines from the config first.
Per step the timings of each phase are logged (``time/weight_push``; ``time/rollout`` and inside it
``time/gen_baseline``, ``time/gen_probe``, ``time/gen_teacher``, ``time/gen_taught``, ``time/scoring``;
``time/update`` and inside it ``time/update_batch`` (host: advantages and learner arrays),
``time/update_logprobs`` (the reference / old-policy scoring passes) and ``time/update_train`` (the optimiser
steps); ``time/checkpoint``; ``time/rollout_wait`` is how long the loop waited for the rollout:
all of it on-policy, only what did not overlap the previous update with ``grpo.max_staleness`` > 0),
the rollout scheduling (``training/rollout_source.py``: ``dynamic/*``, ``async/staleness``), plus every
rollout metric
(``atlas_jax.metrics.rollout_metrics``: reward mean/std and terms, LR, NDR, LES, accuracies, completion
rate, lengths), the learner's metrics (loss, KL, clip fraction, entropy, grad norm, sampler-vs-trainer
log-prob mismatch) and throughput.

Multi-process runs (docs/multihost.md): every host rolls out its own share of the step's problems and
feeds its rows of the global learner batch (``training/host_rollout.py``); metrics, saved episodes and the
baseline cache are combined across hosts, so the run equals one process with the same global batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax

from atlas_jax import distributed
from atlas_jax.data.order import WeightedOrder
from atlas_jax.engines.base import Engine
from atlas_jax.engines.jax_sampler import JaxSampler
from atlas_jax.metrics import rollout_metrics
from atlas_jax.protocol.batch import RolloutBatch
from atlas_jax.protocol.screening import screen_problems
from atlas_jax.training import host_rollout, rl_setup
from atlas_jax.training.grpo import GRPOLearner, GRPOSpec, copy_params
from atlas_jax.training.nan_guard import NonFiniteMonitor
from atlas_jax.training.preemption import StopSignal
from atlas_jax.training.rollout_source import RolloutSource, SourceSettings
from atlas_jax.training.runtime import Policy, make_policy
from atlas_jax.training.sft import EpochOrder, _maybe_export
from atlas_jax.training.writers import MetricsWriter, PhaseTimer, progress_bar


class _Timed(Engine):
    """Wraps an engine and records the wall-clock seconds of each ``generate`` call, in order."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.calls: list[float] = []

    def generate(self, prompts, params, n=1):
        t0 = time.perf_counter()
        try:
            return self.inner.generate(prompts, params, n)
        finally:
            self.calls.append(time.perf_counter() - t0)

    def update_weights(self, params) -> None:
        self.inner.update_weights(params)

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    def pop(self) -> list[float]:
        calls, self.calls = self.calls, []
        return calls


def phase_times(student_calls: list[float], teacher_calls: list[float], rollout_s: float) -> dict[str, float]:
    """Splits a rollout's time by phase.

    ``TwoPassRollout.run`` makes one student call per phase in a fixed order — baseline (only when a
    problem is not cached yet), probe, taught — and one teacher call, so the last student call is the
    taught phase and the one before it the probe. Scoring (answer checks, rewards, tokenisation) is
    what remains of the rollout time.
    """
    out = {"time/gen_teacher": sum(teacher_calls)}
    names = (
        ["gen_baseline", "gen_probe", "gen_taught"][-len(student_calls) :] if len(student_calls) <= 3 else []
    )
    for name, t in zip(names, student_calls, strict=False):
        out[f"time/{name}"] = t
    if not names:
        out["time/gen_student"] = sum(student_calls)
    out.setdefault("time/gen_baseline", 0.0)
    out["time/scoring"] = max(rollout_s - sum(teacher_calls) - sum(student_calls), 0.0)
    return out


def episode_samples(batch: RolloutBatch, k: int) -> list[dict[str, Any]]:
    """The first ``k`` episodes as JSON-able dicts (problem, probe, teaching, student answers, reward)."""
    out = []
    for g in batch.groups:
        for e in g.episodes:
            if len(out) >= k:
                return out
            out.append({
                "problem": g.problem, "answer": g.answer, "p0": g.p0, "probe": g.probe,
                "teacher_completion": e.teacher_text, "teaching": e.teaching, "student_answers": e.taught.texts,
                "p1": e.p1, "delta": e.delta, "reward": e.reward, "reward_terms": e.reward_terms,
            })  # fmt: skip
    return out


def train_grpo(
    config: Any,
    train: Sequence[Any],
    eval_problems: Sequence[Any],
    teacher: Engine,
    student: Engine,
    policy: Policy,
) -> Policy:
    """Runs (or resumes) ``config.grpo.num_steps`` rollout steps on ``policy``."""
    g, lg = config.grpo, config.logging
    spec = GRPOSpec.from_config(config)
    learner = GRPOLearner(policy, spec)
    timer = PhaseTimer()
    timed_student, timed_teacher = _Timed(student), _Timed(teacher)
    settings = rl_setup.rollout_settings(config)

    def make_hosts() -> host_rollout.HostRollout:
        p, n = int(g.problems_per_step), int(g.num_generations)
        return host_rollout.HostRollout(timed_student, timed_teacher, settings, policy.mesh, p, n)

    hosts, eval_hosts = make_hosts(), make_hosts()  # evaluation has its own baseline cache
    restore_baselines(policy.meta, hosts.rollout, eval_hosts.rollout)
    mode = str(config.data.overlong)
    train, overlong = screen_problems(hosts.rollout, train, mode=mode, source="training problems")
    eval_problems, eval_skipped = screen_problems(
        hosts.rollout, eval_problems, mode=mode, source="eval problems"
    )
    if overlong or eval_skipped:
        print(f"[grpo] skipped over-long problems (protocol.max_prompt_tokens={settings.max_prompt_tokens}): "
              f"{len(overlong)} training, {len(eval_skipped)} eval; first: {(overlong or eval_skipped)[0][1]}",
              flush=True)  # fmt: skip
    order = problem_order(train, int(config.seed), bool(config.data.shuffle), policy.data_position)
    writer = MetricsWriter(config.output_dir, tensorboard=bool(lg.tensorboard), resume_step=policy.start_step)
    total = int(g.num_steps)
    bar = progress_bar(total, policy.start_step, "grpo", bool(lg.progress_bar))
    eval_every = int(config.eval.every_steps)
    end, stop_after = total, int(config.checkpoint.stop_after_steps)
    monitor = NonFiniteMonitor(int(config.reliability.max_nonfinite_steps))  # training/nan_guard.py
    stop = StopSignal(enabled=bool(config.reliability.handle_signals)).install()  # training/preemption.py
    source = rollout_source(hosts, timed_student, timed_teacher, train, order, policy, config)
    position = order.position
    for step in range(policy.start_step, total):
        t0 = time.perf_counter()
        with timer("rollout_wait"):  # on-policy: the whole weight push + rollout; async: the wait
            sr = source.get(step)
        source.prefetch(step + 1, total, weights_step=step)  # async: the next rollouts overlap this update
        batch, position, phases = sr.generated, sr.position, {**sr.times, **sr.stats}
        phases["async/staleness"] = float(step - sr.weights_step)
        episodes = batch.episodes
        with timer("update"):
            with timer("update_batch"):
                # this host's rows of the global batch (the kept groups with dynamic sampling)
                arrays = hosts.learner_batch(learner, sr.batch, mask_truncated=bool(g.mask_truncated))
            metrics = jax.device_get(learner.update(arrays, step))
        skipped = monitor.observe(step + 1, metrics)  # raises after max_nonfinite_steps in a row
        t_eval, evaluated = time.perf_counter(), {}
        # Evaluate before the save, so the checkpoint holds the evaluation's baseline cache too.
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == total:
            source.wait()  # async: the engines are free again
            evaluated = _evaluate(config, eval_hosts, teacher, policy, eval_problems, writer, step + 1)
        t_eval = time.perf_counter() - t_eval
        with timer("checkpoint"):
            if not skipped:  # a step whose update was skipped is never checkpointed
                source.wait()  # async: the rollout in flight no longer writes the baseline cache
                meta = baseline_meta(hosts.rollout, eval_hosts.rollout)
                policy.save(step + 1, data_position=position, extra=policy.extra, meta=meta)
        record = {
            **rollout_metrics(batch),
            "probes_cut": batch.probes_cut,
            "overlong_skipped": len(overlong),
            **metrics,
            "lr": float(policy.schedule(int(policy.state.step) - 1)),
        }
        record.update(timer.pop())
        record["time/update_logprobs"] = learner.logprob_seconds
        record["time/update_train"] = max(
            record["time/update"] - record["time/update_batch"] - learner.logprob_seconds, 0.0
        )
        inner = timed_teacher.inner
        if isinstance(inner, JaxSampler):  # the rollout copy's rebuild, inside time/weight_push
            record["time/reshard"] = inner.reshard_seconds
        record.update(phases)
        record.update(hosts.work_metrics())
        record["update_tokens_per_s"] = (
            float(metrics["completion_tokens"]) * int(g.num_iterations) / max(record["time/update"], 1e-9)
        )
        dt = time.perf_counter() - t0 - t_eval
        record["time/step"] = dt
        record["teacher_tokens_per_s"] = float(sum(len(e.teacher_completion_ids) for e in episodes)) / max(
            dt, 1e-9
        )
        record.update(evaluated)
        writer.write(step + 1, record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", ndr=f"{record['ndr']:.2f}")
        bar.update(1)
        if (stop_after and step + 1 - policy.start_step >= stop_after) or stop.should_stop():
            end = step + 1
            break
    stop.close()
    source.close()
    meta = baseline_meta(hosts.rollout, eval_hosts.rollout)
    policy.save(end, data_position=position, extra=policy.extra, meta=meta, force=True)
    policy.ckpt.wait()
    bar.close()
    writer.close()
    if end == total:
        _maybe_export(config, policy)
    return policy


def baseline_meta(rollout: Any, eval_rollout: Any) -> dict[str, Any]:
    """Checkpoint meta holding both baseline caches (training and evaluation), so a resumed run scores
    every problem against the same p0 and baseline lengths as an uninterrupted one."""
    return {"baseline_cache": {"train": rollout.baseline_state(), "eval": eval_rollout.baseline_state()}}


def restore_baselines(meta: dict[str, Any], rollout: Any, eval_rollout: Any) -> None:
    """Loads the caches written by ``baseline_meta`` (no-op for a fresh run)."""
    caches = meta.get("baseline_cache", {})
    rollout.load_baseline_state(caches.get("train", {}))
    eval_rollout.load_baseline_state(caches.get("eval", {}))


def rollout_source(hosts, timed_student, timed_teacher, train, order, policy, config) -> RolloutSource:
    """The loop's ``RolloutSource``: rounds of ``HostRollout.run`` with per-phase timings, on-policy
    weight pushes (or pushes of a weight snapshot when ``grpo.max_staleness`` > 0)."""

    def run(problems, seed_step):
        timed_student.pop(), timed_teacher.pop()
        t = time.perf_counter()
        local, everything = hosts.run(problems, seed_step)  # this host's share; all shares
        return (
            local,
            everything,
            phase_times(timed_student.pop(), timed_teacher.pop(), time.perf_counter() - t),
        )

    def push(params):
        push_weights(timed_teacher, policy) if params is None else timed_teacher.update_weights(params)

    settings = SourceSettings.from_config(config)
    if (settings.max_staleness > 0 or settings.dynamic_sampling) and distributed.process_count() > 1:
        raise ValueError(
            "--config.grpo.max_staleness > 0 (async rollouts) and --config.grpo.dynamic_sampling run on one "
            "process only (per-host shares of a step are fixed by the learner batch layout)"
        )
    return RolloutSource(
        run, lambda k: [train[i] for i in order.take(k)], lambda: dict(order.position), push,
        lambda: copy_params(policy.params), settings,
    )  # fmt: skip


def problem_order(problems: Sequence[Any], seed: int, shuffle: bool, position: dict) -> Any:
    """``WeightedOrder`` when the problems carry sampling weights (v1 ``bandit_weight``), else ``EpochOrder``."""
    weights = [getattr(p, "weight", None) for p in problems]
    if weights and all(w is not None for w in weights):
        return WeightedOrder(weights, seed, position)
    return EpochOrder(len(problems), seed, shuffle, position)


def push_weights(teacher: Engine, policy: Policy) -> None:
    """Points ``teacher`` at the current params.

    The JAX sampler reads the (possibly multi-host sharded) params in place and samples on the training
    mesh. Other engines (vLLM) read every tensor on the host: in a multi-process run each host first
    gets a full copy (``distributed.gather_to_host``, a collective, once per push).
    """
    inner = teacher.inner if isinstance(teacher, _Timed) else teacher
    if distributed.process_count() > 1 and not isinstance(inner, JaxSampler):
        teacher.update_weights(distributed.gather_to_host(policy.params))
    else:
        teacher.update_weights(policy.params)


def _evaluate(
    config, hosts: host_rollout.HostRollout, teacher: Engine, policy: Policy, problems, writer, step
) -> dict:
    """Runs the protocol on up to ``eval.num_problems`` held-out problems; logs ``eval/*`` and samples."""
    if not problems:
        return {}
    push_weights(teacher, policy)
    chosen = list(problems)[: int(config.eval.num_problems)]
    # A step offset disjoint from training seeds.
    _, batch = hosts.run(chosen, 10_000_000 + step, count_work=False)
    writer.write_samples(step, episode_samples(batch, int(config.logging.num_samples)))
    return {f"eval/{k}": v for k, v in rollout_metrics(batch).items()}


def run_grpo(config: Any, *, init_path: str | None = None) -> Policy:
    """``job == "grpo"``: problems, policy (resumed if a checkpoint exists) and engines from the config."""
    from atlas_jax.data.loading import train_eval_split
    from atlas_jax.data.rl import load_problems

    d = config.data
    fields = dict(problem_field=d.problem_field, answer_field=d.answer_field, id_field=d.id_field)
    problems = load_problems(d.rl_path, weight_field=d.weight_field, **fields)
    if d.eval_path:
        train = problems
        evals = load_problems(d.eval_path, weight_field="", **fields)
    else:
        train, evals = train_eval_split(problems, float(d.eval_fraction), int(config.seed))
    g = config.grpo
    policy = make_policy(
        config, learning_rate=float(g.learning_rate), total_steps=int(g.num_steps) * int(g.num_iterations),
        extra_init=GRPOLearner.extra_init(float(g.beta)), init_path=init_path,
    )  # fmt: skip
    teacher = rl_setup.teacher_engine(config, policy)
    student = rl_setup.student_engine(config)
    try:
        return train_grpo(config, train, evals, teacher, student, policy)
    finally:
        teacher.close()
        student.close()
