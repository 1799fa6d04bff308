"""JAX's share of accelerator memory when vLLM runs in the same process (set before JAX initialises).

XLA reserves ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of every device's memory (default 0.75) when its backend
starts. vLLM then checks that ``gpu_memory_utilization`` of the device is still free, so the two must add up
to at most the card: ``fraction + Σ utilisation <= 1``. This module only computes and sets environment
variables and never imports JAX (it must run before JAX does).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"
HEADROOM = 0.05  # of the card left to CUDA contexts, NCCL buffers and torch's allocator


def jax_memory_env(fraction: float, preallocate: bool, vllm_shares: Sequence[float]) -> dict[str, str]:
    """The XLA memory variables for a run.

    Args:
      fraction: JAX's share of each device; 0 = automatic: ``1 - HEADROOM - Σ vllm_shares`` when vLLM
        engines run in this process, otherwise JAX's own default (nothing set).
      preallocate: reserve the share up front (JAX's default); False sets ``PREALLOCATE=false`` (JAX then
        grows on demand up to the share, slower, fragments more).
      vllm_shares: ``gpu_memory_utilization`` of each in-process vLLM engine.

    Returns:
      ``{name: value}`` to put in ``os.environ``.

    Raises:
      ValueError: the shares leave no memory for JAX, or an explicit fraction is outside (0, 1).
    """
    env: dict[str, str] = {}
    if fraction < 0 or fraction >= 1:
        raise ValueError(f"--config.engine.jax_memory_fraction={fraction} must be in [0, 1) (0 = automatic)")
    if fraction == 0 and vllm_shares:
        fraction = 1.0 - HEADROOM - float(sum(vllm_shares))
        if fraction <= 0.05:
            raise ValueError(
                f"--config.engine.gpu_memory_utilization={list(vllm_shares)} leaves {fraction:.2f} of the "
                "accelerator to JAX; lower it"
            )
    if fraction:
        env[FRACTION_ENV] = f"{fraction:.3f}"
    if not preallocate:
        env[PREALLOCATE_ENV] = "false"
    return env


def apply_env(env: Mapping[str, str], *, overwrite: bool) -> None:
    """Sets ``env`` in ``os.environ`` (``overwrite=False``: a variable the user exported wins).

    Warns when JAX's backend already started: the variables then have no effect in this process.
    """
    for k, v in env.items():
        if overwrite or k not in os.environ:
            os.environ[k] = v
    if env and "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            log.warning("%s set after JAX initialised its devices: it has no effect in this process", env)
