"""The SFT learner: completion-only cross-entropy on tokenised teacher rows, with eval loss.

``train_sft(config, train, eval)`` runs ``config.sft`` optimiser steps (or epochs) over
``SFTExample``s, each step one exact-accumulated batch of ``sft.batch_size`` rows; it resumes from
``<output_dir>/checkpoints`` (params, optimiser, step, RNG, data position) and logs to
``metrics.jsonl`` + TensorBoard. ``run_sft(config)`` loads the tokenizer and data from the config first.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from atlas_jax import distributed
from atlas_jax.training import batching, train_step
from atlas_jax.training.logprobs import sequence_logprobs
from atlas_jax.training.losses import sft_loss
from atlas_jax.training.nan_guard import NonFiniteMonitor
from atlas_jax.training.preemption import StopSignal
from atlas_jax.training.runtime import Policy, export_policy_hf, make_policy
from atlas_jax.training.writers import MetricsWriter, PhaseTimer, progress_bar


def sft_loss_fn(chunk: int) -> train_step.LossFn:
    """``loss_fn(model, batch)`` for SFT rows (optionally packed with ``segment_ids``)."""

    def fn(model, mb):
        lp = sequence_logprobs(
            model,
            mb["tokens"],
            mb["attention_mask"],
            mb["positions"],
            chunk=chunk,
            segment_ids=mb.get("segment_ids"),
        )
        s, d = sft_loss(lp, mb["loss_mask"])
        return s, d, {"tokens": d}

    return fn


def packing_supported(model_cls: Any) -> bool:
    """Packing needs segment-aware attention: ``hidden_states(..., segment_ids=...)``."""
    return "segment_ids" in inspect.signature(model_cls.hidden_states).parameters


class EpochOrder:
    """Seeded example order over epochs; ``position`` ({"epoch", "index"}) is checkpointed for resume."""

    def __init__(self, n: int, seed: int, shuffle: bool, position: dict | None = None) -> None:
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = int((position or {}).get("epoch", 0))
        self.index = int((position or {}).get("index", 0))
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def _perm(self) -> np.ndarray:
        if self._cached is None or self._cached[0] != self.epoch:
            perm = (
                np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else None
            )
            self._cached = (self.epoch, np.arange(self.n) if perm is None else perm)
        return self._cached[1]

    def peek(self) -> int:
        """The next example index, without taking it."""
        return int(self._perm()[self.index])

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            perm = self._perm()
            j = min(self.n, self.index + k - len(out))
            out.extend(int(i) for i in perm[self.index : j])
            self.index = j
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def _arrays(examples: Sequence[Any], sc: Any, pad_rows_to: int, pad_id: int) -> dict[str, np.ndarray]:
    ids = [e.input_ids for e in examples]
    masks = [e.completion_mask for e in examples]
    if sc.packing:
        out = batching.pack_rows(ids, masks, max_length=int(sc.max_length), pad_id=pad_id)
        extra = batching.round_up(len(out["tokens"]), pad_rows_to) - len(out["tokens"])
        return {k: np.pad(v, ((0, extra), (0, 0))) for k, v in out.items()}
    return batching.sft_arrays(
        ids, masks, max_length=int(sc.max_length), pad_rows_to=pad_rows_to, pad_id=pad_id
    )


def take_step_examples(order: EpochOrder, lengths: Sequence[int], sc: Any) -> list[int]:
    """Example indices of the next step.

    Unpacked: the next ``sft.batch_size`` examples. Packed: as many next examples as ``batching.FirstFit``
    places into ``sft.batch_size`` rows of ``sft.max_length`` tokens (the first one that does not fit is left
    for the next step), so a packed step is always ``[batch_size, max_length]``: one compile, no empty rows.
    """
    if not sc.packing:
        return order.take(int(sc.batch_size))
    packer = batching.FirstFit(int(sc.max_length), max_bins=int(sc.batch_size))
    taken: list[int] = []
    while packer.add(i := order.peek(), int(lengths[i])):
        taken.extend(order.take(1))
    return taken


def sft_total_steps(config: Any, num_examples: int, lengths: Sequence[int] | None = None) -> int:
    """``sft.num_steps``, else the steps of ``sft.num_epochs`` epochs (packed: counted by replaying the packer)."""
    sc = config.sft
    if sc.num_steps > 0:
        return int(sc.num_steps)
    budget = num_examples * float(sc.num_epochs)
    if not sc.packing or lengths is None:
        return max(1, math.ceil(budget / int(sc.batch_size)))
    order = EpochOrder(num_examples, int(config.seed), bool(config.data.shuffle))
    steps = seen = 0
    while seen < budget:
        seen += len(take_step_examples(order, lengths, sc))
        steps += 1
    return max(1, steps)


def evaluate(
    policy: Policy, eval_fn: Any, examples: Sequence[Any], config: Any, pad_id: int
) -> dict[str, float]:
    """Token-mean eval loss over up to ``sft.eval_batches`` batches."""
    sc = config.sft
    s = d = 0.0
    for b in range(int(sc.eval_batches)):
        chunk = examples[b * int(sc.batch_size) : (b + 1) * int(sc.batch_size)]
        if not chunk:
            break
        arrays = _arrays(chunk, sc, int(sc.batch_size), pad_id)
        out = jax.device_get(eval_fn(policy.params, distributed.shard_global_batch(arrays, policy.mesh)))
        s, d = s + float(out["loss_sum"]), d + float(out["denominator"])
    return {"eval/loss": s / max(d, 1.0), "eval/tokens": d}


def train_sft(
    config: Any,
    train: Sequence[Any],
    eval_examples: Sequence[Any] = (),
    *,
    pad_id: int = 0,
    init_path: str | None = None,
) -> Policy:
    """Runs (or resumes) SFT; returns the trained ``Policy``. See the module docstring."""
    sc = config.sft
    lengths = [len(e.input_ids) for e in train]
    total = sft_total_steps(config, len(train), lengths)
    policy = make_policy(
        config, learning_rate=float(sc.learning_rate), total_steps=total, init_path=init_path
    )
    if sc.packing:
        from atlas_jax.models.decoder import Decoder

        if not packing_supported(Decoder):
            raise ValueError(
                "--config.sft.packing=True needs segment-aware attention (Decoder.hidden_states(segment_ids=...)), "
                "which this model does not have; set --config.sft.packing=False"
            )
    num_micro = int(sc.batch_size) // int(sc.micro_batch_size)
    loss_fn = sft_loss_fn(int(config.grpo.logprob_chunk))
    shardings = train_step.state_shardings(policy.tx, policy.params, policy.mesh)
    step_fn = train_step.make_train_step(
        policy.graphdef,
        policy.rest,
        policy.tx,
        loss_fn,
        num_micro=num_micro,
        mesh=policy.mesh,
        shardings=shardings,
    )
    eval_fn = train_step.make_eval_fn(
        policy.graphdef,
        policy.rest,
        loss_fn,
        num_micro=num_micro,
        mesh=policy.mesh,
        param_shardings=shardings.params,
    )
    order = EpochOrder(len(train), int(config.seed), bool(config.data.shuffle), policy.data_position)
    writer = MetricsWriter(
        config.output_dir, tensorboard=bool(config.logging.tensorboard), resume_step=policy.start_step
    )
    bar = progress_bar(total, policy.start_step, "sft", bool(config.logging.progress_bar))
    timer = PhaseTimer()
    pending: tuple[int, Any, dict] | None = None
    eval_every = int(sc.eval_every)
    t_last = time.perf_counter()
    end, stop_after = total, int(config.checkpoint.stop_after_steps)
    rel = config.reliability
    monitor = NonFiniteMonitor(int(rel.max_nonfinite_steps))
    stop = StopSignal(enabled=bool(rel.handle_signals)).install()
    for step in range(policy.start_step, total):
        with timer("data"):
            arrays = _arrays(
                [train[i] for i in take_step_examples(order, lengths, sc)], sc, int(sc.batch_size), pad_id
            )
        with timer("update"):
            # Every host built the same global batch; each feeds the rows on its devices.
            policy.state, metrics = step_fn(policy.state, distributed.shard_global_batch(arrays, policy.mesh))
        # Metrics of step s are fetched after step s+1 is dispatched: the host never waits on the device.
        if pending is not None:
            _log(writer, *pending, monitor=monitor)
        now = time.perf_counter()
        info = {"lr": float(policy.schedule(step)), "time/step": now - t_last, **timer.pop()}
        info["tokens_per_s"] = float(arrays["attention_mask"].sum()) / max(now - t_last, 1e-9)
        t_last = now
        pending = (step + 1, metrics, info)
        if eval_every and (step + 1) % eval_every == 0 and eval_examples:
            pending[2].update(evaluate(policy, eval_fn, eval_examples, config, pad_id))
        policy.save(step + 1, data_position=order.position)
        bar.update(1)
        if (stop_after and step + 1 - policy.start_step >= stop_after) or stop.should_stop():
            end = step + 1
            break
    stop.close()
    finished = end == total
    if pending is not None:
        if finished and eval_examples and not (eval_every and pending[0] % eval_every == 0):
            pending[2].update(evaluate(policy, eval_fn, eval_examples, config, pad_id))
        _log(writer, *pending, monitor=monitor)
    policy.save(end, data_position=order.position, force=True)
    policy.ckpt.wait()
    bar.close()
    writer.close()
    if finished:
        _maybe_export(config, policy)
    return policy


def _log(writer: MetricsWriter, step: int, metrics: Any, info: dict, monitor: NonFiniteMonitor) -> None:
    m = jax.device_get(metrics)
    keys = ("loss", "grad_norm", "tokens", "skipped")
    writer.write(step, {**{k: m[k] for k in keys}, **info})
    monitor.observe(step, m)  # after the record is written: the skipped step shows in metrics.jsonl


def _maybe_export(config: Any, policy: Policy) -> None:
    """HF export of the final params when ``checkpoint.export_hf_dir`` is set (see ``export_policy_hf``)."""
    if config.checkpoint.export_hf_dir:
        tok = config.model.tokenizer or config.model.teacher or None
        export_policy_hf(policy, config.checkpoint.export_hf_dir, tokenizer_src=tok)


def run_sft(config: Any) -> Policy:
    """``job == "sft"``: loads the tokenizer and SFT rows named by the config, then ``train_sft``."""
    from transformers import AutoTokenizer

    from atlas_jax.data.loading import train_eval_split
    from atlas_jax.data.sft import load_sft_examples
    from atlas_jax.training.rl_setup import templates_from_config

    tok_dir = config.model.tokenizer or config.model.teacher
    if not tok_dir:
        raise ValueError("SFT needs a tokenizer: set --config.model.tokenizer or --config.model.teacher")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    templates = templates_from_config(config)
    examples = load_sft_examples(
        config.data.sft_path, tokenizer, templates=templates, max_length=int(config.sft.max_length)
    )
    if config.data.eval_path:
        train = examples
        evals = load_sft_examples(
            config.data.eval_path, tokenizer, templates=templates, max_length=int(config.sft.max_length)
        )
    else:
        train, evals = train_eval_split(examples, float(config.data.eval_fraction), int(config.seed))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return train_sft(config, train, evals, pad_id=int(pad))
