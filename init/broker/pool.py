"""The warm containers of every project: one compile at a time per project, at most `slots`
at once overall, a project's container reused while it has time left for a whole compile,
retired after `idle` seconds unused, and all of them swept by label when the broker or the
engine (re)starts. Blocking calls, one thread per compile (the broker's clients' threads);
the retirement is a timer the broker's loop asks for (`next_retirement`), not a poller.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from init.broker.protocol import Answer, Output, Reason, Request
from init.broker.readable import readable
from init.broker.target import BROKER_LABEL, Target
from init.broker.warm import AgentGone, WarmContainer
from init.compiles.identity import share_with_compile
from init.engine.client import CALL_TIMEOUT, COMPILE_LABEL
from init.errors import EngineError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from init.compiles.paths import CompileDir
    from init.engine.client import DockerBackend


# While a compile waits for its project's turn or a slot, how often it looks at its cancel fd (a
# lock cannot be waited on beside an fd; the wait is the queue's only, never an idle broker's).
QUEUE_LOOK = 0.05
# How long the engine may take to remove a container retired after its compile (behind its
# answer, in the project's turn): a gVisor fork bomb's sandbox on a starved host took over
# 30 s, the call's usual bound, and the project's next compile then met it still there.
REMOVE_WITHIN = 120.0


class Cancelled(Exception):
    """The compile was cancelled while it waited for its turn: it never ran."""


@dataclass(frozen=True)
class PoolLimits:
    slots: int  # compiles at once, all projects together
    idle: float  # a container unused this long is retired
    lifetime: float  # a container's life (its agent exits then, whatever happens)
    reuse: float  # a container is used again only with this much of its life left


_FREE = threading.Lock()  # a turn nobody holds: for a project that never compiled


@dataclass
class _Held:
    """A lock held by a compile; `passed_on`: its release is another thread's now (the
    removal of the project's container, which holds the project's turn until it is done)."""

    lock: threading.Lock | threading.BoundedSemaphore
    passed_on: bool = False


@dataclass
class _Warm:
    container: WarmContainer
    name: str
    started: float
    last_used: float
    directory: int | None = None  # an O_PATH fd of the compile dir it binds (hold_dir)

    def let_go(self, remove_within: float = CALL_TIMEOUT) -> None:
        """The container retired and removed, its dir let go."""
        try:
            self.container.close(remove_within)
        finally:
            if self.directory is not None:
                os.close(self.directory)
                self.directory = None


def hold_dir(path: Path) -> int | None:
    """An O_PATH fd of the compile dir a new container binds (None when it cannot be opened).
    Held, its inode cannot be freed and given to a dir made later at the same path."""
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def still_there(held: int | None, path: Path) -> bool:
    """The held dir is still the one at `path`: neither removed (a removed dir has no link
    left) nor replaced. A dir that could not be held is taken as it is."""
    if held is None:
        return True
    try:
        then, now = os.fstat(held), os.stat(path)
    except OSError:
        return False
    return then.st_nlink > 0 and (then.st_dev, then.st_ino) == (now.st_dev, now.st_ino)


class Pool:
    def __init__(
        self,
        backend: DockerBackend,
        limits: PoolLimits,
        clock: Callable[[], float] = time.monotonic,
        start: Callable[..., WarmContainer] = WarmContainer.start,
        share: Callable[[CompileDir], object] | None = None,  # share_with_compile
        owner: str = "1",  # the broker's containers carry it (target.BROKER_LABEL)
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.owner = owner
        self._log = log
        self.backend = backend
        self.limits = limits
        self._clock = clock
        self._start = start
        self._share = share_with_compile if share is None else share
        self._slots = threading.BoundedSemaphore(limits.slots)
        self._mutex = threading.Lock()
        self._turns: dict[str, threading.Lock] = {}
        self._warm: dict[str, _Warm] = {}
        self._closed = False  # the broker is stopping: no container is started any more
        self._removing: set[threading.Thread] = set()  # removals behind an answer (_retire_behind)

    def _turn(self, project: str) -> threading.Lock:
        with self._mutex:
            return self._turns.setdefault(project, threading.Lock())

    def run(
        self,
        target: Target,
        request: Request,
        output: Callable[[Output], None],
        cancel_fd: int | None = None,
        placed: Callable[[str], None] | None = None,
        finish: Callable[[Answer, str], bool] | None = None,
        gone: Callable[[str], None] | None = None,
    ) -> Answer:
        """Run `request` in the project's warm container (started if need be), after the
        project's earlier compiles and within the global limit. A container whose agent had
        ended before the request could reach it (idle, lifetime) is replaced once. The
        compile dir is first shared with the project's uid (what CLSI wrote since the last
        compile made group-writable), as on the exec path: here, in the project's turn, so
        every caller of the pool gets it; ConfigError when it cannot be.

        A byte on `cancel_fd` while it waits for its turn raises Cancelled. In the turn,
        `placed(container id)` is called before the request is sent, and `finish(answer,
        container id)` after it is answered: True retires the container (its compile went
        past a limit), before the project's next compile can start: a stopped compile's
        (Answer CANCELLED) before this returns; any other's in the project's turn but after
        this returns (its agent reaped every process of it before it answered), so that an
        engine slow to remove it keeps the project's next compile waiting, not this one's
        client. When the agent ends under the request (AgentGone, sent), `gone(container id)`
        is called before its container is removed: how it ended is the engine's to say only
        until then (its removal is a kill of its own)."""
        turn = self._turn(target.project)
        with self._waited(turn, cancel_fd) as held, self._waited(self._slots, cancel_fd):
            self._share(target.directory)
            for attempt in (1, 2):
                warm = self._container(target)
                if placed is not None:
                    placed(warm.container.id)
                try:
                    answer = warm.container.run(request, output, cancel_fd)
                except AgentGone as e:
                    try:
                        if e.sent and gone is not None:
                            gone(warm.container.id)
                    finally:
                        self._retire_now(target.project)
                    if e.sent or attempt == 2:
                        raise
                    continue
                except BaseException:
                    self._retire_now(target.project)
                    raise
                warm.last_used = self._clock()
                if finish is not None and finish(answer, warm.container.id):
                    if answer.reason is Reason.CANCELLED:
                        # A stop's caller (the compile service stopping it, the broker
                        # stopping) goes on at once to the dir or to its own end: removed first.
                        self._retire_now(target.project)
                    else:
                        self._retire_behind(target.project, held)
                return answer
        raise AssertionError("unreachable: the second attempt returns or raises")

    @staticmethod
    @contextmanager
    def _waited(
        lock: threading.Lock | threading.BoundedSemaphore, cancel_fd: int | None
    ) -> Iterator[_Held]:
        if cancel_fd is None:
            lock.acquire()
        while cancel_fd is not None and not lock.acquire(timeout=QUEUE_LOOK):
            if readable([cancel_fd], 0):
                raise Cancelled()
        held = _Held(lock)
        try:
            yield held
        finally:
            if not held.passed_on:
                lock.release()

    def _container(self, target: Target) -> _Warm:
        """The project's container if it may take a compile now, else a new one."""
        now = self._clock()
        with self._mutex:
            warm = self._warm.get(target.project)
        if warm is not None:
            left = warm.started + self.limits.lifetime - now
            # A dir the site removed and made again (Overleaf's "recompile from scratch"
            # clears the project's dir) is another dir: a container bound to the old one would
            # compile in an empty, deleted dir.
            if (
                warm.name == target.name
                and still_there(warm.directory, target.directory.path)
                and left > self.limits.reuse
                and warm.container.alive()
            ):
                return warm
            self._retire(target.project)
        if self._closed:
            raise AgentGone("the broker is stopping")
        container = self._start(self.backend, target.name, dict(target.body))
        warm = _Warm(container, target.name, now, now, hold_dir(target.directory.path))
        with self._mutex:
            closed = self._closed
            if not closed:
                self._warm[target.project] = warm
        if closed:  # closed while it started: close missed it
            warm.let_go()
            raise AgentGone("the broker is stopping")
        return warm

    def _take(self, project: str) -> _Warm | None:
        """The project's container, no longer the pool's to hand out."""
        with self._mutex:
            return self._warm.pop(project, None)

    def _retire(self, project: str) -> None:
        warm = self._take(project)
        if warm is not None:
            warm.let_go()

    def _retire_behind(self, project: str, turn: _Held) -> None:
        """Retire the project's container in a thread of its own that holds the project's
        turn until the container is removed: the caller answers its client meanwhile. (Under
        gVisor a fork bomb's sandbox took over 30 s to remove on a starved host: its client
        waited that long for an answer the agent had given at once.)"""
        warm = self._take(project)
        if warm is None:
            return

        def remove() -> None:
            try:
                self._let_go(project, warm, REMOVE_WITHIN)
            finally:
                turn.lock.release()
                with self._mutex:
                    self._removing.discard(threading.current_thread())

        thread = threading.Thread(target=remove, name=f"retire-{project}", daemon=True)
        turn.passed_on = True
        with self._mutex:
            self._removing.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: removed here, as before
            turn.passed_on = False
            with self._mutex:
                self._removing.discard(thread)
            self._let_go(project, warm)

    def _let_go(self, project: str, warm: _Warm, remove_within: float = CALL_TIMEOUT) -> None:
        """`warm` let go and removed. The engine's failure to remove it is logged, not raised:
        what the compile came to stands (a starved engine's 30 s timeout on the removal once
        made a runsc fork bomb read as an engine down). What is left is the engine's removal
        under way, or the next create's of its name (which removes what is in its way), or
        the next sweep's."""
        try:
            warm.let_go(remove_within)
        except EngineError as e:
            self._log(f"{project}: its container was not removed after its compile: {e}")

    def _retire_now(self, project: str) -> None:
        """Retire the project's container here, in its turn, before the caller returns or
        raises: a compile ended by its agent's end, by an error, or stopped."""
        warm = self._take(project)
        if warm is not None:
            self._let_go(project, warm)

    def next_retirement(self) -> float | None:
        """When (on the pool's clock) the next idle container is due to be retired; a project
        compiling now has none (its end sets another: the broker's loop is woken then)."""
        with self._mutex:
            times = [
                w.last_used + self.limits.idle
                for p, w in self._warm.items()
                if not self._turns.get(p, _FREE).locked()
            ]
        return min(times, default=None)

    def retire_idle(self) -> list[str]:
        """Retire the containers idle for `idle` seconds (none whose project is compiling);
        their names."""
        now = self._clock()
        retired = []
        with self._mutex:
            due = [p for p, w in self._warm.items() if w.last_used + self.limits.idle <= now]
        for project in due:
            turn = self._turn(project)
            if not turn.acquire(blocking=False):
                continue  # compiling now: its end sets last_used again
            try:
                with self._mutex:
                    warm = self._warm.get(project)
                if warm is not None and warm.last_used + self.limits.idle <= now:
                    self._retire(project)
                    retired.append(warm.name)
            finally:
                turn.release()
        return retired

    def sweep(self) -> list[str]:
        """Remove every container of this broker (`owner`) the engine has (the broker or the
        engine has just started: none of them is ours to reuse); their short ids. Another
        broker's on the same engine (another site's socket) are left to it."""
        removed = []
        for found in self.backend.containers():
            labels = found.get("Labels") or {}
            if labels.get(COMPILE_LABEL) and labels.get(BROKER_LABEL) == self.owner:
                self.backend.remove(found["Id"])
                removed.append(str(found["Id"])[:12])
        return removed

    def _retire_quietly(self, project: str) -> None:
        try:
            self._retire(project)
        except EngineError:
            pass  # the engine is going too: its own sweep at its next start takes the container

    def close(self) -> None:
        """Retire every container, all at once (the broker is stopping: each removal is an
        engine round trip, and the site's stop has 2 s), and wait for the removals behind an
        answer still under way: the broker leaves no container of its own."""
        with self._mutex:
            self._closed = True
            projects = list(self._warm)
        threads = [threading.Thread(target=self._retire_quietly, args=(p,)) for p in projects]
        for thread in threads:
            thread.start()
        with self._mutex:
            threads += self._removing
        for thread in threads:
            thread.join()
