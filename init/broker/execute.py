"""One compile run by the broker: a Job through the pool to its project's agent, under either
runtime (runc, gVisor's runsc), watched (its budget of bytes and files, its wall clock, the
engine's OOM event, a stop), and what came of it as a `Ran` (init.compiles.outcome), which the
shim and the compile command turn into their exit status and messages.

A compile is stopped by a byte on its Stopper's fd: a stop from its client (a signal to the
shim, the client gone), the budget's watcher, or the broker stopping. The agent then kills its
process group and tidies, and answers "cancelled".
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from init.broker import target as targets
from init.broker.pool import Cancelled, Pool
from init.broker.protocol import Answer, Output, ProtocolError, Reason
from init.broker.warm import AgentGone
from init.compiles.budget import Settled, Watcher, settle
from init.compiles.outcome import NotReady, Ran, not_ready_message
from init.compiles.profile import Job
from init.compiles.settings import CompileSettings
from init.engine.client import ContainerEnd, DockerBackend, EngineRefused, ImageMissing

# latexmk's and TeX's own exits (ok, a LaTeX error, latexmk's "errors in the run"): the
# project's container is kept for its next compile. After any other end (a limit, a signal,
# the timeout) it is removed before the project's next compile can start, as on the exec path:
# what a compile that went that far left in its sandbox never meets the next one. Its client
# is answered meanwhile (init.broker.pool: under gVisor a fork bomb's sandbox took over 30 s
# to remove on a starved host, after its agent had reaped every process of it).
CLEAN_EXITS = (0, 1, 12)
TAIL = 65536  # the output kept for the outcome's classification (a fork failure, its last lines)

# Why a compile was stopped.
BUDGET = "budget"
STOP = "stop"  # its client asked (a signal), or its client is gone
SHUTDOWN = "shutdown"  # the broker is stopping


class BrokerStopping(Exception):
    """The broker stopped this compile because it is stopping itself."""


class Stopper:
    """A compile's stop: the first reason given wins; a byte on `fd` tells the pool and the
    agent's connection (both wait on it beside their own fds)."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.reason: str | None = None
        self.signal: int | None = None
        self.tripped_at: float | None = None  # time.monotonic() of the first trip
        self.why = ""  # the first trip's words, for the log (its client is gone, ...)
        self._lock = threading.Lock()

    def trip(self, reason: str, signum: int | None = None, why: str = "") -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.signal, self.why = reason, signum, why
            self.tripped_at = time.monotonic()
        try:
            os.write(self._write, b"x")
        except OSError:
            pass  # closed: the compile is over

    def close(self) -> None:
        with self._lock:
            self.reason = self.reason or "closed"
        os.close(self._write)
        os.close(self.fd)


@dataclass
class Broker:
    """What every compile shares: the settings read once, the engine, the pool, the seccomp
    profile, and the services' environment as the broker got it."""

    settings: CompileSettings
    backend: DockerBackend
    pool: Pool
    seccomp: str | None


