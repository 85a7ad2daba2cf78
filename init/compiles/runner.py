"""The exec path's runner: a job queued, then run by `docker exec` in its project's container,
waited for with its stops as events, and the container replaced when it may not be reused.
Its one caller is the compile broker, for images under gVisor (init.broker.execute: the agent
does not run there yet); every engine call goes through the broker's backend
(init.engine.client.DockerBackend).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping

from init.compiles.budget import Watcher, settle
from init.compiles.identity import share_with_compile
from init.compiles.outcome import NotReady, Ran, not_ready_message
from init.compiles.profile import (
    Job,
    compile_environment,
    container_name,
    container_spec,
    exec_command,
    load_seccomp,
    stop_command,
)
from init.compiles.queue import Queue, read_record, write_record
from init.compiles.settings import KILL_GRACE, CompileSettings
from init.core.wakeup import SignalWakeup
from init.engine.client import ApiError, ContainerGone, DockerBackend, ImageMissing
from init.errors import EngineError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from typing import Any

# latexmk's and TeX's own exits (ok, error, latexmk's "errors in the run"): the project's
# container is kept for the next compile; after any other it is replaced.
CLEAN_EXITS = (0, 1, 12)

# -- signals while a compile runs ------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    """SIGTERM/SIGINT/SIGHUP taken, not acted on: they arrive as bytes on a wakeup fd that the
    runner's select waits on beside the compile; the runner stops the container and says which
    signal stopped it (Ran.stopped_by). The broker's stops (init.broker.execute.StopFd) take
    this interface."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._wakeup: SignalWakeup | None = None

    def __enter__(self) -> StopSignals:
        self._wakeup = SignalWakeup(STOP_SIGNALS)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._wakeup is not None:
            self._wakeup.close()

    def take(self) -> int | None:
        """The first stop signal so far, if one came."""
        if self._wakeup is not None and self.received is None:
            arrived = self._wakeup.drain()
            self.received = arrived[0] if arrived else None
        return self.received

    def wait(self, done_fd: int, timeout: float) -> bool:
        """Until `done_fd` is readable (True), a stop signal, or the timeout (False)."""
        assert self._wakeup is not None, "wait inside `with StopSignals()`"
        deadline = time.monotonic() + timeout
        while self.take() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                ready, _, _ = select.select([done_fd, self._wakeup.fd], [], [], left)
            except InterruptedError:
                continue
            if done_fd in ready:
                return True
        return False


# -- the runner -----------------------------------------------------------------------------


