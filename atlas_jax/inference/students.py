"""Whatever answers problems becomes an ``Engine``: a Python callable, an HTTP endpoint or a model folder.

``as_engine(source, role=...)`` accepts
* an ``Engine`` (returned as it is: ``JaxSampler``, ``VLLMEngine``, ``ServerEngine``, ``OpenAIEngine``, ...);
* a Python callable, wrapped in ``CallableStudent``: ``fn(prompt) -> str`` or ``fn(prompt, params) -> str``
  (``params`` is the ``SamplingParams``), or with ``batched=True`` ``fn(prompts) -> list[str]``;
* an ``http(s)://`` URL: an OpenAI-compatible API (``kind="openai"``: vLLM's own server, a hosted model,
  ``atlas-serve``'s ``/v1``) or our generation server (``kind="server"``: ``atlas-serve``'s ``/generate``,
  exact token ids and log-probs);
* a local folder (an HF model folder or an atlas-jax checkpoint), served by ``kind="jax"`` (the embedded
  sampler, default) or ``"vllm"`` through ``training.rl_setup.student_engine``, the engine factory the
  training jobs use.
Remote engines bound the requests in flight (``concurrency``), time out (``timeout`` seconds per request)
and retry connection failures, 429 and 5xx with exponential backoff (``retries``, ``backoff``).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams

KINDS = ("auto", "jax", "vllm", "server", "openai")


class StudentError(RuntimeError):
    """A student call failed after its retries (or timed out); the message says which prompt and why."""


class CallableStudent(Engine):
    """An ``Engine`` over a Python function that answers text prompts.

    Args:
      fn: ``fn(prompt) -> str``, ``fn(prompt, params) -> str``, or (``batched=True``) ``fn(prompts) -> list[str]``
        / ``fn(prompts, params) -> list[str]``.
      batched: ``fn`` takes the whole list of prompts.
      concurrency: calls of ``fn`` in flight (unbatched ``fn`` only; threads).
      timeout: seconds per call (None = no limit). A call that runs over raises ``StudentError`` (the
        thread running it is left to finish on its own: Python cannot stop it).
      retries: extra attempts after ``fn`` raised.
      backoff: first retry delay in seconds, doubled each retry.
      tokenizer: optional HF tokenizer for token counts (``Completion.token_ids``) and chat templates.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        batched: bool = False,
        concurrency: int = 8,
        timeout: float | None = None,
        retries: int = 0,
        backoff: float = 0.5,
        tokenizer: Any = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.fn, self.batched = fn, batched
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self._tokenizer = tokenizer
        try:
            positional = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            ]
            self._with_params = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)
        except (TypeError, ValueError):  # builtins without a signature
            self._with_params = False
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _call(self, arg: Any, params: SamplingParams, what: str) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            future = (
                self._pool.submit(self.fn, arg, params)
                if self._with_params
                else self._pool.submit(self.fn, arg)
            )
            try:
                return future.result(timeout=self.timeout)
            except concurrent.futures.TimeoutError:
                last = f"no answer within {self.timeout} s"
            except Exception as e:  # the user's function: any error may pass on another try
                last = f"{type(e).__name__}: {e}"
        raise StudentError(f"student callable failed on {what} after {self.retries + 1} attempt(s): {last}")

    def _completion(self, prompt: Prompt, text: Any, params: SamplingParams) -> Completion:
        if not isinstance(text, str):
            raise StudentError(f"student callable must return str, got {type(text).__name__}")
        tok = self._tokenizer
        ids = list(tok.encode(text, add_special_tokens=False)) if tok is not None else []
        if isinstance(prompt, str):
            prompt_ids = list(tok.encode(prompt, add_special_tokens=False)) if tok is not None else []
        else:
            prompt_ids = [int(t) for t in prompt]
        finish = "length" if ids and len(ids) >= params.max_tokens else "stop"
        return Completion(prompt_ids=prompt_ids, token_ids=ids, text=text, logprobs=[], finish_reason=finish)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """Calls ``fn`` ``n`` times per prompt (or ``n`` times on the whole batch when ``batched``).

        Raises:
          StudentError: ``fn`` kept failing, timed out or returned something other than text.
          ValueError: a token-id prompt (callables take text).
        """
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError("CallableStudent takes text prompts, got token ids")
        texts: list[list[Any]] = [[None] * n for _ in prompts]
        if self.batched:
            for j in range(n):
                out = self._call(list(prompts), params, f"a batch of {len(prompts)} prompts")
                if not isinstance(out, list | tuple) or len(out) != len(prompts):
                    raise StudentError(
                        f"batched student callable must return {len(prompts)} texts, got {out!r:.200}"
                    )
                for i, t in enumerate(out):
                    texts[i][j] = t
        else:
            jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, max(len(jobs), 1))) as outer:
                results = outer.map(lambda ij: self._call(prompts[ij[0]], params, f"prompt {ij[0]}"), jobs)
                for (i, j), t in zip(jobs, results, strict=True):
                    texts[i][j] = t
        return [[self._completion(p, t, params) for t in row] for p, row in zip(prompts, texts, strict=True)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def first_model_id(base_url: str, *, api_key: str | None = None, timeout: float = 10.0) -> str:
    """The first ``id`` that ``GET {base_url}/models`` lists (what vLLM serves when no name is given).

    Raises:
      StudentError: the endpoint is unreachable or lists no model (names the URL).
    """
    import httpx

    url = base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout)
        r.raise_for_status()
        data = r.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise StudentError(
            f"GET {url} failed ({type(e).__name__}: {e}); pass the model name explicitly"
        ) from e
    if not data:
        raise StudentError(f"GET {url} lists no model; pass the model name explicitly")
    return str(data[0]["id"])


