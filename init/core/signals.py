"""The signals PID 1 takes, and holding them from its first line until its loop can take them.

The kernel spares PID 1 of a PID namespace every signal it has no handler for: a SIGTERM that
arrives while its disposition is still SIG_DFL is discarded, not left pending (a `docker stop`
during the boot was lost, and the container killed after Docker's 10 s). A *blocked* signal is
never discarded: it stays pending until unblocked. So the entry point blocks these first of
all (`hold`, before the heavy imports), and the event loop unblocks the ones it handles once
its handlers and wakeup fd are in place (`loop.EventLoop`), when any pending one is delivered
to it. A command that runs no loop puts them back at once (`release`). Children never inherit
the hold: `process.spawn` starts each with an empty mask.

What is left: the interpreter's own start, before the entry point's first line, where a stop
signal is still lost. On the test machine, from exec to the hold: ~25 ms for `python -m init`
and ~30 ms for the console script (which imports `re` and init.cli first), of which ~24 ms is
the interpreter and its site packages alone (a script holding on its first line); it was the
whole start, ~70 ms, up to the loop (tests/integration/test_boot_signals.py measures it).
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the init passes on to its services. Not the synchronous fault signals (SEGV, BUS, FPE,
# ILL, TRAP, SYS, ABRT): a handler for those would turn a real fault in PID 1 into a busy loop.
FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGWINCH,
    signal.SIGCONT,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGURG,
    signal.SIGXCPU,
    signal.SIGXFSZ,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
)
HELD = frozenset((*STOP_SIGNALS, *FORWARDED_SIGNALS))


def hold() -> set[int | signal.Signals]:
    """Block the stop and forwarded signals, so they wait pending; the mask there was before."""
    previous: set[int | signal.Signals] = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    return previous


def release() -> None:
    """Unblock them: for the commands that take signals their own way (or not at all)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


def restore(mask: set[int | signal.Signals]) -> None:
    """Put back the mask `hold` returned (a caller in-process, as a test, gets its own back)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
