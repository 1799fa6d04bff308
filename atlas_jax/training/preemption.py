"""Pre-emption: SIGTERM / SIGINT end a training loop cleanly after the current step.

A pod scheduler sends SIGTERM (a person presses Ctrl-C: SIGINT) some seconds before it kills the job.
Inside ``StopSignal`` the first such signal only sets a flag; the loop finishes the step it is in,
breaks, writes its final checkpoint (``force=True``), waits for it to be committed and returns, so the
process exits 0 and the next start resumes from that checkpoint. A second signal of the same kind
restores the default behaviour and re-raises it (Ctrl-C twice still kills at once).

Multi-process runs: hosts may receive the signal at different steps; ``should_stop`` ORs the flag over
every process (a tiny collective each step), so all of them leave after the same step.

Typical use (``install``/``close`` instead of ``with`` keeps a loop's body where it is)::

    stop = StopSignal(enabled=config.reliability.handle_signals).install()
    for step in ...:
        ...one step...
        if stop.should_stop():
            break
    stop.close()
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Context manager turning the first SIGTERM/SIGINT into a stop request (see the module docstring).

    Args:
      enabled: install the handlers (False: ``should_stop`` is always False, signals act as usual).
      signals: which signals request a stop.
    """

    def __init__(self, enabled: bool = True, signals: tuple[int, ...] = SIGNALS) -> None:
        # Handlers can only be installed from the main thread (e.g. not inside a server worker thread).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if not self._active or self.received == signum:  # closed, or the second one: act as if not here
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        logging.warning(
            "%s received: finishing the current step, writing a checkpoint, then exiting (send it again to "
            "stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def install(self) -> StopSignal:
        """Installs the handlers (a no-op when disabled); returns self."""
        if self.enabled:
            self._active = True
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def close(self) -> None:
        """Restores the previous handlers. A loop that raised before ``close`` leaves ours installed but
        inactive: they hand a signal to the previous handler, so the process behaves as without us."""
        self._active = False
        for s, handler in self._previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.received is not None

    def should_stop(self) -> bool:
        """Whether any process received a stop signal (a collective in a multi-process run)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
        return bool(np.asarray(flags).any())
