"""The generation server's HTTP app (FastAPI) around one engine serving a teacher or a student.

Endpoints (JSON unless noted):

* ``GET /health`` -> ``{"status", "role", "model", "weight_version"}``.
* ``POST /generate`` ``{"prompts": [str | [int]], "n", "temperature", "top_p", "top_k", "max_tokens",
  "stop_token_ids", "stop_strings", "seed"}`` -> ``{"completions": [[{prompt_ids, token_ids, text,
  logprobs, finish_reason}]]}`` (prompt-major, ``n`` per prompt; ``engines.base`` conventions).
* ``POST /update_weights`` (token): body ``application/octet-stream`` = safetensors bytes of
  HF-named tensors (``weight_sync.serialize``), or JSON ``{"path": HF folder}``. Names and shapes are
  checked before anything is loaded. -> ``{"loaded", "weight_version"}``.
* ``POST /reset_prefix_cache`` (token).
* ``POST /weight_transfer/{init,update}`` (token): vLLM's NCCL weight transfer (GPU clusters), see
  ``NcclWeightTransfer``.
* ``POST /v1/completions``, ``POST /v1/chat/completions``: an OpenAI-compatible subset (for
  ``OpenAIEngine`` and other clients); ``"return_tokens_as_token_ids": true`` makes logprob tokens
  ``"token_id:<id>"`` as vLLM's server does (``server_openai``).

Security (docs/reliability.md): mutating endpoints need ``Authorization: Bearer <token>``; without a
header the answer is 401, with a wrong token 403 (compared in constant time), and a server started
without a token refuses them all (403). Bodies above the limits get 413 before they are read in full;
more than ``max_inflight`` requests at once get 503; a path-based update must lie inside
``weights_root`` (``server_guards``).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from atlas_jax.engines import weight_sync
from atlas_jax.engines.base import Completion, SamplingParams
from atlas_jax.engines.server_guards import ConcurrencyLimit, json_object, resolve_weights_path
from atlas_jax.engines.server_openai import add_openai_routes
from converters.mapping import MappingError

MiB = 1 << 20


class GenerateRequest(BaseModel):
    prompts: list[str | list[int]]
    n: int = Field(1, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop_token_ids: list[int] = []
    stop_strings: list[str] = []
    seed: int | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop_token_ids=tuple(self.stop_token_ids),
            stop_strings=tuple(self.stop_strings),
            seed=self.seed,
        )


class NcclWeightTransfer:
    """Seam for vLLM's NCCL weight transfer (trainer GPUs -> vLLM GPUs, no HTTP payload).

    vLLM 0.32 ships it (``vllm.distributed.weight_transfer``, start vLLM with
    ``weight_transfer_config={"backend": "nccl"}``): the trainer opens NCCL rank 0 and every vLLM
    worker joins (``init``); each update is ``start_weight_update`` -> ``update_weights(update_info)``
    (names/dtypes/shapes; tensors arrive by NCCL broadcast) -> ``finish_weight_update``. A JAX
    trainer drives rank 0 out of band with an ``ncclUniqueId`` (see vLLM's ``NCCLTrainerInitInfo``).
    This class only forwards the control messages to the engine's workers; it cannot run on CPU and
    is not exercised by the CPU test suite.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def init(self, init_info: dict[str, Any]) -> None:
        self.engine.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def update(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.engine.collective_rpc("start_weight_update")
        try:
            self.engine.collective_rpc("update_weights", kwargs={"update_info": update_info})
        finally:
            self.engine.collective_rpc("finish_weight_update")
        self.engine.reset_prefix_cache()


class BodyLimit:
    """ASGI middleware: 413 for bodies above a per-path limit, checked before and while reading."""

    def __init__(self, app: Any, limits: dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reject_413(send, limit)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await _reject_413(send, limit)


class _TooLarge(Exception):
    pass


async def _reject_413(send: Any, limit: int) -> None:
    body = f'{{"detail": "request body larger than {limit} bytes"}}'.encode()
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def completion_json(c: Completion) -> dict[str, Any]:
    return {
        "prompt_ids": c.prompt_ids,
        "token_ids": c.token_ids,
        "text": c.text,
        "logprobs": c.logprobs,
        "finish_reason": c.finish_reason,
    }


def create_app(
    engine: Any,
    *,
    role: str = "student",
    token: str | None = None,
    max_weights_bytes: int = 4096 * MiB,
    max_json_bytes: int = 16 * MiB,
    model_name: str = "atlas",
    weights_root: str | None = None,
    max_inflight: int = 64,
    max_sequences: int = 4096,
    max_new_tokens: int = 32768,
) -> FastAPI:
    """Builds the app around ``engine`` (a ``VLLMEngine`` or any engine with the same weight methods).

    Args:
      engine: serves ``generate``; weight endpoints need ``load_hf_tensors``, ``load_hf_dir``,
        ``reset_prefix_cache`` (and ``collective_rpc`` for NCCL transfer).
      role: "teacher" or "student" (reported by /health).
      token: shared secret for mutating endpoints; None disables them.
      max_weights_bytes: body limit of /update_weights.
      max_json_bytes: body limit of every other endpoint.
      model_name: the ``model`` field of OpenAI-style answers.
      weights_root: ``/update_weights {"path"}`` may only name folders inside it (None: path updates refused).
      max_inflight: requests served at once; more get 503 (``server_guards.ConcurrencyLimit``).
      max_sequences: most ``len(prompts) * n`` completions one request may ask for (else 422).
      max_new_tokens: largest ``max_tokens`` a request may ask for (else 422).
    """
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    app = FastAPI(title=f"atlas-jax {role} server")
    lock = threading.Lock()  # vLLM's LLM is not thread-safe; FastAPI runs sync routes in threads.
    state = {"weight_version": 0}
    nccl = NcclWeightTransfer(engine)

    def locked(fn: Any, *args: Any) -> Any:
        """Runs ``fn`` holding the engine lock (called in a worker thread, never on the event loop)."""
        with lock:
            return fn(*args)

    def authorize(request: Request) -> None:
        if token is None:
            raise HTTPException(
                403, "mutating endpoints are disabled: the server was started without a token"
            )
        header = request.headers.get("authorization")
        if header is None:
            raise HTTPException(401, "missing 'Authorization: Bearer <token>' header")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "invalid token")

    def run_generate(prompts: Sequence[Any], params: SamplingParams, n: int) -> list[list[Completion]]:
        if len(prompts) * n > max_sequences or params.max_tokens > max_new_tokens:
            raise HTTPException(
                422, f"at most {max_sequences} completions (prompts x n) and max_tokens <= {max_new_tokens}"
            )
        try:
            with lock:
                return engine.generate(prompts, params, n)
        except ValueError as e:
            raise HTTPException(422, str(e)) from e

    def sampling(**kw: Any) -> SamplingParams:
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise HTTPException(422, str(e)) from e

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "role": role,
            "model": str(getattr(engine, "model_dir", model_name)),
            "weight_version": state["weight_version"],
        }

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict[str, Any]:
        try:
            params = req.sampling()
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        outs = run_generate(req.prompts, params, req.n)
        return {"completions": [[completion_json(c) for c in group] for group in outs]}

    @app.post("/update_weights")
    async def update_weights(request: Request) -> dict[str, Any]:
        authorize(request)
        body = await request.body()
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            if kind == "application/json":
                path = resolve_weights_path(json_object(body).get("path"), weights_root)
                loaded = await run_in_threadpool(locked, engine.load_hf_dir, path)
            elif kind == "application/octet-stream":
                tensors = await run_in_threadpool(weight_sync.deserialize, body)
                loaded = await run_in_threadpool(locked, engine.load_hf_tensors, tensors)
            else:
                raise HTTPException(
                    415, "send application/octet-stream (safetensors) or application/json {path}"
                )
        except (MappingError, ValueError, FileNotFoundError) as e:
            raise HTTPException(422, str(e)) from e
        state["weight_version"] += 1
        return {"loaded": loaded, "weight_version": state["weight_version"]}

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache(request: Request) -> dict[str, Any]:
        authorize(request)
        with lock:
            engine.reset_prefix_cache()
        return {"ok": True}

    if hasattr(engine, "collective_rpc"):  # only engines with workers to drive (vLLM)

        @app.post("/weight_transfer/init")
        async def weight_transfer_init(request: Request) -> dict[str, Any]:
            authorize(request)
            info = json_object(await request.body())
            await run_in_threadpool(locked, nccl.init, info)
            return {"ok": True}

        @app.post("/weight_transfer/update")
        async def weight_transfer_update(request: Request) -> dict[str, Any]:
            authorize(request)
            info = json_object(await request.body())
            await run_in_threadpool(locked, nccl.update, info)
            state["weight_version"] += 1
            return {"ok": True, "weight_version": state["weight_version"]}

    add_openai_routes(app, run_generate, sampling, engine, model_name)
    app.add_middleware(BodyLimit, limits={"/update_weights": max_weights_bytes}, default=max_json_bytes)
    app.add_middleware(ConcurrencyLimit, max_inflight=max_inflight)  # outermost: rejects before reading
    return app
