"""OpenAI-compatible routes of the generation server: ``/v1/completions`` and ``/v1/chat/completions``.

A subset of the OpenAI API (extra request fields are ignored): prompt(s) as text or token ids,
``n``, ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``logprobs``, plus vLLM's
``top_k``, ``stop_token_ids`` and ``return_tokens_as_token_ids`` (logprob tokens as
``"token_id:<id>"``). Generation goes through the same engine and lock as ``/generate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from atlas_jax.engines.base import Completion, SamplingParams


class CompletionsRequest(BaseModel):
    """OpenAI ``/v1/completions`` subset (extra fields are ignored)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None
    top_k: int = 0  # vLLM extension
    stop_token_ids: list[int] = []  # vLLM extension
    return_tokens_as_token_ids: bool = False


class ChatRequest(BaseModel):
    """OpenAI ``/v1/chat/completions`` subset (extra fields are ignored)."""

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_k: int = 0  # vLLM extension
    stop_token_ids: list[int] = []  # vLLM extension
    return_tokens_as_token_ids: bool = False


def add_openai_routes(
    app: FastAPI,
    run_generate: Callable[..., list[list[Completion]]],
    sampling: Callable[..., SamplingParams],
    engine: Any,
    model_name: str,
) -> None:
    """Registers the /v1 routes on ``app``.

    Args:
      app: the server app.
      run_generate: ``(prompts, SamplingParams, n) -> completions`` under the engine lock (422 on bad input).
      sampling: builds ``SamplingParams`` from keywords (422 on bad values).
      engine: for its ``tokenizer`` (chat template, token strings).
      model_name: the ``model`` field of the answers.
    """

    @app.post("/v1/completions")
    def completions(req: CompletionsRequest) -> dict[str, Any]:
        prompts = _openai_prompts(req.prompt)
        params = sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_tokens,
            top_k=req.top_k,
            stop_token_ids=tuple(req.stop_token_ids),
            stop_strings=_stops(req.stop),
            seed=req.seed,
        )
        outs = run_generate(prompts, params, req.n)
        choices = []
        for group in outs:
            for c in group:
                choice: dict[str, Any] = {
                    "index": len(choices),
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                }
                if req.logprobs is not None:
                    choice["logprobs"] = {
                        "tokens": _token_strings(engine, c.token_ids, req.return_tokens_as_token_ids),
                        "token_logprobs": c.logprobs,
                    }
                choices.append(choice)
        return _openai_envelope("text_completion", model_name, choices, outs)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        try:
            prompt = engine.tokenizer.apply_chat_template(
                req.messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja / template errors
            raise HTTPException(422, f"cannot apply the chat template to messages: {e}") from e
        params = sampling(
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_completion_tokens or req.max_tokens or 128,
            top_k=req.top_k,
            stop_token_ids=tuple(req.stop_token_ids),
            stop_strings=_stops(req.stop),
            seed=req.seed,
        )
        outs = run_generate([prompt], params, req.n)
        choices = []
        for c in outs[0]:
            choice: dict[str, Any] = {
                "index": len(choices),
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            if req.logprobs:
                toks = _token_strings(engine, c.token_ids, req.return_tokens_as_token_ids)
                choice["logprobs"] = {
                    "content": [{"token": t, "logprob": lp} for t, lp in zip(toks, c.logprobs, strict=True)]
                }
            choices.append(choice)
        return _openai_envelope("chat.completion", model_name, choices, outs)


def _openai_prompts(prompt: Any) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _token_strings(engine: Any, ids: list[int], as_ids: bool) -> list[str]:
    if as_ids:
        return [f"token_id:{t}" for t in ids]
    return list(engine.tokenizer.convert_ids_to_tokens(ids))


def _openai_envelope(
    obj: str, model: str, choices: list[dict], outs: list[list[Completion]]
) -> dict[str, Any]:
    prompt_tokens = sum(len(g[0].prompt_ids) for g in outs if g)
    completion_tokens = sum(len(c.token_ids) for g in outs for c in g)
    return {
        "id": f"atlas-{time.time_ns()}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
