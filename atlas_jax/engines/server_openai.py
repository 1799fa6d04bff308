"""OpenAI-compatible routes of the generation server: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

A subset of the OpenAI API (extra request fields are ignored): prompt(s) as text or token ids,
``n``, ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``logprobs``, ``stream``, plus vLLM's
``top_k``, ``stop_token_ids`` and ``return_tokens_as_token_ids`` (logprob tokens as
``"token_id:<id>"``). Generation goes through the same engine and lock as ``/generate``.

``GET /v1/models`` lists the one served model. ``stream=true`` answers with server-sent events in the
OpenAI chunk format (``data: {chunk}`` lines, then ``data: [DONE]``), but *buffered*: the completion is
generated in full first and then sent as one content chunk per choice plus a final chunk with its
``finish_reason`` (the engines here generate whole batches, not token by token). The response header
``x-atlas-stream: buffered`` says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
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
    stream: bool = False
    top_k: int = 0  # vLLM extension
    stop_token_ids: list[TokenId] = []  # vLLM extension
    return_tokens_as_token_ids: bool = False


# Token ids as the engines take them (int32); anything else is a 422, not an overflow deep in the sampler.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class ChatMessage(BaseModel):
    """One chat message: a role and its text (extra fields are ignored)."""

    role: str
    content: str


class ChatRequest(BaseModel):
    """OpenAI ``/v1/chat/completions`` subset (extra fields are ignored)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    stream: bool = False
    top_k: int = 0  # vLLM extension
    stop_token_ids: list[TokenId] = []  # vLLM extension
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
    add_models_route(app, model_name)

    @app.post("/v1/completions", response_model=None)
    def completions(req: CompletionsRequest) -> dict[str, Any] | StreamingResponse:
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
        body = _openai_envelope("text_completion", model_name, choices, outs)
        return sse_response(body) if req.stream else body

    @app.post("/v1/chat/completions", response_model=None)
    def chat(req: ChatRequest) -> dict[str, Any] | StreamingResponse:
        try:
            prompt = engine.tokenizer.apply_chat_template(
                [m.model_dump() for m in req.messages], tokenize=False, add_generation_prompt=True
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
        body = _openai_envelope("chat.completion", model_name, choices, outs)
        return sse_response(body) if req.stream else body


def add_models_route(app: FastAPI, model_name: str) -> None:
    """``GET /v1/models`` (and ``/v1/models/{id}``): the one model this server answers as."""
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "atlas-jax"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise HTTPException(404, f"model {model_id!r} not found; this server serves {model_name!r}")
        return card


def stream_chunks(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A whole completion/chat answer as OpenAI stream chunks: one content chunk per choice, then one
    chunk per choice with its ``finish_reason`` and no content (usage on the last one)."""
    chat = body["object"] == "chat.completion"
    head = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"]}  # fmt: skip
    for c in body["choices"]:
        if chat:
            delta = {"role": "assistant", "content": c["message"]["content"]}
            choice = {"index": c["index"], "delta": delta, "finish_reason": None}
            if "logprobs" in c:
                choice["logprobs"] = c["logprobs"]
        else:
            choice = {
                "index": c["index"],
                "text": c["text"],
                "finish_reason": None,
                "logprobs": c.get("logprobs"),
            }
        yield {**head, "choices": [choice]}
    for i, c in enumerate(body["choices"]):
        end = {"index": c["index"], "finish_reason": c["finish_reason"]}
        end.update({"delta": {}} if chat else {"text": "", "logprobs": None})
        last = i == len(body["choices"]) - 1
        yield {**head, "choices": [end], **({"usage": body["usage"]} if last and "usage" in body else {})}


def sse_response(body: dict[str, Any]) -> StreamingResponse:
    """``body`` (a finished completion or chat answer) as a buffered server-sent-event stream."""

    def events() -> Iterator[str]:
        for chunk in stream_chunks(body):
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-atlas-stream": "buffered"})


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
