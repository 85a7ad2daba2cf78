"""Wrap mode, `sharelatex-init -- CMD ARGS`: one child, every signal passed on, orphans reaped.

Behaves as tini does: the child runs in its own process group (in the foreground when there is
a terminal), each catchable signal 1-31 but SIGCHLD is passed to it (or to its group with
`--process-group`), and the init exits with the child's status, or 128+N when signal N ended
it. Signals are blocked and taken with `sigtimedwait`, so a real fault in the init still kills
it and no handler ever runs. The child starts in the caller's directory; the init itself moves
to / first, so it keeps no directory busy (dumb-init's rule).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from init.core import process
from init.core.log import Log
from init.core.process import Exit, SpawnSpec
from init.errors import SpawnError

UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})
# Every classic signal: what is blocked is queued for sigtimedwait instead of being delivered.
WAITED = frozenset(range(1, 32)) - UNCATCHABLE
FORWARDED = WAITED - {signal.SIGCHLD}
EXIT_CANNOT_RUN = 127  # as a shell: the command could not be executed


@dataclass(frozen=True)
class WrapOptions:
    """The command to run, and how to pass signals on to it."""

    argv: tuple[str, ...]
    process_group: bool = False  # send signals to the child's whole group (dumb-init's way)


def run(options: WrapOptions, environ: Mapping[str, str], log: Log) -> int:
    """Run the command to its end; the exit status to leave with."""
    if os.getpid() != 1:
        process.become_subreaper()
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        # Before the child starts, so that it never sees the init in its directory.
        here = process.leave_directory()
        child = _start(options.argv, environ, log, here)
        if child is None:
            return EXIT_CANNOT_RUN
        process.release_memory()
        exit_ = _wait_and_forward(child, options.process_group)
        _reap_remaining()
        return exit_.shell_status
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _start(
    argv: Sequence[str], environ: Mapping[str, str], log: Log, cwd: Path | None
) -> int | None:
    try:
        return process.spawn(
            SpawnSpec(
                argv=tuple(argv),
                env=environ,
                cwd=cwd,
                new_group=True,
                foreground=sys.stdin.isatty() if sys.stdin else False,
            )
        )
    except SpawnError as e:
        log.error("init", str(e))
        return None


def _wait_and_forward(child: int, to_group: bool) -> Exit:
    """Take signals one at a time until the child has ended: forward them, reap on SIGCHLD."""
    while True:
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo == signal.SIGCHLD:
            for pid, exit_ in process.reap():
                if pid == child:
                    return exit_
            continue
        target = -child if to_group else child
        try:
            os.kill(target, info.si_signo)
        except ProcessLookupError:
            pass  # already gone: its SIGCHLD is queued


def _reap_remaining() -> None:
    for _pid, _exit in process.reap():
        pass
