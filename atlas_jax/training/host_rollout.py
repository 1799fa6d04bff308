"""Per-host GRPO rollouts: every process rolls out its own share of a step's problems.

The learner batch is ``[P·G, …]`` rows, problem-major, split over the mesh axes ``("data", "fsdp")``. The
process whose devices hold rows ``[lo·G, hi·G)`` rolls out problems ``[lo, hi)`` of the step — its
baseline, probe and taught student calls, its answer checks and rewards — builds those rows itself and
feeds them into the global array (``distributed.to_global_array``, i.e. ``make_array_from_process_local_data``).
No host repeats another's student work, and no host's floats need to equal another's.

Equal to one process (same global batch and seed):

* sampling: each phase's call is seeded from where this host's prompts start in the concatenation of all
  shares (``TwoPassRollout(row_offsets=…)`` and ``SamplingParams.row_offset``, one all-gather of a count per
  phase), so the shares draw exactly the samples one call for the whole step draws;
* a JAX teacher on the training mesh is one SPMD program over every host: the teacher call all-gathers
  the shares' prompts, samples the whole step once and hands each host its rows (``GlobalTeacher``);
* the baseline cache: new entries are exchanged after every rollout, so every host holds the cache one
  process would hold (the data position is global too: every host walks the same seeded order), and
  a resume may use a different host count;
* rollout metrics and saved episodes: the shares' batches are all-gathered (host values, a few hundred
  KB per step at seed scale) and summarised as one batch;
* learner rows: the prompt width is the global maximum (one more all-gather), so the global array equals
  the one a single process builds.

Hosts that are replicas along the batch axes (e.g. tensor parallelism across hosts) get the same share;
they compute it twice and ``distributed.assert_same_on_all_hosts(group=share)`` checks they agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from atlas_jax import distributed
from atlas_jax.data.rl import Problem
from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams
from atlas_jax.protocol.batch import RolloutBatch, RolloutSettings
from atlas_jax.protocol.rollout import TwoPassRollout


def process_shares(
    mesh: Mesh, problems: int, group_size: int, batch_axes: Sequence[str] = distributed.BATCH_AXES
) -> list[tuple[int, int]]:
    """``(lo, hi)``: the problems each process rolls out (index = process), from the learner batch layout.

    Raises:
      ValueError: a process's rows are not one contiguous run of whole problem groups (the message says
        which ``--config.grpo`` / ``--config.mesh`` values to change).
    """
    rows = problems * group_size
    distributed.host_local_batch(rows, mesh, batch_axes)  # checks that the rows split over the mesh
    index_map = NamedSharding(mesh, PartitionSpec(tuple(batch_axes))).devices_indices_map((rows,))
    by_process: dict[int, set[int]] = {}
    for device, idx in index_map.items():
        sl = idx[0]
        by_process.setdefault(device.process_index, set()).update(range(sl.start or 0, sl.stop or rows))
    shares = []
    for p in range(jax.process_count()):
        held = sorted(by_process.get(p, ()))
        lo, hi = held[0], held[-1] + 1
        if held != list(range(lo, hi)) or lo % group_size or hi % group_size:
            raise ValueError(
                f"process {p} holds learner rows {held[:8]}… of {rows} = grpo.problems_per_step {problems} × "
                f"grpo.num_generations {group_size}: per-host rollouts need each host's rows to be one run "
                "of whole problem groups. Make --config.grpo.problems_per_step a multiple of the number of "
                "hosts and keep each host's devices together along --config.mesh.shape's (data, fsdp) axes"
            )
        shares.append((lo // group_size, hi // group_size))
    return shares


def mask_rows(arrays: dict[str, np.ndarray], masked: Sequence[bool]) -> None:
    """Zeroes ``completion_mask`` of the masked rows (row i = episode i): they add nothing to the loss."""
    rows = [i for i, m in enumerate(masked) if m]
    if rows:
        arrays["completion_mask"][rows] = 0.0


def even_bounds(n: int, count: int, index: int) -> tuple[int, int]:
    """Share ``index`` of ``count`` near-equal contiguous shares of ``n`` items (the larger ones first)."""
    base, extra = divmod(n, count)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


class _ShareGroups:
    """Which share each process computes; helpers to combine per-process values share by share."""

    def __init__(self, shares: Sequence[tuple[int, int]]) -> None:
        order = sorted(set(shares))
        self.share_of = [order.index(s) for s in shares]  # process -> share index (ascending rows)
        self.count = len(order)
        self.leaders = [self.share_of.index(i) for i in range(self.count)]  # first process of each share
        self.index = self.share_of[distributed.process_index()]

    def per_share(self, per_process: Sequence[Any]) -> list[Any]:
        return [per_process[p] for p in self.leaders]

    def offset(self, count: int) -> int:
        """Where this share's ``count`` items start in the concatenation of all shares' (a collective)."""
        if distributed.process_count() == 1:
            return 0
        counts = self.per_share(distributed.all_gather_objects(int(count)))
        return int(sum(counts[: self.index]))


class GlobalTeacher(Engine):
    """A teacher whose sampler is one program over every host (the JAX sampler on the training mesh).

    ``generate`` all-gathers the shares' prompts, samples them in one call (the same call on every
    process, as the SPMD program requires) and returns this host's rows.
    """

    def __init__(self, inner: Engine, groups: _ShareGroups) -> None:
        self.inner, self.groups = inner, groups

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        shares = self.groups.per_share(distributed.all_gather_objects([list(p) for p in prompts]))
        start = sum(len(s) for s in shares[: self.groups.index])
        everything = [p for s in shares for p in s]
        out = self.inner.generate(everything, dataclasses.replace(params, row_offset=0), n)
        return out[start : start + len(prompts)]

    def update_weights(self, params: Any) -> None:
        self.inner.update_weights(params)

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer


class _Counted(Engine):
    """Counts this host's student work: calls, prompts and generated tokens."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.calls = self.prompts = self.tokens = 0
        self.enabled = True

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        out = self.inner.generate(prompts, params, n)
        if not self.enabled:
            return out
        self.calls += 1
        self.prompts += len(prompts)
        self.tokens += sum(len(c.token_ids) for group in out for c in group)
        return out

    def update_weights(self, params: Any) -> None:
        self.inner.update_weights(params)

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    def pop(self) -> tuple[int, int, int]:
        out = (self.calls, self.prompts, self.tokens)
        self.calls = self.prompts = self.tokens = 0
        return out


