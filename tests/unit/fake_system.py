"""A fake `process.System` for unit tests: a scripted history on a clock of its own.

In the manner of honcho's tests/test_manager.py: `programs` say, by name, how a child started
from them behaves (runs for a while and exits with a status, or until a stop signal; ignores
SIGTERM or not), `at()` scripts what happens from outside and when (a SIGTERM to the init at
t=5, service web exits with status 3 at t=2), and the fake records what was spawned and
signalled, and when. No process is started and nothing waits.

The event loop runs unchanged: the fake's selector, when nothing is ready, moves the clock to
the next scripted event (or to the loop's timeout) instead of waiting; a child's end or a
signal to the init then reaches the loop as it does for real, through its wakeup fd
(`signal.raise_signal` runs the C handler that writes it, before it returns).
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from init.core.process import Exit, SpawnSpec, System
from init.errors import SpawnError

TERM_AND_INT = frozenset({signal.SIGTERM, signal.SIGINT})


@dataclass(frozen=True)
class Program:
    """How one start of a program behaves."""

    runs_for: float | None = None  # exits by itself after this long; None: until stopped
    status: int = 0  # ... with this exit status
    ends_on: frozenset[int] = TERM_AND_INT  # signals that end it (empty: ignores SIGTERM)
    stops_in: float = 0.0  # how long it takes to end after one of them


FOREVER = Program()


@dataclass
class Child:
    pid: int
    name: str
    spec: SpawnSpec
    program: Program
    started: float
    exit: Exit | None = None
    ended: float | None = None
    reaped: bool = False
    adopted: bool = False  # not spawned by the init: an orphan it inherited


@dataclass(order=True)
class _Event:
    when: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class Deadlock(AssertionError):
    """The loop would wait forever: nothing is left in the script and no timer is pending."""


def program_name(argv0: str) -> str:
    """`.../service/web/run` -> web, `.../service/web/finish` -> web/finish, else the name."""
    path = Path(argv0)
    if path.name == "run":
        return path.parent.name
    if path.name == "finish":
        return f"{path.parent.name}/finish"
    return path.name


class FakeSystem(System):
    """Records spawns and signals; plays `programs` and the script on `now`."""

    def __init__(
        self,
        programs: Mapping[str, Program | Sequence[Program]] | None = None,
        *,
        pid: int = 4242,
        start_dir: Path | None = Path("/the/callers/dir"),
    ) -> None:
        # Per name, one Program for every start, or one per start (the last one repeats).
        self.programs = {
            name: [p] if isinstance(p, Program) else list(p) for name, p in (programs or {}).items()
        }
        self.pid = pid
        self.start_dir = start_dir
        self.now = 0.0
        self.epoch = 1_700_000_000.0  # the wall clock at now == 0
        self.children: list[Child] = []
        self.signals: list[tuple[float, str, int]] = []  # (when, whose group or "all", signal)
        self.spawn_fails: set[str] = set()  # names whose spawn raises (fork_exception)
        self.failed_spawns: list[tuple[float, str]] = []
        self.moved_to: list[str] = []
        self._pids = itertools.count(100)
        self._seq = itertools.count()
        self._timeline: list[_Event] = []
        self._waits = 0

    # -- the script -----------------------------------------------------------------------

    def at(
        self,
        when: float,
        *,
        signal_init: int | None = None,
        exit: tuple[str, int] | None = None,
        call: Callable[[], None] | None = None,
    ) -> None:
        """At `when`: the init gets `signal_init`, or the running child `exit[0]` exits with
        status `exit[1]`, or the test looks at something (`call`)."""
        if signal_init is not None:
            self._schedule(when, lambda: self._signal_init(signal_init))
        if call is not None:
            self._schedule(when, call)
        if exit is not None:
            name, status = exit

            def end() -> None:
                child = self.running(name)
                if child is None:
                    raise AssertionError(f"script: {name} is not running at {self.now}")
                self._end(child, Exit(status, None))

            self._schedule(when, end)

    def adopt(self, name: str, program: Program = FOREVER) -> Child:
        """A process the init did not start but must reap: an orphan reparented to it."""
        spec = SpawnSpec(argv=(name,))
        child = Child(next(self._pids), name, spec, program, self.now, adopted=True)
        self.children.append(child)
        return child

    # -- what happened ----------------------------------------------------------------------

    def started(self) -> list[str]:
        """The names of the children spawned, in order."""
        return [c.name for c in self.children if not c.adopted]

    def starts_of(self, name: str) -> list[float]:
        return [c.started for c in self.children if c.name == name]

    def running(self, name: str) -> Child | None:
        alive = [c for c in self.children if c.name == name and c.exit is None]
        return alive[-1] if alive else None

    def signalled(self, signum: int) -> list[tuple[float, str]]:
        return [(when, who) for when, who, s in self.signals if s == signum]

    # -- process.System ------------------------------------------------------------------

    def spawn(self, spec: SpawnSpec) -> int:
        name = program_name(spec.argv[0])
        if name in self.spawn_fails:
            self.failed_spawns.append((self.now, name))
            raise SpawnError(f"cannot execute {spec.argv[0]}: No such file or directory")
        starts = sum(1 for c in self.children if c.name == name)
        plan = self.programs.get(name, [FOREVER])
        child = Child(next(self._pids), name, spec, plan[min(starts, len(plan) - 1)], self.now)
        self.children.append(child)
        if child.program.runs_for is not None:
            status = child.program.status
            self._schedule(
                self.now + child.program.runs_for, lambda: self._end(child, Exit(status, None))
            )
        return child.pid

    def signal_group(self, pgid: int, signum: int) -> bool:
        found = [c for c in self.children if c.pid == pgid and not c.reaped]
        if not found:
            return False
        if signum != 0:
            self.signals.append((self.now, found[0].name, signum))
            self._deliver(found[0], signum)
        return True

    def signal_process(self, pid: int, signum: int) -> bool:
        return self.signal_group(pid, signum)

    def kill_all(self, signum: int) -> None:
        self.signals.append((self.now, "all", signum))
        for child in self.children:
            self._deliver(child, signum)

    def has_children(self) -> bool:
        return any(not c.reaped for c in self.children)

    def reap(self) -> Iterator[tuple[int, Exit]]:
        ended = sorted(
            (c for c in self.children if c.exit is not None and not c.reaped),
            key=lambda c: (c.ended or 0.0, c.pid),
        )
        for child in ended:
            child.reaped = True
            assert child.exit is not None
            yield child.pid, child.exit

    def getpid(self) -> int:
        return self.pid

    def become_subreaper(self) -> bool:
        return True

    def leave_directory(self) -> Path | None:
        self.moved_to.append("/")
        return self.start_dir

    def clock(self) -> float:
        return self.now

    def wall_clock(self) -> float:
        return self.epoch + self.now

    def selector(self) -> selectors.BaseSelector:
        return ScriptedSelector(self)

    # -- time passing -------------------------------------------------------------------

    def wait(self, timeout: float | None) -> None:
        """What a blocking select does, on the fake clock: up to `timeout`, or to the next
        scripted event, whichever comes first; the events then due happen."""
        self._waits += 1
        if self._waits > 100_000:
            raise AssertionError(f"the loop spins at t={self.now}")
        limit = None if timeout is None else self.now + timeout
        if not self._timeline or (limit is not None and self._timeline[0].when > limit):
            if limit is None:
                raise Deadlock(f"the init would wait forever at t={self.now}")
            self.now = limit
            return
        self.now = max(self.now, self._timeline[0].when)
        while self._timeline and self._timeline[0].when <= self.now:
            heapq.heappop(self._timeline).action()

    def _schedule(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timeline, _Event(when, next(self._seq), action))

    def _deliver(self, child: Child, signum: int) -> None:
        if child.exit is not None:
            return
        if signum == signal.SIGKILL:
            self._end(child, Exit(None, signum))
        elif signum in child.program.ends_on:
            self._schedule(
                self.now + child.program.stops_in, lambda: self._end(child, Exit(None, signum))
            )

    def _end(self, child: Child, exit_: Exit) -> None:
        if child.exit is not None:
            return
        child.exit = exit_
        child.ended = self.now
        signal.raise_signal(signal.SIGCHLD)

    def _signal_init(self, signum: int) -> None:
        signal.raise_signal(signum)


class ScriptedSelector(selectors.DefaultSelector):
    """The real selector for the fds that are ready now; the fake's clock for the waiting."""

    def __init__(self, system: FakeSystem) -> None:
        super().__init__()
        self.system = system

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        self.system.wait(timeout)
        return super().select(0)
