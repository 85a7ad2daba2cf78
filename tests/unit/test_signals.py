"""The init's signals held from its first line until its loop takes them (init.core.signals).

In-process, on the real signal mask: a SIGTERM raised while held stays pending, and reaches
the loop's callback once the loop exists. (Were it unblocked before the loop's handler were in
place, the default action would end the test run: the failure would not go unnoticed.)
"""

from __future__ import annotations

import io
import signal
import threading
from collections.abc import Iterator

import pytest

from init import cli
from init.core import signals
from init.core.log import Log
from init.core.loop import EventLoop


@pytest.fixture
def own_mask() -> Iterator[None]:
    """Whatever a test does to the mask, the test run gets its own back."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, before)


def blocked() -> set[int]:
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])}


def pending() -> set[int]:
    return {int(s) for s in signal.sigpending()}


def test_held_are_the_stop_and_forwarded_signals_never_the_faults_or_sigchld() -> None:
    assert {*signals.STOP_SIGNALS, *signals.FORWARDED_SIGNALS} == signals.HELD
    for fault in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT):
        assert fault not in signals.HELD
    assert signal.SIGCHLD not in signals.HELD
    assert not {signal.SIGKILL, signal.SIGSTOP} & signals.HELD


def test_a_sigterm_while_held_waits_and_reaches_the_loop(own_mask: None) -> None:
    signals.hold()
    assert blocked() >= signals.HELD
    # To this thread: a process-directed one would go to any other thread of the test run
    # (the mask is per thread), and end the run by its default action.
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    assert signal.SIGTERM in pending()  # kept, not delivered: the disposition is still default

    loop = EventLoop(Log(io.StringIO()), signals.HELD)
    try:
        got: list[int] = []
        loop.on_signal(signal.SIGTERM, got.append)
        assert not signals.HELD & blocked()  # the loop took them back
        loop.run_once()
        assert got == [signal.SIGTERM]
    finally:
        loop.close()


def test_restore_gives_back_the_mask_hold_found(own_mask: None) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, [signal.SIGUSR1])
    previous = signals.hold()
    signals.restore(previous)
    assert blocked() == {signal.SIGUSR1}


def test_commands_without_a_loop_run_with_their_signals_unblocked(
    own_mask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[set[int]] = []
    monkeypatch.setattr(cli, "_status", lambda options, env: seen.append(blocked()) or 0)
    assert cli.main(["status"], {}) == 0
    assert not seen[0] & signals.HELD
    assert not blocked() & signals.HELD  # and main leaves the caller's mask as it found it
