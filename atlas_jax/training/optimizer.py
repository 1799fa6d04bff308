"""The optimiser: AdamW with a warm-up + constant/cosine schedule and global-norm clipping.

Gradient accumulation is *not* done here (``optax.MultiSteps`` would average per-micro-batch means,
which is wrong for token-mean losses); ``train_step`` sums loss numerators, denominators and
gradients over micro-batches and hands the optimiser one exact gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    """Everything the optimiser needs (built from ``config.optim`` + the learner's rate and length).

    Attributes:
      learning_rate: peak rate after warm-up.
      total_steps: optimiser updates in the run (the cosine horizon).
      schedule: "constant" or "cosine" after warm-up.
      warmup_steps: linear warm-up length from 0 to the peak.
      min_lr_ratio: cosine floor as a fraction of the peak.
      weight_decay: decoupled AdamW decay, applied to matrices only (ndim ≥ 2), not norms/biases.
      b1, b2, eps: Adam moments.
      max_grad_norm: global-norm clip; 0 disables.
    """

    learning_rate: float
    total_steps: int
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES} (--config.optim.schedule)"
            )
        if self.total_steps < 1:
            raise ValueError(
                f"the run must have at least one optimiser step, got total_steps={self.total_steps}"
            )
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warm-up ({self.warmup_steps} steps) must be within the run ({self.total_steps} steps): "
                "lower --config.optim.warmup_steps / warmup_ratio"
            )


def spec_from_config(optim_cfg: Any, learning_rate: float, total_steps: int) -> OptimSpec:
    """Builds an ``OptimSpec`` from the ``optim`` config section (warm-up ratio resolved to steps)."""
    warmup = int(optim_cfg.warmup_steps) or round(float(optim_cfg.warmup_ratio) * total_steps)
    return OptimSpec(
        learning_rate=float(learning_rate),
        total_steps=int(total_steps),
        schedule=str(optim_cfg.schedule),
        warmup_steps=int(warmup),
        min_lr_ratio=float(optim_cfg.min_lr_ratio),
        weight_decay=float(optim_cfg.weight_decay),
        b1=float(optim_cfg.b1),
        b2=float(optim_cfg.b2),
        eps=float(optim_cfg.eps),
        max_grad_norm=float(optim_cfg.max_grad_norm),
    )


def make_schedule(spec: OptimSpec) -> optax.Schedule:
    """``lr(s) = peak·s/W`` for ``s < W``; then constant, or cosine from peak to ``min_lr_ratio·peak``."""
    peak = spec.learning_rate
    decay_steps = max(spec.total_steps - spec.warmup_steps, 1)
    if spec.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=spec.min_lr_ratio)
    else:
        after = optax.constant_schedule(peak)
    if spec.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak, spec.warmup_steps)
    return optax.join_schedules([warm, after], [spec.warmup_steps])


def _stacked_layer_param(path: tuple[Any, ...]) -> bool:
    """The parameter carries a leading stacked-layer axis (``layers/...`` of the scanned decoder)."""
    keys = [str(getattr(k, "key", "")) for k in path]
    return any(k == "layers" or k.startswith("layers/") for k in keys)


def _decay_mask(params: Any) -> Any:
    """True for matrices: ndim >= 2 per layer (a stacked ``layers/...`` tensor ``[L, ...]`` counts one less)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - _stacked_layer_param(path) >= 2, params)


def make_optimizer(spec: OptimSpec) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(clip → AdamW chain, schedule)``; the schedule is also used to log the rate."""
    schedule = make_schedule(spec)
    parts = []
    if spec.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(spec.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay, mask=_decay_mask
        )
    )
    return optax.chain(*parts), schedule
