"""The one interface every rollout engine implements.

Engines turn prompts (text or token ids) into sampled completions with the token ids, the decoded
text, the per-token log-probabilities of the sampled tokens and a finish reason. Engines that serve
the policy being trained also accept new weights through ``update_weights``.

Log-probability convention (all engines): ``logprobs[t] = log softmax(logits_t / T)[token_t]`` with
``T = temperature`` when ``temperature > 0`` and ``T = 1`` for greedy decoding, taken *before* top-k /
top-p truncation. That is the distribution the GRPO learner recomputes, so sampler and trainer
log-probabilities are comparable token by token.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

FinishReason = Literal["stop", "length"]
Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_p: nucleus mass kept (1.0 disables).
      top_k: number of highest-probability tokens kept (0 disables).
      max_tokens: maximum number of new tokens per completion.
      stop_token_ids: generation stops after emitting one of these (the token is kept in
        ``token_ids`` and ``finish_reason`` is "stop"). The tokenizer's EOS is added by engines.
      stop_strings: generation stops when the decoded completion contains one of these; the text
        (and ``token_ids``) are cut so that the stop string itself is not included.
      seed: base seed; a fixed seed gives the same samples for the same inputs.
      row_offset: this call's prompts are prompts ``row_offset, row_offset + 1, …`` of a larger batch
        (one host's share of it): prompt i is seeded as prompt ``row_offset + i`` would be in one call
        with the whole batch, so the shares' samples together equal that call's.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    row_offset: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.row_offset < 0:
            raise ValueError(f"SamplingParams.row_offset must be >= 0, got {self.row_offset}")


@dataclasses.dataclass
class Completion:
    """One sampled completion.

    Attributes:
      prompt_ids: the exact token ids the completion was conditioned on (after templating and
        tokenisation, without padding). The GRPO learner scores ``token_ids`` against these.
      token_ids: the sampled token ids (without padding; a trailing stop token is kept).
      text: the decoded completion (stop strings removed).
      logprobs: one float per entry of ``token_ids`` (see the module docstring).
      finish_reason: "stop" (stop token or stop string) or "length" (hit ``max_tokens``).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason


class Engine(abc.ABC):
    """A rollout engine. ``generate`` returns ``n`` completions per prompt, prompt-major."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """Samples ``n`` completions for each prompt.

        Args:
          prompts: text (tokenised by the engine's tokenizer, no special tokens added beyond what
            the text contains) or lists of token ids.
          params: sampling parameters shared by the whole batch.
          n: samples per prompt.

        Returns:
          ``result[i][j]`` is the j-th completion of prompt i.
        """

    def update_weights(self, params: Any) -> None:
        """Loads new policy weights (our parameter pytree). Engines that cannot, raise."""
        raise NotImplementedError(f"{type(self).__name__} does not serve a trainable policy")

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The HF tokenizer used to encode text prompts and decode completions."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources (processes, sockets, device memory)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
