"""Host-side batch building: ragged token lists → padded numpy arrays with fixed, bucketed shapes.

Shapes are rounded up to buckets so the jitted step compiles a handful of times, not once per batch.

GRPO rows: ``tokens = [left-padded prompt (P) | right-padded completion (C)]`` where P is the longest
prompt rounded up to ``prompt_bucket`` and C is the completion budget (fixed for the run). The attention
mask is 1 on real tokens; positions count from 0 at each row's first prompt token.

SFT rows: right-padded ``tokens[B,T]`` with a ``loss_mask`` (1 on target tokens), or packed rows
(several examples per row) with ``segment_ids`` (0 = padding) and positions restarting per example.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def round_up(n: int, bucket: int) -> int:
    """Smallest multiple of ``bucket`` that is ≥ max(n, 1)."""
    return -(-max(n, 1) // bucket) * bucket


def grpo_arrays(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    sampler_logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float],
    *,
    completion_len: int,
    prompt_bucket: int = 64,
    pad_rows_to: int = 1,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Pads teacher samples into the GRPO layout.

    Args:
      prompt_ids: exact prompt ids each completion was sampled from (one list per row).
      completion_ids: sampled ids (≤ ``completion_len`` each).
      sampler_logprobs: engine log-prob per completion token.
      advantages: one per row.
      completion_len: C, the completion budget (static for the run).
      prompt_bucket: P is rounded up to a multiple of this.
      pad_rows_to: the number of rows is padded up to a multiple of this with empty rows
        (``completion_mask`` all 0, advantage 0), which add nothing to any loss.
      pad_id: token id written into padding (never attended to, never scored).

    Returns:
      ``tokens, attention_mask, positions`` ``[B, P+C]`` int32; ``completion_mask`` ``[B, C]`` float32;
      ``sampler_logprobs`` ``[B, C]`` float32; ``advantages`` ``[B]`` float32.

    Raises:
      ValueError: a completion longer than ``completion_len``, a logprob list of the wrong length, an
        empty prompt, or mismatched row counts.
    """
    n = len(prompt_ids)
    if not (len(completion_ids) == len(sampler_logprobs) == len(advantages) == n):
        raise ValueError(
            "prompt_ids, completion_ids, sampler_logprobs and advantages must have one entry per row"
        )
    p = round_up(max((len(x) for x in prompt_ids), default=1), prompt_bucket)
    c = completion_len
    b = round_up(n, pad_rows_to)
    tokens = np.full((b, p + c), pad_id, np.int32)
    attn = np.zeros((b, p + c), np.int32)
    cmask = np.zeros((b, c), np.float32)
    lps = np.zeros((b, c), np.float32)
    adv = np.zeros((b,), np.float32)
    for i, (pr, co, lp, a) in enumerate(
        zip(prompt_ids, completion_ids, sampler_logprobs, advantages, strict=True)
    ):
        if not pr:
            raise ValueError(f"row {i}: empty prompt")
        if len(co) > c:
            raise ValueError(f"row {i}: completion of {len(co)} tokens exceeds the budget {c}")
        if len(lp) != len(co):
            raise ValueError(f"row {i}: {len(lp)} sampler logprobs for {len(co)} completion tokens")
        tokens[i, p - len(pr) : p] = pr
        tokens[i, p : p + len(co)] = co
        attn[i, p - len(pr) : p + len(co)] = 1
        cmask[i, : len(co)] = 1.0
        lps[i, : len(co)] = lp
        adv[i] = a
    positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return {
        "tokens": tokens,
        "attention_mask": attn,
        "positions": positions,
        "completion_mask": cmask,
        "sampler_logprobs": lps,
        "advantages": adv,
    }


