"""Client engine for one or more ``launch.serve`` generation servers (see ``server_app``).

A batch of prompts is split into contiguous chunks, one per server, sent concurrently and
reassembled in order; the first server of each call rotates (round robin), so single-prompt calls
spread too. Seeds are offset per chunk so that the samples equal what one server would return for
the whole batch. Connection failures and 502/503/504 answers are retried with exponential backoff;
the error after the last try names the server's URL. ``update_weights`` pushes our params (as
safetensors bytes of HF-named tensors) to every server.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from collections.abc import Sequence
from typing import Any

import httpx

from atlas_jax.engines import http_retry, weight_sync
from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams

TOKEN_ENV = "ATLAS_SERVER_TOKEN"
_RETRY_STATUS = (502, 503, 504)


class ServerError(RuntimeError):
    """A server could not be reached or refused a request; the message names its URL."""


class ServerEngine(Engine):
    """Engine backed by generation servers.

    Args:
      urls: base URLs, e.g. ``["http://127.0.0.1:8000"]``.
      token: shared secret for weight updates (default: env ``ATLAS_SERVER_TOKEN``).
      timeout: seconds for one request (read/write); generation of a large batch must fit.
      connect_timeout: seconds to establish a connection.
      retries: extra attempts after a connection failure or a 502/503/504.
      backoff: first retry delay in seconds, doubled each retry.
      model_config: the served model's ``ModelConfig``; needed by ``update_weights``.
      tokenizer: an HF tokenizer or folder (the ``tokenizer`` property); optional, the servers
        tokenize and decode themselves.

    Raises:
      ValueError: no URL, or a URL without http(s) scheme.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 600.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        model_config: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("ServerEngine: urls is empty")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"ServerEngine: url {u!r} must start with http:// or https://")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.retries, self.backoff = retries, backoff
        self.model_config = model_config
        self._tokenizer = tokenizer
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self._rr = itertools.count()

    # ------------------------------------------------------------------------------------------- http
    def _request(self, url: str, method: str, path: str, **kw: Any) -> Any:
        return http_retry.request_json(
            self._client, method, url + path, retries=self.retries, backoff=self.backoff,
            retry_status=_RETRY_STATUS, error=ServerError, detail=_detail,
            exhausted=lambda attempts, secs, last: (
                f"server {url} unreachable ({method} {path}): {attempts} attempts in {secs:.1f}s, "
                f"last error: {last}"
            ),
            **kw,
        )  # fmt: skip

    def _auth(self) -> dict[str, str]:
        if not self.token:
            raise ServerError(f"weight updates need a token: pass token= or set {TOKEN_ENV}")
        return {"Authorization": f"Bearer {self.token}"}

    def _each(self, fn: Any) -> list[Any]:
        """Runs ``fn(url)`` for every server concurrently; results in ``self.urls`` order."""
        with concurrent.futures.ThreadPoolExecutor(len(self.urls)) as pool:
            return list(pool.map(fn, self.urls))

    # --------------------------------------------------------------------------------------- sampling
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError("ServerEngine was created without tokenizer=; the servers tokenize themselves")
        if isinstance(self._tokenizer, str | os.PathLike):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer))
        return self._tokenizer

    def health(self) -> dict[str, Any]:
        """``/health`` of every server, by URL."""
        return dict(zip(self.urls, self._each(lambda u: self._request(u, "GET", "/health")), strict=True))

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """See ``Engine.generate``; the batch is spread over the servers.

        Raises:
          ServerError: a server is down (after retries) or rejected the request (e.g. 422 for a bad
            prompt); the message names the server.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if not prompts:
            return []
        k = min(len(self.urls), len(prompts))
        first = next(self._rr) % len(self.urls)
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        jobs = [(self.urls[(first + i) % len(self.urls)], bounds[i], bounds[i + 1]) for i in range(k)]

        def run(job: tuple[str, int, int]) -> list[list[Completion]]:
            url, lo, hi = job
            body = {
                "prompts": prompts[lo:hi],
                "n": n,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
                "max_tokens": params.max_tokens,
                "stop_token_ids": list(params.stop_token_ids),
                "stop_strings": list(params.stop_strings),
                "seed": None if params.seed is None else params.seed + (params.row_offset + lo) * n,
            }
            out = self._request(url, "POST", "/generate", json=body)
            return _completions(out, url, hi - lo, n)

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            parts = list(pool.map(run, jobs))
        return [group for part in parts for group in part]

    # ---------------------------------------------------------------------------------------- weights
    def update_weights(self, params: Any) -> list[int]:
        """Pushes our params to every server (validated against ``model_config`` before sending).

        Returns:
          Each server's new ``weight_version``.

        Raises:
          ValueError: the engine has no ``model_config``.
          converters.mapping.MappingError: params do not match ``model_config``.
          ServerError: a server is down or refused (401/403 token, 413 too large, 422 bad tensors).
        """
        if self.model_config is None:
            raise ValueError(
                "ServerEngine.update_weights needs model_config= (the served model's ModelConfig)"
            )
        headers = self._auth()
        payload = weight_sync.serialize(
            weight_sync.hf_tensors(weight_sync.flat_params(params), self.model_config)
        )
        headers["Content-Type"] = "application/octet-stream"
        outs = self._each(
            lambda u: self._request(u, "POST", "/update_weights", content=payload, headers=headers)
        )
        return [int(o["weight_version"]) for o in outs]

    def update_weights_from_path(self, path: str | os.PathLike[str]) -> list[int]:
        """Makes every server load an HF folder it can read (shared filesystem)."""
        headers = self._auth()
        body = {"path": os.fspath(path)}
        outs = self._each(lambda u: self._request(u, "POST", "/update_weights", json=body, headers=headers))
        return [int(o["weight_version"]) for o in outs]

    def reset_prefix_cache(self) -> None:
        headers = self._auth()
        self._each(lambda u: self._request(u, "POST", "/reset_prefix_cache", headers=headers))

    def close(self) -> None:
        self._client.close()


def _completions(out: Any, url: str, num_prompts: int, n: int) -> list[list[Completion]]:
    """``/generate``'s answer as completions; a ``ServerError`` naming ``url`` if it is malformed."""
    try:
        groups = [[Completion(**c) for c in group] for group in out["completions"]]
        ok = len(groups) == num_prompts and all(len(g) == n for g in groups)
        ok = ok and all(len(c.token_ids) == len(c.logprobs) for g in groups for c in g)
    except (KeyError, TypeError) as e:
        raise ServerError(
            f"server {url} returned a malformed /generate answer ({type(e).__name__}: {e})"
        ) from e
    if not ok:
        raise ServerError(
            f"server {url} returned a malformed /generate answer: expected {num_prompts} groups of {n} "
            "completions with one logprob per token"
        )
    return groups


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", r.text))[:500]
    except ValueError:
        return r.text[:500]