class Runner:
    """Runs jobs in their project's container through an engine backend."""

    def __init__(
        self,
        settings: CompileSettings,
        backend: Any,  # init.engine.client.DockerBackend, or a fake in the unit tests
        warn: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.warn = warn
        self.deadlines = settings.limits.deadlines
        self.queue = Queue(settings.places.run_dir, settings.limits.slots)
        self._seccomp: str | None = None
        self._seccomp_loaded = False

    @property
    def seccomp(self) -> str | None:
        if not self._seccomp_loaded:
            self._seccomp = load_seccomp(self.warn)
            self._seccomp_loaded = True
        return self._seccomp

    def run(
        self,
        job: Job,
        output: Callable[[bytes], None] = lambda chunk: None,
        stop: StopSignals | None = None,
    ) -> Ran:
        """Queue, then run `job` in its project's container; the signal that stopped it is in
        `Ran.stopped_by` (the caller decides to die of it). `stop`: where stops come from
        (the broker's: its client's stop), else this process's own stop signals."""
        with self.queue.turn(job.directory.project), stop or StopSignals() as signals:
            if signals.take() is not None:
                return Ran(None, 0.0, stopped_by=signals.received)
            container = self._container(job)
            share_with_compile(job.directory)
            return self._exec(container, job, signals, output)

    def _container(self, job: Job) -> str:
        """The project's running container: the one noted in the run dir while it has time
        left for a whole compile, else a new one (NotReady when the image is missing)."""
        limits = self.settings.limits
        runtime = self.settings.runtime(job.image)
        record_path = self.queue.record_path(
            container_name(job.directory, job.image, limits, runtime)
        )
        record = read_record(record_path)
        left = float(record.get("expires", 0)) - time.time()
        if record.get("id") and left > self.deadlines.reuse:
            return str(record["id"])  # no engine call: the exec says if it is gone
        if record.get("id"):
            self.backend.remove(str(record["id"]))
        spec = container_spec(job, limits, self.seccomp, runtime=runtime)
        try:
            container_id = self.backend.start(spec.name, spec.create_body())
        except ImageMissing as e:
            raise NotReady(not_ready_message(job.image, self.settings.status_file)) from e
        write_record(record_path, {"id": container_id, "expires": spec.expires})
        return str(container_id)

    def _forget(self, job: Job) -> None:
        """Drop the note of the project's container (it is gone or being removed)."""
        limits = self.settings.limits
        name = container_name(job.directory, job.image, limits, self.settings.runtime(job.image))
        self.queue.record_path(name).unlink(missing_ok=True)

    def _exec(
        self, container: str, job: Job, signals: StopSignals, output: Callable[[bytes], None]
    ) -> Ran:
        limits = self.settings.limits
        env = {**compile_environment(limits, job.environment)}
        command = exec_command(job, limits)
        # The dir's usage and inodes before the compile writes (what it is counted against).
        watcher = Watcher(job.directory.path, limits.budget, lambda: _wake(done_w, b"b"))
        started, began = time.monotonic(), time.time()
        try:
            execution = self.backend.exec(
                container, command, job.directory.compile_user,
                str(job.directory.path), env,
            )  # fmt: skip
        except ContainerGone:
            # It ended (idle, lifetime, the engine restarted): start another, once.
            self._forget(job)
            container = self._container(job)
            execution = self.backend.exec(
                container, command, job.directory.compile_user,
                str(job.directory.path), env,
            )  # fmt: skip
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        tail = bytearray()
        # gVisor: a sandbox the OOM killer ended leaves the exec's stream open; its end says so.
        ender = None
        if self.settings.runtime(job.image) == "runsc":
            ender = self.backend.watch_end(container)

        def pump() -> None:
            try:
                for chunk in execution.stream():
                    output(chunk)
                    tail.extend(chunk)
                    del tail[: max(0, len(tail) - 65536)]
            except Exception as e:  # the stream ends with the container; the exit says why
                tail.extend(f"\n(stream ended: {e})".encode())
            finally:
                with contextlib.suppress(OSError):  # the runner stopped waiting (gVisor)
                    os.write(done_w, b"x")

        def watch() -> None:
            if ender is not None and ender.wait():
                with contextlib.suppress(OSError):
                    os.write(done_w, b"e")

        reader = threading.Thread(target=pump, name="compile-output", daemon=True)
        reader.start()
        end_watch = threading.Thread(target=watch, name="compile-end", daemon=True)
        if ender is not None:
            end_watch.start()
        if watcher.budget.on:
            watcher.start()
        try:
            finished = signals.wait(done_r, self.deadlines.wait)
        finally:
            os.close(done_r)
        seconds = time.monotonic() - started
        if ender is not None:
            ender.cancel()
            end_watch.join(5)
        watcher.stop(last=False)  # no sample writes to done_w from here on
        if finished and watcher.overrun is not None:
            return self._over_budget(container, job, watcher, execution, reader, done_w, started)
        if not finished:
            # A stop signal, or the in-container timeout did not end it: remove the container.
            self.backend.remove(container)
            self._forget(job)
            reader.join(5 if ender is None else 0.5)
            if reader.is_alive() and ender is not None:  # gVisor: removed, its stream open
                execution.abort()
                reader.join(5)
            if not reader.is_alive():  # else it still writes to it: the fd goes with the process
                os.close(done_w)
            return Ran(
                None,
                seconds,
                timed_out=signals.received is None,
                stopped_by=signals.received,
                output=tail.decode(errors="replace"),
            )
        reader.join(None if ender is None else 1.0)
        if reader.is_alive():  # the container ended under an open stream (gVisor)
            execution.abort()
            reader.join(5)
        os.close(done_w)
        exit_code = execution.exit_code()
        text = tail.decode(errors="replace")
        if watcher.budget.on and watcher.stop() is not None:
            # Past its budget in its last 100 ms: stopped all the same, what it made removed.
            self.backend.remove(container)
            self._forget(job)
            return Ran(None, seconds, budget=settle(watcher), output=text)
        timed_out = exit_code == 128 + signal.SIGKILL and seconds >= self.deadlines.timed_out_after
        oom = False
        if exit_code != 0 and not timed_out:  # None: the container died under it (gVisor)
            oom = self.backend.oom_killed(container, began)
        if oom or timed_out or limits.idle == 0 or exit_code not in CLEAN_EXITS:
            # A fresh container for the next compile: an OOM flag stays on a container, and
            # an odd exit may have left processes behind (a fork bomb's sleepers).
            self.backend.remove(container)
            self._forget(job)
        return Ran(exit_code, seconds, timed_out=timed_out, oom_killed=oom, output=text)

    def _over_budget(
        self,
        container: str,
        job: Job,
        watcher: Watcher,
        execution: Any,
        reader: threading.Thread,
        done_w: int,
        started: float,
    ) -> Ran:
        """The compile went past its budget: its processes killed at once by an exec as its
        uid (which also hands back what it wrote: the runner, the dir's owner, could not open
        a dir of the compile's uid), else its container killed; then what it wrote counted
        and removed, and the container removed."""
        try:
            ender = self.backend.exec(
                container, stop_command(job), job.directory.compile_user,
                str(job.directory.path), {},
            )  # fmt: skip
            for _ in ender.stream():
                pass
        except (ApiError, EngineError, ContainerGone):  # no exec (a full pids limit): SIGKILL
            with contextlib.suppress(ApiError, EngineError):
                self.backend.call("POST", f"/containers/{container}/kill", query={"signal": "KILL"})
        seconds = time.monotonic() - started
        self.backend.remove(container)
        self._forget(job)
        reader.join(5)
        if reader.is_alive():  # gVisor: removed, its stream open
            execution.abort()
            reader.join(5)
        if not reader.is_alive():  # else it still writes to it: the fd goes with the process
            os.close(done_w)
        return Ran(None, seconds, budget=settle(watcher))


def _wake(fd: int, byte: bytes) -> None:
    with contextlib.suppress(OSError):  # the runner stopped waiting already
        os.write(fd, byte)


def engine_backend(
    settings: CompileSettings, environ: Mapping[str, str] | None = None
) -> DockerBackend:
    """The engine the services' compiles run on (DOCKER_HOST), with the runner's deadlines."""
    return DockerBackend(
        settings.engine_url, settings.limits.deadlines.engine_call, KILL_GRACE, environ
    )