@dataclass
class _Turn:
    """What one compile's turn in the pool hands over: its container, its budget watcher and
    when it began (set once it is placed; a second attempt keeps the first's), how it ended."""

    container: str | None = None
    watcher: Watcher | None = None
    began: float = 0.0  # time.time(), for the engine's OOM events
    started: float | None = None  # time.monotonic()
    settled: Settled | None = None  # past its budget: what was removed
    oom: bool = False
    end: ContainerEnd | None = None  # its agent ended under it: how, read before its removal

    def seconds(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started


def run(
    broker: Broker,
    settings: CompileSettings,
    job: Job,
    output: Callable[[bytes], None],
    stopper: Stopper,
) -> Ran:
    """Run `job` in its project's warm container; NotReady when its image is not in the engine,
    EngineError when the engine or the container refuses it, BrokerStopping when the broker
    stopped it."""
    limits = settings.limits
    runtime = settings.runtime(job.image)
    place = targets.target(job, limits, broker.seccomp, runtime, owner=broker.pool.owner)
    request = targets.request(job, limits)
    tail = bytearray()
    turn = _Turn()

    def pass_on(message: Output) -> None:
        output(message.data)
        tail.extend(message.data)
        del tail[: max(0, len(tail) - TAIL)]

    def placed(container: str) -> None:
        turn.container = container
        if turn.watcher is None:  # else a second attempt, in a fresh container: the same compile
            # The dir's usage before the compile writes: counted against it, in its turn.
            watcher = Watcher(job.directory.path, limits.budget, lambda: stopper.trip(BUDGET))
            if watcher.budget.on:
                watcher.start()
            turn.watcher, turn.began, turn.started = watcher, time.time(), time.monotonic()

    def finish(answer: Answer, container: str) -> bool:
        """In the project's turn, the container still its: settle a budget overrun (remove
        what the compile wrote before the next compile can start), look for the OOM event."""
        watcher = turn.watcher
        assert watcher is not None, "placed before it runs"
        watcher.stop(last=False)
        over = watcher.overrun is not None or (watcher.budget.on and watcher.stop() is not None)
        if over:
            turn.settled = settle(watcher)
            return True
        if answer.reason is Reason.CANCELLED:
            # Stopped: a fresh container for the project's next compile, as on the exec path
            # (removed in this compile's turn, before its client hears the end).
            return True
        oom = answer.reason in (Reason.EXIT, Reason.SIGNAL) and answer.status != 0
        if oom:
            turn.oom = oom = broker.backend.oom_killed(container, turn.began)
        clean = answer.reason is Reason.EXIT and answer.status in CLEAN_EXITS
        return oom or not clean or limits.idle == 0

    def gone(container: str) -> None:
        """Its agent ended under it (the OOM killer, a kill): how, before its removal."""
        if stopper.reason in (None, BUDGET):  # else the stop says what it came to
            turn.end = broker.backend.ended(container, turn.began)

    try:
        answer = broker.pool.run(place, request, pass_on, stopper.fd, placed, finish, gone)
    except Cancelled:
        return _stopped(stopper, 0.0, "")
    except ImageMissing as e:
        raise NotReady(not_ready_message(job.image, settings.status_file)) from e
    except (AgentGone, ProtocolError) as e:
        return _gone(broker, turn, stopper, tail, e)
    finally:
        if turn.watcher is not None:
            turn.watcher.stop(last=False)
    seconds = turn.seconds()
    text = tail.decode(errors="replace")
    if turn.settled is not None:
        return Ran(None, seconds, budget=turn.settled, output=text)
    if answer.reason is Reason.ERROR:
        raise EngineRefused(f"the compile's container refused it: {answer.message}")
    if answer.reason is Reason.CANCELLED:
        return _stopped(stopper, seconds, text)
    timed_out = answer.reason is Reason.TIMEOUT
    return Ran(
        answer.status, seconds, timed_out=timed_out, oom_killed=turn.oom,
        output=text,
    )  # fmt: skip


def _stopped(stopper: Stopper, seconds: float, text: str) -> Ran:
    if stopper.reason == SHUTDOWN:
        raise BrokerStopping()
    return Ran(None, seconds, stopped_by=stopper.signal or signal.SIGKILL, output=text)


def _gone(broker: Broker, turn: _Turn, stopper: Stopper, tail: bytearray, e: Exception) -> Ran:
    """The agent ended under the compile (the OOM killer took it, the compile killed it, it
    stopped answering): its container is gone, the compile is over. When it never reached
    the agent, the container could not take it: the engine's refusal."""
    if stopper.reason == SHUTDOWN:
        raise BrokerStopping() from e
    if isinstance(e, AgentGone) and not e.sent:
        raise EngineRefused(f"the compile's container ended before it could run: {e}") from e
    if stopper.reason is not None and stopper.reason != BUDGET:
        return _stopped(stopper, 0.0, tail.decode(errors="replace"))
    text = tail.decode(errors="replace") + f"\n(the compile's container ended: {e})"
    oom = False
    if turn.end is not None:  # its container ended under it
        oom = turn.end.oom_killed
    elif turn.container is not None and turn.started is not None:
        oom = broker.backend.oom_killed(turn.container, turn.began)  # it may still run
    return Ran(None, turn.seconds(), oom_killed=oom, output=text)
