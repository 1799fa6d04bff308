"""An engine that splits large calls into row-bounded chunks, so the inner engine's KV cache stays bounded.

The JAX sampler allocates its KV cache for the whole call: ``rows × (prompt bucket + max_tokens bucket)``
positions, ``rows = bucket(prompts) · n``. ``RowChunked(engine, max_rows)`` sends at most ``c`` prompts per
inner call, ``c`` the largest power of two with ``c · n <= max_rows`` (at least 1, so one prompt's ``n``
samples are never split), which keeps every chunk in one compiled bucket and the cache at
``max_rows × L × 2 × layers × kv_heads × head_dim`` elements at most.

Seeds: chunk ``j`` samples with ``seed + j · CHUNK_SEED_STRIDE`` (mod 2³¹), so chunks draw independent
streams and a fixed seed still reproduces the call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams

CHUNK_SEED_STRIDE = 1_000_003


def prompts_per_chunk(max_rows: int, n: int) -> int:
    """Largest power of two ``c >= 1`` with ``c · n <= max_rows``."""
    c = 1
    while 2 * c * n <= max_rows:
        c *= 2
    return c


class RowChunked(Engine):
    """Wraps ``inner``; ``generate`` runs at most ``max_rows`` rows (prompts × n) per inner call.

    Raises:
      ValueError: ``max_rows < 1``.
    """

    def __init__(self, inner: Engine, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"RowChunked: max_rows must be >= 1, got {max_rows}")
        self.inner, self.max_rows = inner, int(max_rows)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        c = prompts_per_chunk(self.max_rows, n)
        if len(prompts) <= c:
            return self.inner.generate(prompts, params, n)
        out: list[list[Completion]] = []
        for j, start in enumerate(range(0, len(prompts), c)):
            p = params
            if params.seed is not None:
                seed = (params.seed + j * CHUNK_SEED_STRIDE) % 2**31
                p = dataclasses.replace(params, seed=seed)
            out.extend(self.inner.generate(prompts[start : start + c], p, n))
        return out

    def update_weights(self, params: Any) -> None:
        self.inner.update_weights(params)

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    def close(self) -> None:
        self.inner.close()
