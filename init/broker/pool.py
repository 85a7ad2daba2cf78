"""The warm containers of every project: one compile at a time per project, at most `slots`
at once overall, a project's container reused while it has time left for a whole compile,
retired after `idle` seconds unused, and all of them swept by label when the broker or the
engine (re)starts. Blocking calls, one thread per compile (the broker's clients' threads);
the retirement is a timer the broker's loop asks for (`next_retirement`), not a poller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from init.broker.protocol import Answer, Output, Request
from init.broker.target import BROKER_LABEL, Target
from init.broker.warm import AgentGone, WarmContainer
from init.compiles.identity import share_with_compile
from init.engine.client import COMPILE_LABEL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from init.compiles.paths import CompileDir
    from init.engine.client import DockerBackend


@dataclass(frozen=True)
class PoolLimits:
    slots: int  # compiles at once, all projects together
    idle: float  # a container unused this long is retired
    lifetime: float  # a container's life (its agent exits then, whatever happens)
    reuse: float  # a container is used again only with this much of its life left


@dataclass
class _Warm:
    container: WarmContainer
    name: str
    started: float
    last_used: float


class Pool:
    def __init__(
        self,
        backend: DockerBackend,
        limits: PoolLimits,
        clock: Callable[[], float] = time.monotonic,
        start: Callable[..., WarmContainer] = WarmContainer.start,
        share: Callable[[CompileDir], object] | None = None,  # share_with_compile
    ) -> None:
        self.backend = backend
        self.limits = limits
        self._clock = clock
        self._start = start
        self._share = share_with_compile if share is None else share
        self._slots = threading.BoundedSemaphore(limits.slots)
        self._mutex = threading.Lock()
        self._turns: dict[str, threading.Lock] = {}
        self._warm: dict[str, _Warm] = {}

    def _turn(self, project: str) -> threading.Lock:
        with self._mutex:
            return self._turns.setdefault(project, threading.Lock())

    def run(
        self,
        target: Target,
        request: Request,
        output: Callable[[Output], None],
        cancel_fd: int | None = None,
    ) -> Answer:
        """Run `request` in the project's warm container (started if need be), after the
        project's earlier compiles and within the global limit. A container whose agent had
        ended before the request could reach it (idle, lifetime) is replaced once. The
        compile dir is first shared with the project's uid (what CLSI wrote since the last
        compile made group-writable), as on the exec path: here, in the project's turn, so
        every caller of the pool gets it; ConfigError when it cannot be."""
        with self._turn(target.project), self._slots:
            self._share(target.directory)
            for attempt in (1, 2):
                warm = self._container(target)
                try:
                    answer = warm.container.run(request, output, cancel_fd)
                except AgentGone as e:
                    self._retire(target.project)
                    if e.sent or attempt == 2:
                        raise
                    continue
                except BaseException:
                    self._retire(target.project)
                    raise
                warm.last_used = self._clock()
                return answer
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _container(self, target: Target) -> _Warm:
        """The project's container if it may take a compile now, else a new one."""
        now = self._clock()
        with self._mutex:
            warm = self._warm.get(target.project)
        if warm is not None:
            left = warm.started + self.limits.lifetime - now
            if warm.name == target.name and left > self.limits.reuse and warm.container.alive():
                return warm
            self._retire(target.project)
        container = self._start(self.backend, target.name, dict(target.body))
        warm = _Warm(container, target.name, now, now)
        with self._mutex:
            self._warm[target.project] = warm
        return warm

    def _retire(self, project: str) -> None:
        with self._mutex:
            warm = self._warm.pop(project, None)
        if warm is not None:
            warm.container.close()

    def next_retirement(self) -> float | None:
        """When (on the pool's clock) the next idle container is due to be retired."""
        with self._mutex:
            times = [w.last_used + self.limits.idle for w in self._warm.values()]
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
        """Remove every broker container the engine has (the broker or the engine has just
        started: none of them is ours to reuse); their short ids."""
        removed = []
        for found in self.backend.containers():
            labels = found.get("Labels") or {}
            if labels.get(COMPILE_LABEL) and labels.get(BROKER_LABEL):
                self.backend.remove(found["Id"])
                removed.append(str(found["Id"])[:12])
        return removed

    def close(self) -> None:
        """Retire every container."""
        with self._mutex:
            projects = list(self._warm)
        for project in projects:
            self._retire(project)
