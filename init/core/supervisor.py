"""The services: start them, restart them with backoff, forward signals, stop them in order."""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from init.core import process
from init.core.backoff import SERVICE_RESTART, Backoff
from init.core.log import Log
from init.core.loop import EventLoop, Timer
from init.core.output import OutputPipe
from init.core.process import Exit, SpawnSpec
from init.core.services import ServiceSpec
from init.core.states import State, check_transition
from init.errors import SpawnError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any

RECENT_LINES = 20


class ServiceHooks:
    """What another part of the init wants to do around one service's starts and exits."""

    def before_start(self, service: Service) -> None:
        """Just before each start (clear what an unclean stop left behind)."""

    def started(self, service: Service) -> None:
        """Just after each start."""

    def exited(self, service: Service, exit_: Exit) -> None:
        """Each time it ends, before any restart is scheduled."""


# A service that has run this long without exiting counts as up (runit has no such notion;
# the status needs one so a crash loop never shows as "up").
UP_AFTER = 1.0


@dataclass
class Service:
    """One service's live record; only the Supervisor changes it."""

    spec: ServiceSpec
    state: State = State.DOWN
    pid: int | None = None
    restarts: int = 0
    quick_exits: int = 0
    started_at: float = 0.0  # monotonic
    since: float = field(default_factory=time.time)  # wall clock, for people
    last_exit: Exit | None = None
    last_exit_at: float | None = None
    reason: str = ""
    next_start_at: float | None = None  # wall clock
    finishing: bool = False
    timer: Timer | None = None
    output: OutputPipe | None = None
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_LINES))

    @property
    def name(self) -> str:
        return self.spec.name

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "quick_exits": self.quick_exits,
            "since": round(self.since, 3),
            "last_exit": None
            if self.last_exit is None
            else {
                "code": self.last_exit.code,
                "signal": self.last_exit.signal,
                "description": self.last_exit.describe(),
                "at": self.last_exit_at,
            },
            "reason": self.reason,
            "next_start_at": self.next_start_at,
        }


