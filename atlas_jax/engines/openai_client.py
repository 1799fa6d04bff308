"""Client engine for OpenAI-compatible APIs (``/v1/completions`` or ``/v1/chat/completions``).

For students that are only reachable over an API (a hosted model, vLLM's OpenAI server, or our own
``launch.serve``). One HTTP request per prompt, at most ``concurrency`` in flight, retries with
exponential backoff on connection errors, 429 and 5xx.

What comes back depends on the API, and this engine returns what it gets without inventing data:

* ``logprobs``: the API's per-token log-probs (``token_logprobs`` / ``logprobs.content``); which
  distribution they come from (temperature applied or not, truncated or not) is the server's
  choice, so they need not follow ``engines.base``'s convention; empty if the API gives none.
* ``token_ids``: exact when the server returns tokens as ``"token_id:<id>"`` (vLLM's and our
  server's ``return_tokens_as_token_ids``, on by default); otherwise, with a ``tokenizer``, the
  re-tokenised text (an approximation); otherwise empty.
* ``prompt_ids``: the given token ids, or the tokenised text prompt when a ``tokenizer`` is given
  (in chat mode the template is applied server-side, so it stays empty).
* ``finish_reason``: "length" when the API says so, otherwise "stop".
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from atlas_jax.engines import http_retry
from atlas_jax.engines.base import Completion, Engine, Prompt, SamplingParams

_RETRY_STATUS = (429, 500, 502, 503, 504)


class APIError(RuntimeError):
    """The API could not be reached or answered with an error; the message names the URL."""


class OpenAIEngine(Engine):
    """Engine over an OpenAI-compatible HTTP API.

    Args:
      base_url: e.g. ``"http://127.0.0.1:8000/v1"``.
      model: the ``model`` field sent with each request.
      mode: "completions" (text or token-id prompts) or "chat" (text prompts, sent as one user message).
      api_key: bearer key (default: env ``OPENAI_API_KEY``; none sent if unset).
      concurrency: maximum requests in flight.
      timeout: seconds per request.
      retries: extra attempts on connection errors, 429 and 5xx.
      backoff: first retry delay in seconds, doubled each retry.
      tokenizer: optional HF tokenizer (object or folder) for prompt ids / approximate token ids.
      return_token_ids: ask for ``"token_id:<id>"`` tokens (vLLM extension; set False for APIs that
        reject unknown fields).
      extra_body: more fields merged into every request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        mode: Literal["completions", "chat"] = "completions",
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.5,
        tokenizer: Any = None,
        return_token_ids: bool = True,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("completions", "chat"):
            raise ValueError(f"mode must be 'completions' or 'chat', got {mode!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model, self.mode = model, mode
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.return_token_ids = return_token_ids
        self.extra_body = dict(extra_body or {})
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError("OpenAIEngine was created without tokenizer=")
        if isinstance(self._tokenizer, str | os.PathLike):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer))
        return self._tokenizer

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url + path
        return http_retry.request_json(
            self._client, "POST", url, json=body, retries=self.retries, backoff=self.backoff,
            retry_status=_RETRY_STATUS, error=APIError,
            exhausted=lambda tries, _, last: f"POST {url} failed after {tries} attempts, last error: {last}",
        )  # fmt: skip

    def _body(self, prompt: Prompt, params: SamplingParams, n: int, seed: int | None) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": self.model,
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        if seed is not None:
            body["seed"] = seed
        if params.top_k > 0:
            body["top_k"] = params.top_k  # vLLM extension
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)  # vLLM extension
        if self.return_token_ids:
            body["return_tokens_as_token_ids"] = True  # vLLM extension
        if self.mode == "chat":
            if not isinstance(prompt, str):
                raise ValueError("chat mode needs text prompts (sent as one user message), got token ids")
            body["messages"] = [{"role": "user", "content": prompt}]
            body["logprobs"] = True
            path = "/chat/completions"
        else:
            body["prompt"] = prompt if isinstance(prompt, str) else [int(t) for t in prompt]
            body["logprobs"] = 0
            path = "/completions"
        body.update(self.extra_body)
        return path, body

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Completion]]:
        """See ``Engine.generate`` and the module docstring for what the API can and cannot give.

        Seeds: prompt i is sent with ``seed + row_offset + i`` (the API derives the n samples from it).

        Raises:
          APIError: the API is unreachable or rejected a request (the message names the URL).
          ValueError: token-id prompts in chat mode, or ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        requests = [
            self._body(p, params, n, None if params.seed is None else params.seed + params.row_offset + i)
            for i, p in enumerate(prompts)
        ]

        def run(i: int) -> list[Completion]:
            path, body = requests[i]
            return self._parse(prompts[i], self._post(path, body), n)

        with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, max(len(prompts), 1))) as pool:
            return list(pool.map(run, range(len(prompts))))

    def _parse(self, prompt: Prompt, out: dict[str, Any], n: int) -> list[Completion]:
        choices = sorted(out.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise APIError(f"{self.base_url}: expected {n} choices, got {len(choices)}")
        if isinstance(prompt, str):
            prompt_ids = [] if self.mode == "chat" or self._tokenizer is None else self._encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        return [self._completion(prompt_ids, c) for c in choices]

    def _completion(self, prompt_ids: list[int], choice: dict[str, Any]) -> Completion:
        lp = choice.get("logprobs") or {}
        if self.mode == "chat":
            text = (choice.get("message") or {}).get("content") or ""
            entries = lp.get("content") or []
            tokens = [e.get("token", "") for e in entries]
            logprobs = [float(e["logprob"]) for e in entries if e.get("logprob") is not None]
        else:
            text = choice.get("text", "")
            tokens = list(lp.get("tokens") or [])
            logprobs = [float(x) for x in (lp.get("token_logprobs") or []) if x is not None]
        if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            token_ids = [int(t.split(":", 1)[1]) for t in tokens]
        elif self._tokenizer is not None:
            token_ids = self._encode(text)
        else:
            token_ids = []
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(
            prompt_ids=prompt_ids, token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def close(self) -> None:
        self._client.close()
