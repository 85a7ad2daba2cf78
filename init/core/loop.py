"""PID 1's event loop: signals through a wakeup fd, children reaped on SIGCHLD, timers, fds.

Signal handlers do nothing; the signal number arrives as a byte on the wakeup fd and is acted
on here, in one place (tini's and Supervisor's rule: no handler does work, so nothing races).
With no timer pending the loop blocks in `select` with no timeout: an idle PID 1 never wakes.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from init.core import process
from init.core.log import Log
from init.core.process import Exit, signal_name
from init.core.wakeup import SignalWakeup

ChildCallback = Callable[[Exit], None]
SignalCallback = Callable[[int], None]


@dataclass(order=True)
class Timer:
    """A callback due at `when` (the loop's clock); ordered by time, then by `seq`."""

    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """One loop for the init's whole life; `run_until(condition, deadline)` drives it.

    Its clock, its selector and how it reaps come from `system`: a test's fake system runs a
    scripted history through the same code, on its own clock.
    """

    def __init__(
        self, log: Log, signals: Iterable[int], system: process.System = process.REAL
    ) -> None:
        self.log = log
        self.system = system
        self.clock = system.clock
        self._selector = system.selector()
        handled = {*signals, signal.SIGCHLD}
        self._wakeup = SignalWakeup(handled)
        self._selector.register(self._wakeup.fd, selectors.EVENT_READ, self._on_wakeup)
        # The entry point held these since its first line (init.core.signals): with the handlers
        # and the wakeup fd in place, any that arrived during the start is delivered now, as a
        # byte the first `select` reads.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._children: dict[int, ChildCallback] = {}
        self._signal_callbacks: dict[int, SignalCallback] = {}

    # -- registration ------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock() + max(0.0, delay), next(self._seq), callback)
        # A sorted list rather than heapq (a module and a shared library more in PID 1): there
        # are a handful of timers at most, one a service.
        self._timers.append(timer)
        self._timers.sort()
        return timer

    def watch_child(self, pid: int, callback: ChildCallback) -> None:
        """Call `callback(exit)` once when child `pid` has been reaped."""
        self._children[pid] = callback

    def on_signal(self, signum: int, callback: SignalCallback) -> None:
        self._signal_callbacks[signum] = callback

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- running -------------------------------------------------------------------------

    def run_until(self, condition: Callable[[], bool], deadline: float | None = None) -> bool:
        """Handle events until `condition()` holds (True) or `deadline` passes (False)."""
        while not condition():
            now = self.clock()
            if deadline is not None and now >= deadline:
                return False
            timeout = self._timeout(now, deadline)
            for key, _events in self._selector.select(timeout):
                key.data()
            self._run_due_timers()
        return True

    def run_once(self, timeout: float = 0.0) -> None:
        """Handle what is pending now (tests, and draining output at exit)."""
        for key, _events in self._selector.select(timeout):
            key.data()
        self._run_due_timers()

    def close(self) -> None:
        self._wakeup.close()
        self._selector.close()

    def _timeout(self, now: float, deadline: float | None) -> float | None:
        while self._timers and self._timers[0].cancelled:
            self._timers.pop(0)
        first_timer = self._timers[0].when if self._timers else None
        ends = [t for t in (first_timer, deadline) if t is not None]
        return max(0.0, min(ends) - now) if ends else None

    def _run_due_timers(self) -> None:
        now = self.clock()
        while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
            timer = self._timers.pop(0)
            if not timer.cancelled:
                timer.callback()

    def _on_wakeup(self) -> None:
        data = self._wakeup.drain()
        # Reap on every wake-up, not just on a SIGCHLD byte: bytes can be coalesced or dropped
        # when the buffer is full, and a waitpid that finds nothing costs one syscall.
        self.reap_children()
        for signum in data:
            if signum == signal.SIGCHLD:
                continue
            callback = self._signal_callbacks.get(signum)
            if callback is not None:
                callback(signum)
            else:
                self.log.debug("init", f"ignored {signal_name(signum)}")

    def reap_children(self) -> None:
        for pid, exit_ in self.system.reap():
            callback = self._children.pop(pid, None)
            if callback is None:
                self.log.debug("init", f"reaped unknown pid {pid} ({exit_.describe()})")
            else:
                callback(exit_)


def pid_is_one() -> bool:
    return os.getpid() == 1