def as_engine(
    source: Any,
    *,
    role: str = "student",
    kind: str = "auto",
    model: str | None = None,
    mode: str = "completions",
    tokenizer: Any = None,
    api_key: str | None = None,
    concurrency: int = 8,
    timeout: float = 300.0,
    retries: int = 3,
    backoff: float = 0.5,
    seed: int = 0,
    mesh: Any = None,
    config: Any = None,
) -> Engine:
    """An ``Engine`` for ``source`` (see the module docstring).

    Args:
      source: an ``Engine``, a callable, a URL or a folder.
      role: "student" or "teacher": ``kind="auto"`` on a URL means "openai" for a student and "server"
        (``atlas-serve``) for a teacher.
      kind: one of ``KINDS``; "auto" picks by the source.
      model: the API's model name ("openai"; default: the first one ``/v1/models`` lists).
      mode: "completions" or "chat" ("openai" only).
      tokenizer: an HF tokenizer or folder (remote engines and callables: token counts; a teacher needs one).
      api_key, concurrency, timeout, retries, backoff: remote engines (and callables: concurrency, timeout,
        retries, backoff).
      seed: engine seed of a local folder ("jax" / "vllm").
      mesh: the JAX mesh of a "jax" engine (None = the default device).
      config: the run config whose ``model`` (dtypes) and ``engine`` sections a folder's engine uses
        (default: ``configs/base.py``'s, but in float32: a CPU-friendly, exact default).

    Raises:
      ValueError: unknown kind, or a folder that is neither an HF folder nor an atlas-jax checkpoint.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; choose one of {KINDS}")
    if isinstance(source, Engine):
        return source
    if callable(source):
        return CallableStudent(
            source,
            concurrency=concurrency,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            tokenizer=tokenizer,
        )
    source = str(source)
    if source.startswith(("http://", "https://")):
        if kind == "auto":
            kind = "openai" if role == "student" else "server"
        if kind == "openai":
            from atlas_jax.engines.openai_client import OpenAIEngine

            name = model or first_model_id(source, api_key=api_key)
            return OpenAIEngine(
                source, name, mode=mode, api_key=api_key, concurrency=concurrency, timeout=timeout,
                retries=retries, backoff=backoff, tokenizer=tokenizer,
            )  # fmt: skip
        if kind == "server":
            from atlas_jax.engines.server_client import ServerEngine

            return ServerEngine([u.strip() for u in source.split(",")], timeout=timeout, retries=retries,
                                backoff=backoff, tokenizer=tokenizer)  # fmt: skip
        raise ValueError(f"{source}: a URL needs kind 'openai' or 'server', got {kind!r}")
    path = Path(source)
    if not ((path / "config.json").is_file() or (path / "model_config.json").is_file()):
        raise ValueError(
            f"{source}: not an HF model folder (config.json) or an atlas-jax checkpoint (model_config.json), "
            "and not an http(s):// URL"
        )
    kind = "jax" if kind == "auto" else kind
    if kind not in ("jax", "vllm"):
        raise ValueError(f"{source}: a folder is served by kind 'jax' or 'vllm', got {kind!r}")
    from atlas_jax.training import rl_setup

    if config is None:
        from configs.base import get_config

        c = get_config()
        c.model.compute_dtype = "float32"
    else:
        c = config.copy_and_resolve_references()
    c.seed = int(seed)
    c.engine.student = kind
    c.model.student = str(path)
    engine = rl_setup.student_engine(c, mesh)
    return engine