def student_mesh(mesh: Mesh) -> Mesh | None:
    """The mesh a per-host JAX student samples on: this host's devices (None on one process: the default).

    A student on the global mesh would be one SPMD program over every host, which per-host shares (each
    host asks different prompts, and skips a phase it has nothing for) cannot drive.
    """
    if distributed.process_count() == 1:
        return None
    from atlas_jax.models.sharding import make_mesh

    local = [d for d in mesh.devices.flat if d.process_index == distributed.process_index()]
    return make_mesh((1, len(local), 1), devices=local)


def spans_hosts(engine: Any) -> bool:
    """True for an engine that samples on a mesh with devices of several processes (a JAX sampler)."""
    while hasattr(engine, "inner"):
        engine = engine.inner
    mesh = getattr(engine, "mesh", None)
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def pad_prompt_columns(
    arrays: dict[str, np.ndarray], prompt_len: int, completion_len: int
) -> dict[str, np.ndarray]:
    """Widens the ``[prompt | completion]`` layout's left-padded prompt part to ``prompt_len`` columns.

    The result equals ``batching.grpo_arrays`` run with that (global) prompt width: the new columns are
    padding (token 0, attention 0, position 0) on the left of every row.
    """
    width = arrays["tokens"].shape[1]
    extra = prompt_len + completion_len - width
    if extra < 0:
        raise ValueError(f"rows already have {width - completion_len} prompt columns > {prompt_len}")
    if extra == 0:
        return arrays
    out = dict(arrays)
    for k in ("tokens", "attention_mask", "positions"):
        out[k] = np.pad(arrays[k], ((0, 0), (extra, 0)))
    return out


