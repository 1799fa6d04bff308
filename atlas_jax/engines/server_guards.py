"""Guards of the generation server (``server_app``): concurrency limit, allow-listed weight paths, safe JSON.

* ``ConcurrencyLimit``: ASGI middleware answering 503 (``Retry-After: 1``) when more than ``max_inflight``
  requests are in flight, so a flood queues in clients, not in server memory. ``/health`` is never limited.
* ``resolve_weights_path``: a path-based weight update may only name a folder inside the allow-listed
  ``weights_root`` (after resolving ``..`` and symlinks); anything else is a 403, and a server started
  without a root refuses path updates.
* ``json_object``: a request body parsed as a JSON object, else a 422 (never a 500).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException

UNLIMITED_PATHS = ("/health",)


class ConcurrencyLimit:
    """ASGI middleware: at most ``max_inflight`` HTTP requests at once; the others get 503 at once."""

    def __init__(self, app: Any, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.app, self.max_inflight, self.inflight = app, max_inflight, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        if self.inflight >= self.max_inflight:  # the event loop is single-threaded: no lock needed
            body = f'{{"detail": "server busy: more than {self.max_inflight} requests in flight"}}'.encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def resolve_weights_path(path: Any, root: str | os.PathLike[str] | None) -> Path:
    """``path`` resolved, if it lies inside ``root`` (resolved too).

    Raises:
      HTTPException: 403 when there is no root or the path escapes it; 422 when ``path`` is not a string.
    """
    if root is None:
        raise HTTPException(
            403,
            "path-based weight updates are disabled: start the server with a weights root (--weights_root)",
        )
    if not isinstance(path, str) or not path or "\0" in path:
        raise HTTPException(422, "'path' must be a non-empty string")
    base = Path(root).resolve()
    target = (base / path).resolve()  # an absolute ``path`` replaces ``base``; ``..`` and symlinks resolve
    if target != base and base not in target.parents:
        raise HTTPException(403, f"path {path!r} is outside the allowed weights root")
    return target


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; 422 otherwise."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPException(422, f"body is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise HTTPException(422, "body must be a JSON object")
    return value