def sft_arrays(
    input_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    *,
    max_length: int,
    length_bucket: int = 64,
    pad_rows_to: int = 1,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Right-pads SFT rows; rows longer than ``max_length`` keep their last ``max_length`` tokens.

    Returns:
      ``tokens, attention_mask, positions`` ``[B, T]`` int32 and ``loss_mask`` ``[B, T]`` float32
      (``loss_mask[t] = 1`` means token t is a target, predicted from tokens before it).
    """
    if len(input_ids) != len(loss_masks):
        raise ValueError("input_ids and loss_masks must have one entry per row")
    rows = [
        (list(x)[-max_length:], list(m)[-max_length:]) for x, m in zip(input_ids, loss_masks, strict=True)
    ]
    t = min(round_up(max((len(x) for x, _ in rows), default=1), length_bucket), round_up(max_length, 8))
    b = round_up(len(rows), pad_rows_to)
    tokens = np.full((b, t), pad_id, np.int32)
    attn = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.float32)
    for i, (x, m) in enumerate(rows):
        if len(x) != len(m):
            raise ValueError(f"row {i}: {len(x)} tokens but {len(m)} loss-mask entries")
        tokens[i, : len(x)] = x
        attn[i, : len(x)] = 1
        mask[i, : len(x)] = m
    mask[:, 0] = 0.0  # the first token has no context to be predicted from
    positions = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "attention_mask": attn, "positions": positions, "loss_mask": mask}


class FirstFit:
    """Greedy first-fit bin packing: each item goes into the first bin with room for it, else a new bin.

    Items longer than ``capacity`` count as ``capacity`` (they are cut to it when packed). With ``max_bins``,
    ``add`` refuses (returns False, changes nothing) an item that would need one bin more than that.
    """

    def __init__(self, capacity: int, max_bins: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"packing capacity must be >= 1, got {capacity}")
        self.capacity, self.max_bins = capacity, max_bins
        self.bins: list[list[int]] = []
        self.free: list[int] = []

    def add(self, key: int, length: int) -> bool:
        """Places item ``key`` of ``length`` tokens; False if it needs a bin beyond ``max_bins``."""
        if length < 1:
            raise ValueError(f"row {key}: empty example (0 tokens) cannot be packed")
        n = min(length, self.capacity)
        for j, free in enumerate(self.free):
            if free >= n:
                self.bins[j].append(key)
                self.free[j] -= n
                return True
        if self.max_bins is not None and len(self.bins) >= self.max_bins:
            return False
        self.bins.append([key])
        self.free.append(self.capacity - n)
        return True


def pack_rows(
    input_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    *,
    max_length: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Greedy first-fit (``FirstFit``) packing of SFT examples into rows of exactly ``max_length`` tokens.

    Each example is kept whole, except one longer than ``max_length``, which keeps its last ``max_length``
    tokens (as ``sft_arrays`` does) and fills a row alone.

    Returns:
      the ``sft_arrays`` fields ``[R, max_length]`` plus ``segment_ids`` (1, 2, … per example in a row,
      0 = padding); positions restart at 0 for each example and each example's first token is not a target.

    Raises:
      ValueError: an example with 0 tokens, or a loss mask whose length differs from its example's.
    """
    if len(input_ids) != len(loss_masks):
        raise ValueError("input_ids and loss_masks must have one entry per row")
    packer = FirstFit(max_length)
    for i, (x, m) in enumerate(zip(input_ids, loss_masks, strict=True)):
        if len(x) != len(m):
            raise ValueError(f"row {i}: {len(x)} tokens but {len(m)} loss-mask entries")
        packer.add(i, len(x))
    b = len(packer.bins)
    out = {
        "tokens": np.full((b, max_length), pad_id, np.int32),
        "attention_mask": np.zeros((b, max_length), np.int32),
        "positions": np.zeros((b, max_length), np.int32),
        "loss_mask": np.zeros((b, max_length), np.float32),
        "segment_ids": np.zeros((b, max_length), np.int32),
    }
    for r, members in enumerate(packer.bins):
        at = 0
        for seg, i in enumerate(members, start=1):
            x, m = list(input_ids[i])[-max_length:], list(loss_masks[i])[-max_length:]
            sl = slice(at, at + len(x))
            out["tokens"][r, sl] = x
            out["attention_mask"][r, sl] = 1
            out["positions"][r, sl] = np.arange(len(x))
            out["loss_mask"][r, sl] = m
            out["loss_mask"][r, at] = 0.0  # an example's first token has no context to be predicted from
            out["segment_ids"][r, sl] = seg
            at += len(x)
    return out