class HostRollout:
    """The step's rollout on this host's share, and the global views built from all shares.

    Args:
      student, teacher: this host's engines (a ``GlobalTeacher`` wrapper is added for a mesh-wide sampler).
      settings: the protocol settings.
      mesh: the training mesh (its batch layout decides the shares).
      problems_per_step, group_size: P and G of the learner batch.
    """

    def __init__(
        self,
        student: Engine,
        teacher: Engine,
        settings: RolloutSettings,
        mesh: Mesh,
        problems_per_step: int,
        group_size: int,
    ) -> None:
        self.mesh, self.problems, self.group_size = mesh, problems_per_step, group_size
        self.shares = process_shares(mesh, problems_per_step, group_size)
        self.groups = _ShareGroups(self.shares)
        self.multi = distributed.process_count() > 1
        if self.multi and spans_hosts(student):
            raise ValueError(
                "the student engine samples on a mesh over several hosts: per-host rollouts need a student "
                "per host (build it with host_rollout.student_mesh(mesh))"
            )
        self.student = _Counted(student)
        if self.multi and spans_hosts(teacher):
            teacher = GlobalTeacher(teacher, self.groups)
        self.rollout = TwoPassRollout(
            self.student, teacher, settings, row_offsets=lambda phase, n: self.groups.offset(n)
        )

    def bounds(self, n: int) -> tuple[int, int]:
        """This host's problems of a list of ``n``: the learner share for a training step, else an even split."""
        if n == self.problems:
            return self.shares[distributed.process_index()]
        if n < self.groups.count:
            raise ValueError(
                f"{n} problems cannot be shared by {self.groups.count} hosts: use at least that many "
                "(--config.eval.num_problems)"
            )
        return even_bounds(n, self.groups.count, self.groups.index)

    def run(
        self, problems: Sequence[Problem], step: int, *, count_work: bool = True
    ) -> tuple[RolloutBatch, RolloutBatch]:
        """Rolls out this host's share of ``problems`` (``count_work``: add its student work to `work_metrics`).

        Returns:
          ``(local, everything)``: this host's batch, and the batch of every share in order (equal to
          what one process rolling out all ``problems`` returns; the same object as ``local`` on one host).
        """
        lo, hi = self.bounds(len(problems))
        cache = self.rollout.baseline_cache
        before = set(cache)
        self.student.enabled = count_work
        local = self.rollout.run(list(problems)[lo:hi], step)
        if not self.multi:
            return local, local
        new = {k: v for k, v in cache.items() if k not in before}
        gathered = self.groups.per_share(distributed.all_gather_objects((new, local)))
        for entries, _ in gathered:
            for k, v in entries.items():
                cache.setdefault(k, v)
        groups = [g for _, b in gathered for g in b.groups]
        hits, cut = (sum(getattr(b, k) for _, b in gathered) for k in ("baseline_cache_hits", "probes_cut"))
        return local, RolloutBatch(groups, hits, cut)

    def learner_batch(self, learner: Any, local: RolloutBatch, *, mask_truncated: bool = False) -> Any:
        """This host's learner rows as part of the global batch (host numpy on one process).

        ``mask_truncated``: rows of teacher completions cut by the token budget (finish reason "length")
        get an all-zero ``completion_mask``, so they add nothing to the loss (``grpo.mask_truncated``).
        """
        episodes = local.episodes
        arrays = learner.build_batch(
            [e.teacher_prompt_ids for e in episodes], [e.teacher_completion_ids for e in episodes],
            [e.teacher_logprobs for e in episodes], local.rewards(),
        )  # fmt: skip
        if mask_truncated:
            mask_rows(arrays, [e.teacher_finish_reason == "length" for e in episodes])
        if not self.multi:
            return arrays
        _check_per_host_learner(learner.spec, len(episodes), len(arrays["advantages"]))
        c = arrays["completion_mask"].shape[1]
        width = max(distributed.all_gather_objects(arrays["tokens"].shape[1] - c))
        arrays = pad_prompt_columns(arrays, width, c)
        if self.groups.count < distributed.process_count():  # replicas computed this share too
            distributed.assert_same_on_all_hosts(arrays, "the GRPO rows of a share", group=self.groups.index)
        return distributed.to_global_array(arrays, self.mesh, global_rows=self.problems * self.group_size)

    def work_metrics(self) -> dict[str, float]:
        """This step's student work on every host: ``student_{calls,prompts,tokens}/host<i>`` (a collective)."""
        counts = distributed.all_gather_objects(self.student.pop())
        out: dict[str, float] = {}
        for p, (calls, prompts, tokens) in enumerate(counts):
            out[f"student_calls/host{p}"] = float(calls)
            out[f"student_prompts/host{p}"] = float(prompts)
            out[f"student_tokens/host{p}"] = float(tokens)
        return out


def _check_per_host_learner(spec: Any, episodes: int, rows: int) -> None:
    """Learner settings whose per-host rows would differ from one process's: a clear error, not a silent drift.

    Batch-level reward scaling normalises over the whole step (a host sees only its share), and rows padded
    per host would not tile the global batch.
    """
    if getattr(spec, "scale_rewards", "group") == "batch":
        raise ValueError(
            "--config.grpo.scale_rewards=batch normalises over the whole step; per-host rollouts see one share "
            "(use 'group' with several processes)"
        )
    if rows != episodes:
        raise ValueError(
            f"this host's learner rows ({rows}) differ from its episodes ({episodes}): row padding per host "
            "does not tile the global batch with several processes"
        )
