"""Stopping a run cleanly: SIGTERM (preemption) and SIGINT (Ctrl-C) end it at a step boundary.

The handler only records the signal; the training loop finishes the step it is in, writes a
checkpoint and raises `Interrupted`, which the command line turns into one line and exit
code 128 + signal (143 for SIGTERM, 130 for SIGINT). A second Ctrl-C stops at once.
"""

import signal
from contextlib import contextmanager
import threading


class Interrupted(Exception):
    """The run stopped on a signal after `step`, with its state saved in `checkpoint`."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint: {checkpoint}" if checkpoint else "no checkpoint (no --out)"
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set `signum` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class Stop(BaseException):
    """A signal asked the command to stop (outside a training loop). A BaseException, so no
    `except Exception` on the way swallows it; the command line turns it into one line and
    128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_on_signals():
    """While inside, SIGTERM and SIGINT raise `Stop` (the training loop installs its own
    handlers on top, to stop at a step boundary). The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Stop(signum)

    old = {s: signal.signal(s, handle) for s in StopSignals.SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