class Supervisor:
    """Runs a set of runit-style services under the init's event loop."""

    def __init__(
        self,
        loop: EventLoop,
        log: Log,
        environ: Mapping[str, str],
        on_change: Callable[[], None] = lambda: None,
        backoff: Backoff = SERVICE_RESTART,
    ) -> None:
        self.loop = loop
        self.log = log
        self.services: list[Service] = []
        self.environ = dict(environ)
        self.on_change = on_change
        self.backoff = backoff
        # Spawning, signalling and the clocks go through the loop's system: a test's fake one
        # runs the whole supervisor on a scripted history.
        self.system = loop.system
        self.hooks: dict[str, ServiceHooks] = {}
        self.stopping = False
        self._started_order: list[Service] = []
        # Every process group a service or finish script was started in and that may still
        # have members: what a service leaves behind is ended with it at shutdown.
        self._groups: set[int] = set()

    # -- start and restart ------------------------------------------------------------

    def start(
        self, specs: list[ServiceSpec], hooks: Mapping[str, ServiceHooks] | None = None
    ) -> None:
        """Take on `specs` and start each without a `down` file, in the order given."""
        self.hooks.update(hooks or {})
        added = [Service(spec, since=self.system.wall_clock()) for spec in specs]
        self.services.extend(added)
        for service in added:
            if service.spec.start_at_boot:
                self._start(service)
            else:
                self.log.info(service.name, "not started: it has a down file")
        self.on_change()

    def _start(self, service: Service) -> None:
        service.timer = None
        service.next_start_at = None
        hooks = self.hooks.get(service.name, ServiceHooks())
        hooks.before_start(service)
        output = OutputPipe(self.loop, self.log, service.name, service.recent)
        spec = SpawnSpec(
            argv=service.spec.argv,
            env={**self.environ, **dict(service.spec.env)},
            cwd=service.spec.directory,
            new_session=True,
            stdin=_devnull(),
            stdout=output.write_fd,
            stderr=output.write_fd,
        )
        try:
            pid = self.system.spawn(spec)
        except SpawnError as e:
            output.close()
            self._fail(service, str(e))
            return
        finally:
            if spec.stdin is not None:
                os.close(spec.stdin)
        output.parent_side_started()
        self._groups.add(pid)
        service.output = output
        service.pid = pid
        service.started_at = self.loop.clock()
        service.reason = ""
        if service not in self._started_order:
            self._started_order.append(service)
        self._move(service, State.STARTING)
        self.log.info(service.name, f"started, pid {pid}")
        self.loop.watch_child(pid, lambda exit_: self._on_exit(service, exit_))
        service.timer = self.loop.call_later(UP_AFTER, lambda: self._on_up(service, pid))
        hooks.started(service)

    def _on_up(self, service: Service, pid: int) -> None:
        if service.state is State.STARTING and service.pid == pid:
            self._move(service, State.UP)

    def _fail(self, service: Service, reason: str) -> None:
        service.quick_exits += 1
        delay = self.backoff.delay(service.quick_exits)
        service.reason = reason
        self._move(service, State.FAILED)
        self.log.error(service.name, f"{reason}; trying again in {delay:.1f} s")
        self._schedule_start(service, delay)

    def _on_exit(self, service: Service, exit_: Exit) -> None:
        if service.output is not None:
            service.output.drain()
        self._groups = {g for g in self._groups if self.system.signal_group(g, 0)}
        uptime = self.loop.clock() - service.started_at
        service.pid = None
        service.last_exit = exit_
        service.last_exit_at = round(self.system.wall_clock(), 3)
        if service.timer is not None:
            service.timer.cancel()
            service.timer = None
        self.hooks.get(service.name, ServiceHooks()).exited(service, exit_)
        if service.state is State.STOPPING or self.stopping:
            self.log.info(service.name, f"stopped: {exit_.describe()} after {uptime:.1f} s")
            self._after_exit(service, exit_, then=lambda: self._move(service, State.DOWN))
            return
        if exit_.code is not None and exit_.code in service.spec.done_statuses:
            service.reason = f"finished: {exit_.describe()}"
            self.log.info(service.name, f"finished: {exit_.describe()} after {uptime:.1f} s")
            self._after_exit(service, exit_, then=lambda: self._move(service, State.DOWN))
            return
        if not self.backoff.is_quick(uptime):
            service.quick_exits = 0
        service.quick_exits += 1
        service.restarts += 1
        delay = self.backoff.delay(service.quick_exits)
        service.reason = f"{exit_.describe()} after {uptime:.1f} s"
        crash_loop = " (crash loop)" if service.quick_exits >= 3 else ""
        # Known now, so that no status says "backoff" without when (a finish script may still
        # run first; the timer, once set, says it again).
        service.next_start_at = round(self.system.wall_clock() + delay, 3)
        self._move(service, State.BACKOFF)
        self.log.warning(
            service.name,
            f"{exit_.describe()} after {uptime:.1f} s; restarting in {delay:.1f} s{crash_loop}",
        )
        self._after_exit(service, exit_, then=lambda: self._schedule_start(service, delay))

    def _after_exit(self, service: Service, exit_: Exit, then: Callable[[], None]) -> None:
        """Run `finish` (runit's arguments: exit code or -1, and the signal), then `then`."""
        finish = service.spec.finish
        if finish is None or not os.access(finish, os.X_OK):
            then()
            return
        code = str(exit_.code if exit_.code is not None else -1)
        spec = SpawnSpec(
            argv=(str(finish), code, str(exit_.signal or 0)),
            env=self.environ,
            cwd=service.spec.directory,
            new_session=True,
            stdin=_devnull(),
        )
        try:
            pid = self.system.spawn(spec)
        except SpawnError as e:
            self.log.error(service.name, f"finish: {e}")
            then()
            return
        finally:
            if spec.stdin is not None:
                os.close(spec.stdin)
        self._groups.add(pid)
        service.finishing = True
        service.pid = pid

        def finished(finish_exit: Exit) -> None:
            service.finishing = False
            service.pid = None
            if not finish_exit.ok:
                self.log.warning(service.name, f"finish {finish_exit.describe()}")
            then()

        self.loop.watch_child(pid, finished)

    def _schedule_start(self, service: Service, delay: float) -> None:
        if self.stopping:
            self._move(service, State.DOWN)
            return
        service.next_start_at = round(self.system.wall_clock() + delay, 3)
        self.on_change()
        service.timer = self.loop.call_later(delay, lambda: self._start(service))

    def _move(self, service: Service, state: State) -> None:
        if service.state is state and state is not State.FAILED:
            return
        check_transition(service.state, state)
        service.state = state
        service.since = self.system.wall_clock()
        self.on_change()

    # -- signals and stopping -----------------------------------------------------------

    def forward(self, signum: int) -> None:
        """Send a signal the init received to every running service's process group."""
        for service in self.services:
            if service.pid is not None and not service.finishing:
                self.system.signal_group(service.pid, signum)

    def stop_all(self, deadline: Callable[[], float]) -> list[str]:
        """Stop services in reverse start order by `deadline()`; return the names killed.

        Each service gets its share of the time left (the time left divided by the services
        still to stop), so one that ignores its stop signal cannot eat the others' grace; the
        time a quick one does not use passes on to the rest. `deadline` is re-read after every
        event: a second SIGTERM moves it to now.
        """
        self.stopping = True
        killed: list[str] = []
        for service in self.services:
            if service.state in (State.BACKOFF, State.FAILED) and service.pid is None:
                if service.timer is not None:
                    service.timer.cancel()
                service.next_start_at = None
                self._move(service, State.DOWN)
        running = [s for s in reversed(self._started_order) if s.pid is not None]
        for index, service in enumerate(running):
            left = len(running) - index
            share = max(0.0, deadline() - self.loop.clock()) / left
            if not self._stop_one(service, self.loop.clock() + share, deadline):
                killed.append(service.name)
        self._end_leftovers(deadline)
        return killed

    def _stop_one(self, service: Service, until: float, deadline: Callable[[], float]) -> bool:
        """Stop one service; True if it went by itself, False if it had to be killed."""
        if service.pid is None:
            return True
        if not service.finishing:
            self._move(service, State.STOPPING)
            name = process.signal_name(service.spec.stop_signal)
            self.log.info(service.name, f"stopping: {name} to process group {service.pid}")
            self.system.signal_group(service.pid, service.spec.stop_signal)
            # A stopped (SIGSTOP'd) process only sees its stop signal once continued.
            self.system.signal_group(service.pid, signal.SIGCONT)
        gone_or_late = lambda: service.pid is None or self.loop.clock() >= deadline()  # noqa: E731
        self.loop.run_until(gone_or_late, until)
        if service.pid is None:
            return True
        self.log.warning(service.name, "did not stop in time; killing its process group")
        while service.pid is not None:
            self.system.signal_group(service.pid, signal.SIGKILL)
            self.loop.run_until(lambda: service.pid is None, self.loop.clock() + 1.0)
        return False

    def _end_leftovers(self, deadline: Callable[[], float]) -> None:
        """Processes a service left behind in its group (already sent its stop signal)."""

        def alive() -> list[int]:
            return [g for g in sorted(self._groups) if self.system.signal_group(g, 0)]

        if not alive():
            return
        # The service's own stop signal may be one its leftovers ignore (sh's background jobs
        # ignore SIGINT and SIGQUIT): without a SIGTERM they would hold the stop to the deadline.
        for group in alive():
            self.system.signal_group(group, signal.SIGTERM)
            self.system.signal_group(group, signal.SIGCONT)
        self.loop.run_until(lambda: not alive() or self.loop.clock() >= deadline(), deadline())
        for group in alive():
            self.log.warning("init", f"killing what is left of process group {group}")
            self.system.signal_group(group, signal.SIGKILL)

    def all_down(self) -> bool:
        return all(s.pid is None for s in self.services)

    def close_outputs(self) -> None:
        for service in self.services:
            if service.output is not None:
                service.output.close()

    def snapshot(self) -> list[dict[str, Any]]:
        return [service.summary() for service in self.services]


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
