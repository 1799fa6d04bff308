"""Starting and stopping the processes of a run (used by ``launch.cluster``).

Every process is started in its own session (process group), so stopping it also stops its children
(vLLM's workers), and only processes started here are ever signalled — by their own id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


@dataclasses.dataclass
class Started:
    """A process this launcher started: what it is, its log file and the ``Popen``."""

    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None) -> Started:
    """Starts ``argv`` in a new session with stdout/stderr to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            list(argv),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=dict(env or os.environ),
            start_new_session=True,
        )
    return Started(name, proc, log)


def server_argv(model: str, role: str, port: int, host: str, extra: Sequence[str] = ()) -> list[str]:
    """``python -m launch.serve`` for one generation server."""
    return [
        sys.executable, "-m", "launch.serve", f"--model={model}", f"--role={role}", f"--host={host}",
        f"--port={port}", *extra,
    ]  # fmt: skip


def wait_healthy(servers: Sequence[Started], timeout_s: float) -> None:
    """Returns once every server answers ``/health``.

    Raises:
      RuntimeError: a server exited (its log tail is in the message) or did not answer in ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for s in list(pending):
            rc = s.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"{s.name} ({s.url}) exited with status {rc} before it was healthy:\n{s.tail()}"
                )
            try:
                if httpx.get(f"{s.url}/health", timeout=2.0).status_code == 200:
                    pending.remove(s)
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{s.name} ({s.url})" for s in pending)
            raise RuntimeError(f"not healthy after {timeout_s:.0f}s (--wait_s): {names}\n{pending[0].tail()}")
        if pending:
            time.sleep(0.5)


def wait_all(procs: Sequence[Started], poll_s: float = 0.2) -> int:
    """Waits for every process; the first non-zero exit stops the others. Returns that status (else 0)."""
    running = list(procs)
    while running:
        for p in list(running):
            rc = p.proc.poll()
            if rc is None:
                continue
            running.remove(p)
            if rc != 0:
                print(
                    f"launch.cluster: {p.name} exited with status {rc}; stopping the others", file=sys.stderr
                )
                stop(running)
                return rc
        time.sleep(poll_s)
    return 0


def stop(procs: Sequence[Started], grace_s: float = 10.0) -> None:
    """SIGTERM to each process's group, then SIGKILL to what is left after ``grace_s``."""
    for p in procs:
        if p.proc.poll() is None:
            _signal_group(p.proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(p.proc, signal.SIGKILL)
            p.proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the group id is the pid: start_new_session=True
