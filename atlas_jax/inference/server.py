"""The teaching server (FastAPI): a trained teacher over HTTP, alone or with its student as one model.

Endpoints (JSON):

* ``GET /health`` -> ``{"status", "role": "teacher", "model", "student"}``.
* ``GET /v1/models`` -> the one model (``model_name``): teacher + configured student.
* ``POST /v1/teach`` ``{"problem": str | "problems": [str | {"question", "answer"?, "id"?}], "probe"? | "probes"?,
  "answer": false, "baseline": false, "student"?: {"base_url", "model"?, "mode"?, "api_key"?}}`` ->
  ``{"results": [TeachResult]}`` (``inference.teacher``). The guidance is ``results[i]["teaching"]``
  ("" = the teacher stays out of the way). Without ``probe(s)`` the student writes them; the student is the
  one in the request, else the configured one. Students named in requests make this server call other
  servers, so they are refused (403) unless it was started with ``allow_request_students=True``.
* ``POST /v1/chat/completions`` (OpenAI-compatible): the last user message is the problem; the configured
  student is probed, taught and answers; the answer is the assistant message. ``n`` must be 1; ``stream=true``
  gives buffered server-sent events (``engines.server_openai.sse_response``). The teaching is in the extra
  field ``"atlas": {"teaching", "probe", "stayed_out", "tokens", "seconds"}``. Sampling fields (temperature,
  max_tokens, ...) are ignored: the protocol's settings decide (documented in docs/inference.md).

Errors are JSON ``{"error": {"message", "type", "code"}, "detail"}`` (OpenAI's shape and FastAPI's).
Auth: with ``api_key`` set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (what OpenAI
clients send) - 401 without, 403 with a wrong key. At most ``max_pending`` requests wait or run at once (503
beyond); teaching itself runs one request at a time (the engines are not thread-safe).
"""

from __future__ import annotations

import hmac
import threading
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from atlas_jax.engines.server_openai import add_models_route, sse_response
from atlas_jax.inference.students import StudentError, as_engine
from atlas_jax.inference.teacher import AdaptiveTeacher


class StudentSpec(BaseModel):
    """An OpenAI-compatible student named in a request."""

    base_url: str
    model: str | None = None
    mode: str = "completions"
    api_key: str | None = None


class TeachRequest(BaseModel):
    problem: str | dict[str, Any] | None = None
    problems: list[str | dict[str, Any]] | None = None
    probe: str | None = None
    probes: list[str] | None = None
    answer: bool = False
    baseline: bool = False
    student: StudentSpec | None = None


class ChatRequest(BaseModel):
    """OpenAI ``/v1/chat/completions`` subset (other fields are accepted and ignored)."""

    model: str | None = None
    messages: list[dict[str, Any]]
    n: int = Field(1, ge=1)
    stream: bool = False


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def create_teach_app(
    teacher: AdaptiveTeacher,
    student: Any = None,
    *,
    model_name: str = "atlas-teacher",
    api_key: str | None = None,
    allow_request_students: bool = False,
    max_pending: int = 16,
    student_timeout: float = 300.0,
    student_retries: int = 3,
) -> FastAPI:
    """The app around ``teacher`` and the configured ``student`` (an ``Engine``, or None: then requests must
    name a student or give the probes)."""
    app = FastAPI(title="atlas-jax teaching server")

    @app.exception_handler(HTTPException)
    async def openai_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Errors in OpenAI's shape (``error.message``, what OpenAI clients show) and FastAPI's (``detail``)."""
        error = {"message": str(exc.detail), "type": "invalid_request_error", "code": exc.status_code}
        return JSONResponse({"error": error, "detail": exc.detail}, status_code=exc.status_code)

    work = threading.Lock()
    pending = threading.BoundedSemaphore(max_pending)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise HTTPException(401, "missing 'Authorization: Bearer <api key>' header")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(403, "invalid api key")

    def run(problems: list[Any], who: Any, **kw: Any) -> list[dict[str, Any]]:
        if not pending.acquire(blocking=False):
            raise HTTPException(503, f"busy: {max_pending} requests already pending; retry later")
        try:
            with work:
                results = teacher.teach(problems, who, **kw)
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        except (StudentError, RuntimeError) as e:  # remote students: APIError / ServerError are RuntimeErrors
            raise HTTPException(502, f"student failed: {e}") from e
        finally:
            pending.release()
        return [r.to_json() for r in results]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "role": "teacher", "model": model_name, "student": student is not None}

    add_models_route(app, model_name)

    @app.post("/v1/teach")
    def teach(req: TeachRequest, request: Request) -> dict[str, Any]:
        authorize(request)
        if (req.problem is None) == (req.problems is None):
            raise HTTPException(422, "give exactly one of 'problem' and 'problems'")
        problems = [req.problem] if req.problem is not None else list(req.problems or [])
        probes = [req.probe] if req.probe is not None else req.probes
        who: Any = student
        if req.student is not None:
            if not allow_request_students:
                raise HTTPException(
                    403, "this server does not call students named in requests (start it with "
                    "--allow_request_students to allow it); omit 'student' to use the configured one",
                )  # fmt: skip
            try:
                who = as_engine(req.student.base_url, kind="openai", model=req.student.model,
                                mode=req.student.mode, api_key=req.student.api_key, timeout=student_timeout,
                                retries=student_retries)  # fmt: skip
            except (StudentError, ValueError) as e:
                raise HTTPException(502 if isinstance(e, StudentError) else 422, str(e)) from e
        if who is None and (probes is None or req.answer or req.baseline):
            raise HTTPException(422, "no student is configured: name one in 'student' or give 'probe(s)'")
        try:
            results = run(problems, who, answer=req.answer, baseline=req.baseline, probes=probes)
        finally:
            if req.student is not None:
                who.close()
        return {"model": model_name, "results": results}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(req: ChatRequest, request: Request) -> Any:
        authorize(request)
        if student is None:
            raise HTTPException(422, "this teaching server has no configured student to answer")
        if req.n != 1:
            raise HTTPException(422, "n must be 1 (one taught answer per request)")
        users = [m for m in req.messages if m.get("role") == "user"]
        problem = _message_text(users[-1]).strip() if users else ""
        if not problem:
            raise HTTPException(422, "messages need a user message with text content (the problem)")
        [r] = run([problem], student, answer=True)
        body = {
            "id": f"atlas-teach-{time.time_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": r["answer"] or ""},
                    "finish_reason": r["finish_reasons"].get("answer", "stop"),
                }
            ],
            "usage": _usage(r),
            "atlas": {k: r[k] for k in ("teaching", "probe", "stayed_out", "tokens", "seconds")},
        }
        return sse_response(body) if req.stream else body

    return app


def _usage(r: dict[str, Any]) -> dict[str, int]:
    """OpenAI usage: prompt = the teacher prompt, completion = probe + teaching + answer (what is known)."""
    t = r["tokens"]
    completion = sum(int(t.get(k) or 0) for k in ("probe", "teacher_completion", "answer"))
    prompt = int(t.get("teacher_prompt") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
