"""Signals as bytes on a pipe: the one way every long-running process of the init takes them.

The handlers installed here do nothing; Python's C-level handler writes each signal's number to
the pipe (`signal.set_wakeup_fd`), and the owner's select loop reads them with `drain()` and acts
in one place (tini's and Supervisor's rule: no handler does work, so nothing races). Used by
PID 1's event loop, the HTTP servers, and the compile runner while a compile runs. Main thread
only, as `set_wakeup_fd` requires.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def _record(signum: int, frame: object) -> None:
    """Installed so that the C handler writes the wakeup fd; no work here."""


class SignalWakeup:
    """While open: `signals` arrive as bytes readable on `fd`; `close` puts back what was."""

    def __init__(self, signals: Iterable[int]) -> None:
        # A pipe, not a socketpair: the socket module alone costs PID 1 0.75 MiB.
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, _record) for s in sorted(set(signals))}

    def drain(self) -> list[int]:
        """The signals that arrived since the last drain, in order (duplicates kept)."""
        try:
            return list(os.read(self.fd, 4096))
        except BlockingIOError:
            return []

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self.fd)
        os.close(self._write_fd)

    def __enter__(self) -> SignalWakeup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
