"""One HTTP request with retries and exponential backoff (shared by the HTTP client engines)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import httpx

# The server is down or restarting: the same request may succeed on another try.
_RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def request_json(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    retries: int,
    backoff: float,
    retry_status: Collection[int],
    error: type[Exception],
    exhausted: Callable[[int, float, str], str],
    detail: Callable[[httpx.Response], str] = lambda r: r.text[:500],
    **kw: Any,
) -> Any:
    """Sends ``method url`` and returns the JSON answer, retrying what may pass on another try.

    Attempt ``a`` (0-based, ``retries + 1`` in all) first sleeps ``backoff · 2^(a-1)`` seconds (none
    before the first). Connection failures (connect error/timeout, dropped connection) and answers with
    a status in ``retry_status`` are retried; other transport errors (e.g. a read timeout: the server
    may still be working) and other statuses >= 400 raise at once.

    Args:
      client: the httpx client; ``kw`` goes to ``client.request`` (``json=``, ``content=``, ``headers=``).
      error: the exception type raised (its message names ``method`` and ``url``).
      exhausted: ``(attempts, seconds, last_error) -> message`` after the last retryable failure.
      detail: what an error answer's message shows of the response (default: its text, 500 chars).

    Raises:
      error: as above.
    """
    start, last = time.monotonic(), ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            r = client.request(method, url, **kw)
        except _RETRY_ERRORS as e:
            last = f"{type(e).__name__}: {e}"
            continue
        except httpx.TransportError as e:
            raise error(f"{method} {url} failed: {type(e).__name__}: {e}") from e
        if r.status_code in retry_status:
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            continue
        if r.status_code >= 400:
            raise error(f"{method} {url} failed: HTTP {r.status_code}: {detail(r)}")
        try:
            return r.json()
        except ValueError as e:  # a proxy's HTML page, a truncated body, another service on the port
            raise error(f"{method} {url}: the answer is not JSON ({e}): {r.text[:200]!r}") from e
    raise error(exhausted(retries + 1, time.monotonic() - start, last))
