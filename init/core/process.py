"""The seam to the OS for processes: spawn a child, reap children, describe how one ended.

Everything PID 1 does to start, signal and reap programs, and the clocks it reads, goes
through one `System` object, so a test can swap it for a fake that records and scripts (the
child's setup, session, process group, signal mask and fds, is written once, in `spawn`).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init.errors import SpawnError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    import selectors

PR_SET_CHILD_SUBREAPER = 36
# Signals whose disposition Python changes (SIGPIPE, SIGXFSZ ignored) or that we handle: the
# child gets them back at their defaults, as it would from a shell.
_RESET_TO_DEFAULT = tuple(
    s for s in range(1, signal.NSIG) if s not in (signal.SIGKILL, signal.SIGSTOP) and s < 32
)


@dataclass(frozen=True)
class SpawnSpec:
    """How to start one program."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    new_session: bool = False  # setsid: own session and process group (services)
    new_group: bool = False  # setpgid only: stays on the terminal (wrap mode)
    foreground: bool = False  # make the new group the terminal's foreground group
    stdin: int | None = None  # fd to dup onto 0; None: inherit
    stdout: int | None = None
    stderr: int | None = None


@dataclass(frozen=True)
class Exit:
    """How a child ended: its exit code, or the signal that killed it."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> Exit:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.waitstatus_to_exitcode(status), None)

    @property
    def shell_status(self) -> int:
        """The status a shell would report: the code, or 128+N for signal N."""
        return self.code if self.code is not None else 128 + (self.signal or 0)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        return f"exited with status {self.code}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def parse_signal(text: str) -> int:
    """'TERM', 'SIGTERM' or '15' to a signal number; ValueError otherwise."""
    word = text.strip().upper()
    if word.isdigit():
        number = int(word)
        if 1 <= number < signal.NSIG:
            return number
        raise ValueError(text)
    if not word.startswith("SIG"):
        word = "SIG" + word
    try:
        return int(signal.Signals[word])
    except KeyError:
        raise ValueError(text) from None


def spawn(spec: SpawnSpec) -> int:
    """Start `spec` and return its pid; SpawnError if it could not be executed at all.

    fork + exec by hand rather than subprocess: the child must get an empty signal mask and
    default dispositions (subprocess keeps the parent's mask), a chdir, and setsid or setpgid
    plus the terminal's foreground, and PID 1 must stay the only one that waits for children.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    # Block everything across fork so no Python handler runs in the child before exec (it
    # would write to PID 1's wakeup fd, which the child shares).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _RESET_TO_DEFAULT)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child either execs or _exits
            _exec_child(spec, write_end)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    if report:
        os.waitpid(pid, 0)
        code, where = map(int, report.split()[:2])
        what = os.strerror(code)
        raise SpawnError(
            f"cannot {_STEPS.get(where, 'start')} {spec.argv[0]}: {what}",
            _SPAWN_FIXES.get(code, ""),
        )
    return pid


_STEPS = {1: "enter the directory of", 2: "set up the terminal for", 3: "execute"}
_SPAWN_FIXES = {
    errno.ENOENT: "check that the file exists (and its #! interpreter)",
    errno.EACCES: "make it executable: chmod +x",
    errno.ENOEXEC: "give it a #! line or make it a real executable",
}


def _exec_child(spec: SpawnSpec, report_fd: int) -> None:  # pragma: no cover - child side
    step = 0
    try:
        signal.set_wakeup_fd(-1)
        for signum in _RESET_TO_DEFAULT:
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        if spec.new_session:
            os.setsid()
        elif spec.new_group:
            os.setpgid(0, 0)
            if spec.foreground:
                step = 2
                _take_terminal()
        for fd, target in ((spec.stdin, 0), (spec.stdout, 1), (spec.stderr, 2)):
            if fd is not None and fd != target:
                os.dup2(fd, target, inheritable=True)
        if spec.cwd is not None:
            step = 1
            os.chdir(spec.cwd)
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, _max_fd())
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        step = 3
        os.execvpe(spec.argv[0], list(spec.argv), dict(spec.env))
    except OSError as e:
        code = e.errno or errno.EIO
    except BaseException:
        code = errno.EIO
    try:
        # As text, "errno step": struct would cost PID 1 a module and a shared library.
        os.write(report_fd, f"{code} {step}".encode())
    finally:
        os._exit(127)


def _take_terminal() -> None:  # pragma: no cover - child side
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return  # no controlling terminal: nothing to take
    try:
        # SIGTTOU is blocked here, so a background group may set itself foreground.
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass
    finally:
        os.close(fd)


def _max_fd() -> int:
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 65536)
    except (OSError, ValueError):
        return 1024


def reap() -> Iterator[tuple[int, Exit]]:
    """Every child that has ended so far, without blocking: (pid, how it ended)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, Exit.from_wait_status(status)


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to a process group; False when the group is gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def signal_process(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_all(signum: int) -> None:
    """As PID 1: send `signum` to every process in the namespace but the init itself."""
    try:
        os.kill(-1, signum)
    except ProcessLookupError:
        pass


def leave_directory() -> Path | None:
    """chdir to / so that the init holds no directory busy (dumb-init's rule); the directory
    it was in, for its children to start in. None, and no move, if that directory is gone."""
    try:
        here = Path.cwd()
    except OSError:
        return None
    try:
        os.chdir("/")
    except OSError:
        pass  # children still get `here` explicitly
    return here


def become_subreaper() -> bool:
    """Adopt orphaned descendants (when not PID 1), so they are reaped here."""
    import ctypes  # only when not PID 1

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def has_children() -> bool:
    """True while any child (running or a zombie not yet reaped) exists."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def release_memory() -> None:
    """Free the boot's garbage before a long idle (PID 1 lives long); no new imports for it."""
    import gc

    gc.collect()
    if "ctypes" in sys.modules:  # loaded already (dind mode): trimming the heap is free
        try:
            sys.modules["ctypes"].CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


class System:
    """What PID 1 does to the OS about processes and time, as one object a test replaces.

    The model is Supervisor's `options.fork` (its tests' `DummyOptions.fork_exception`) and
    honcho's injected clock: each method is one of this module's functions, or the clock, so
    a fake can record what was spawned and signalled and play a scripted history on a clock of
    its own (tests/unit/fake_system.py), with no processes and no waiting.
    """

    def spawn(self, spec: SpawnSpec) -> int:
        return spawn(spec)

    def signal_group(self, pgid: int, signum: int) -> bool:
        return signal_group(pgid, signum)

    def signal_process(self, pid: int, signum: int) -> bool:
        return signal_process(pid, signum)

    def kill_all(self, signum: int) -> None:
        kill_all(signum)

    def has_children(self) -> bool:
        return has_children()

    def reap(self) -> Iterator[tuple[int, Exit]]:
        return reap()

    def getpid(self) -> int:
        return os.getpid()

    def become_subreaper(self) -> bool:
        return become_subreaper()

    def leave_directory(self) -> Path | None:
        return leave_directory()

    def clock(self) -> float:
        """Monotonic seconds: every timeout and delay."""
        return time.monotonic()

    def wall_clock(self) -> float:
        """Seconds since the epoch: only for people (the status's "since", "next_start_at")."""
        return time.time()

    def selector(self) -> selectors.BaseSelector:
        """What the event loop waits in (imported here: wrap mode has no loop)."""
        import selectors

        return selectors.DefaultSelector()


REAL = System()
