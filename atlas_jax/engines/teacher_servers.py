"""The policy served by ``atlas-serve --role=teacher`` servers (``engine.teacher=vllm_server``).

Before every rollout the trainer pushes the newest weights to every server and waits until each one
reports the new ``weight_version`` on ``/health``; only then does any host sample. Two transports:

* ``http`` (any machine, the CPU default): safetensors bytes of HF-named tensors to ``/update_weights``
  (``weight_sync.serialize``);
* ``nccl`` (GPU clusters): names/dtypes/shapes over HTTP, tensors by NCCL broadcast from the trainer
  (``engines/nccl_push.py``).

Servers per host (``host_urls``): with as many server URLs as hosts (or a multiple), each host gets its
own slice, pushes it and samples only there; with fewer, every host samples from all of them and the
main process alone pushes (one push per server per step), then all hosts pass a barrier.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from atlas_jax import distributed
from atlas_jax.engines.server_client import ServerEngine, ServerError


def host_urls(urls: Sequence[str], process_index: int, process_count: int) -> tuple[list[str], bool]:
    """``(this host's server URLs, whether this host owns them)``.

    A host owns the servers it was given alone (it pushes their weights); shared servers are owned by
    process 0. ``len(urls)`` a multiple of ``process_count``: host ``i`` gets the ``i``-th contiguous slice.
    """
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("no server URL given")
    if process_count > 1 and len(urls) % process_count == 0:
        k = len(urls) // process_count
        return urls[process_index * k : (process_index + 1) * k], True
    return list(urls), process_index == 0


def wait_healthy(
    engine: ServerEngine, timeout_s: float, *, role: str | None = None, poll_s: float = 0.5
) -> dict[str, dict]:
    """Polls every server's ``/health`` until all answer (and serve ``role``), at most ``timeout_s`` seconds.

    Raises:
      ServerError: a server did not answer in time (names it and the last error) or serves another role.
    """
    deadline = time.monotonic() + timeout_s
    out: dict[str, dict] = {}
    for url in engine.urls:
        while True:
            try:
                out[url] = engine._request(url, "GET", "/health")
                break
            except ServerError as e:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"server {url} not healthy after {timeout_s:.0f}s (--config.engine.server_wait_s): {e}"
                    ) from e
                time.sleep(poll_s)
        if role is not None and out[url].get("role") != role:
            raise ServerError(f"server {url} serves role {out[url].get('role')!r}, expected {role!r}")
    return out


class TeacherServers(ServerEngine):
    """``ServerEngine`` over teacher servers that receives the policy's weights before every rollout.

    Args:
      urls: this host's servers (see ``host_urls``).
      owner: whether this host pushes to them (False: another host does; this one waits at the barrier).
      model_config: the policy's ``ModelConfig`` (HF names and shapes of the pushed tensors).
      transfer: "http" or an object with ``push(params) -> list[int]`` (e.g. ``nccl_push.NcclWeightPush``).
      wait_s: how long to wait for a server's health at start and for a new weight version.
      **kw: ``ServerEngine`` options (token, timeouts, retries, tokenizer).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        owner: bool = True,
        model_config: Any,
        transfer: Any = "http",
        wait_s: float = 120.0,
        **kw: Any,
    ) -> None:
        super().__init__(urls, model_config=model_config, **kw)
        self.owner, self.transfer, self.wait_s = owner, transfer, wait_s
        self.versions = {
            u: int(h["weight_version"]) for u, h in wait_healthy(self, wait_s, role="teacher").items()
        }
        self.push_seconds: list[float] = []

    def update_weights(self, params: Any) -> list[int]:
        """Pushes ``params`` (owner), waits for the new version on every server, then a barrier of all hosts.

        Returns:
          The servers' weight versions after the push.

        Raises:
          ServerError: a push failed, or a server did not report the new version within ``wait_s``
            (e.g. a server restarted, or another trainer pushes to it too).
        """
        t0 = time.perf_counter()
        if self.owner:
            expected = {u: v + 1 for u, v in self.versions.items()}
            if self.transfer == "http":
                super().update_weights(params)
            else:
                self.transfer.push(params)
            self.versions = self.wait_for_versions(expected)
        distributed.sync("atlas_jax.teacher_servers.push")  # nobody samples before every server has them
        self.push_seconds.append(time.perf_counter() - t0)
        return list(self.versions.values())

    def wait_for_versions(self, expected: dict[str, int]) -> dict[str, int]:
        """Polls ``/health`` until every server reports ``expected[url]``; returns the versions seen.

        Raises:
          ServerError: a server reports another version than expected after ``wait_s`` seconds, or a
            higher one (someone else pushed too).
        """
        deadline = time.monotonic() + self.wait_s
        seen: dict[str, int] = {}
        for url, want in expected.items():
            while True:
                v = int(self._request(url, "GET", "/health")["weight_version"])
                if v > want:
                    raise ServerError(
                        f"server {url} is at weight version {v}, expected {want}: another trainer pushes to it"
                    )
                if v == want:
                    seen[url] = v
                    break
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"server {url} still at weight version {v} after {self.wait_s:.0f}s, expected {want}"
                    )
                time.sleep(0.05)
        return seen
