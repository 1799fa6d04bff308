"""``StopSignal`` in this process: the first SIGTERM only sets the flag, a second one goes to the previous
handler, ``close`` restores it, and a disabled one installs nothing.

The end-to-end pre-emption runs (SIGTERM to SFT, SIGINT to GRPO: exit 0, checkpoint, resume, same metrics)
are in tests/test_crash_resume.py, which shares their uninterrupted reference runs.
"""

from __future__ import annotations

import os
import signal

from atlas_jax.training.preemption import StopSignal


def test_stop_signal_flag_second_signal_and_restore():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop() and seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # the second one goes to the handler that was there before
        assert seen == [signal.SIGTERM]
        stop.close()
        assert signal.getsignal(signal.SIGTERM) is not stop._handle
        disabled = StopSignal(enabled=False).install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert not disabled.should_stop() and seen == [signal.SIGTERM] * 2
        disabled.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_closed_stop_signal_hands_signals_on():
    """A loop that raised before ``close`` leaves an inactive handler: signals reach the previous one."""
    seen = []
    previous = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
    try:
        stop = StopSignal().install()
        stop._active = False  # what an exception before close() amounts to
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT] and not stop.requested
    finally:
        signal.signal(signal.SIGINT, previous)
