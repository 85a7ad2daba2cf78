"""`sharelatex-init run`: the life of the init, top to bottom, as an operator knows it.

export the environment ─► startup scripts ─► services ─► wait for a stop signal
─► pre-shutdown scripts ─► stop services (reverse order) ─► post-shutdown scripts
─► end every other process (when PID 1) ─► exit status
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init.core import container_env, process, services, status_file
from init.core.backoff import Backoff
from init.core.docker_side import DockerSide
from init.core.log import Level, Log
from init.core.loop import EventLoop, Timer
from init.core.output import OutputPipe
from init.core.process import Exit, SpawnSpec
from init.core.services import ServiceSpec
from init.core.signals import FORWARDED_SIGNALS, STOP_SIGNALS
from init.core.status_file import ServiceStatus, StatusDocument
from init.core.supervisor import Supervisor
from init.errors import SpawnError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from collections.abc import Callable

    # Made by init.boot once the loop exists: (loop, log, on_change) -> the mode's side.
    SideFactory = Callable[[EventLoop, Log, Callable[[], None]], DockerSide]

EXIT_STARTUP_FAILED = 1
# After a failed write of the status file: try again in 0.5 s, doubling to every 5 s. A status
# dir writable again is written within 5 s, and an outage of hours costs a write every 5 s.
STATUS_REWRITE = Backoff(first=0.5, factor=2.0, cap=5.0, reset_after=0.0)


@dataclass(frozen=True)
class Shutdown:
    """The time limits of stopping, named for what they bound."""

    grace: float = 8.0  # pre-shutdown scripts and services (my_init's KILL_PROCESS_TIMEOUT)
    kill_all: float = 1.0  # everything else left in the namespace (KILL_ALL_PROCESSES_TIMEOUT)


@dataclass(frozen=True)
class BootOptions:
    """What `run` was given: the dirs, the status file, the limits, the Docker side."""

    startup_dir: Path = services.DEFAULT_STARTUP_DIR
    pre_shutdown_dir: Path = services.DEFAULT_PRE_SHUTDOWN_DIR
    post_shutdown_dir: Path = services.DEFAULT_POST_SHUTDOWN_DIR
    service_dir: Path = services.DEFAULT_SERVICE_DIR
    env_files: container_env.EnvFiles = field(default_factory=container_env.EnvFiles)
    status_file: Path = status_file.DEFAULT_STATUS_FILE
    shutdown: Shutdown = field(default_factory=Shutdown)
    skip_startup_files: bool = False
    kill_all_on_exit: bool = True
    docker_side: SideFactory | None = None  # None: no sandboxed compiles (the plain init)
    # The init's own services beside the engine (the optional HTTP status endpoint).
    own_services: tuple[ServiceSpec, ...] = ()

    def absolute(self, base: Path) -> BootOptions:
        """The same options with each relative path taken from `base` (the start directory)."""
        return dataclasses.replace(
            self,
            startup_dir=base / self.startup_dir,
            pre_shutdown_dir=base / self.pre_shutdown_dir,
            post_shutdown_dir=base / self.post_shutdown_dir,
            service_dir=base / self.service_dir,
            env_files=container_env.EnvFiles(base / self.env_files.directory),
            status_file=base / self.status_file,
        )


class Init:
    """The init's state across its life: the loop, the services, whether a stop was asked.

    Everything it does to processes, and the clocks, go through `system` (process.System):
    the real OS by default, a scripted fake in the unit tests.
    """

    def __init__(
        self,
        options: BootOptions,
        log: Log,
        environ: Mapping[str, str],
        system: process.System = process.REAL,
    ) -> None:
        self.options = options
        self.log = log
        self.environ = dict(environ)
        self.system = system
        self.started_at = system.wall_clock()
        # Where the init was started: its scripts run there, though the init itself does not
        # stay (leave_start_directory).
        self.start_dir: Path | None = None
        self.phase = "starting"
        self.message = ""
        self.stop_signal: int | None = None
        self.deadline: float | None = None
        self.loop = EventLoop(log, (*STOP_SIGNALS, *FORWARDED_SIGNALS), system)
        self.supervisor: Supervisor | None = None
        # The status file's writes: this start's identity, and the retry after a failed write.
        self._boot: status_file.Boot | None = None
        self._written_once = False
        self._status_failures = 0
        self._status_retries = 0
        self._status_failed_since = 0.0
        self._status_retry: Timer | None = None
        make_side = options.docker_side
        self.docker = (
            DockerSide() if make_side is None else make_side(self.loop, log, self.write_status)
        )
        for signum in STOP_SIGNALS:
            self.loop.on_signal(signum, self._on_stop_signal)
        for signum in FORWARDED_SIGNALS:
            self.loop.on_signal(signum, self._forward)

    # -- the life of the init -------------------------------------------------------------

    def run(self) -> int:
        """Boot, serve until asked to stop, shut down; the exit status."""
        self.leave_start_directory()
        self.become_reaper()
        services.discover(self.options.service_dir)  # a bad service dir: exit 78 before anything
        self.prepare_docker_side()
        self.start_engine()  # comes up while the rest of the boot runs
        self.export_environment()
        if not self.run_startup_scripts():
            failed = EXIT_STARTUP_FAILED if self.stop_signal is None else 0
            return self.shutdown(failed, services_ran=False)
        self.start_services()
        process.release_memory()
        self.wait_for_stop_signal()
        return self.shutdown(0, services_ran=True)

    def leave_start_directory(self) -> None:
        """Work from / so the init keeps no directory busy (dumb-init's rule); the paths it was
        given keep their meaning, and its scripts still start where it was started."""
        self.start_dir = self.system.leave_directory()
        if self.start_dir is not None:
            self.options = self.options.absolute(self.start_dir)

    def become_reaper(self) -> None:
        if self.system.getpid() != 1 and not self.system.become_subreaper():
            self.log.warning("init", "not PID 1 and cannot be a subreaper: orphans go elsewhere")

    def prepare_docker_side(self) -> None:
        """The Docker side before anything else (dind: privileges, cgroups, storage; sibling:
        the host's socket and dirs): the services' environment gains what it says."""
        self.environ.update(self.docker.prepare(self.environ))

    def export_environment(self) -> None:
        self.environ = container_env.export(
            self.options.env_files, self.environ, self._environment_warning
        )
        self.write_status()

    def _environment_warning(self, message: str) -> None:
        self.log.warning("environment", message)

    def run_startup_scripts(self) -> bool:
        """Each executable in the startup dir, in name order; the first failure stops the boot."""
        if self.options.skip_startup_files:
            return True
        for script in services.scripts(self.options.startup_dir):
            self.log.info("startup", f"running {script}")
            exit_ = self.run_script(script, "startup", ends_on_stop_signal=True)
            if exit_ is None:
                return False  # a stop signal came first
            if not exit_.ok:
                self.message = f"startup script {script} {exit_.describe()}"
                self.log.error("startup", f"{script} {exit_.describe()}; not starting the services")
                return False
            self.environ = container_env.reimport(
                self.options.env_files, self.environ, self._environment_warning
            )
        return True

    def start_engine(self) -> None:
        """The inner dockerd, first of all services, so that it is the last to stop; then what
        the Docker side runs beside it (the TeX Live installer, once the engine answers)."""
        self.supervisor = Supervisor(self.loop, self.log, self.environ, on_change=self.write_status)
        engine = self.docker.engine_service()
        if engine is not None:
            spec, hooks = engine
            self.supervisor.start([spec], {spec.name: hooks})
        self.docker.start(self.supervisor)
        if self.options.own_services:
            self.supervisor.start(list(self.options.own_services))

    def start_services(self) -> None:
        """The services of the service dir in name order, with the environment as it is now."""
        if self.supervisor is None:
            raise RuntimeError("start_engine makes the supervisor; call it first")
        specs = services.discover(self.options.service_dir)
        engine = self.docker.engine_service()
        if engine is not None and any(s.name == engine[0].name for s in specs):
            name = engine[0].name
            self.log.warning(
                "init",
                f"{self.options.service_dir}/{name} ignored: the init runs the inner {name} itself",
            )
            specs = [s for s in specs if s.name != name]
        self.supervisor.environ = dict(self.environ)
        self.phase = "running"
        self.log.info("init", f"starting {len(specs)} services from {self.options.service_dir}")
        self.supervisor.start(specs)

    def wait_for_stop_signal(self) -> None:
        self.loop.run_until(lambda: self.stop_signal is not None)

    def shutdown(self, exit_status: int, services_ran: bool) -> int:
        """Everything that must happen before the init exits, inside the grace period."""
        limits = self.options.shutdown
        self.phase = "stopping"
        if self.deadline is None:
            self.deadline = self.loop.clock() + limits.grace
        self.write_status()
        # First, before the services: a helper child still at work (the sibling check's proof
        # container on the host engine) cleans up inside the grace, not in the 1 s that
        # end_all_processes gives whatever is left.
        self.docker.end_children(self._deadline())
        if services_ran:
            self.run_scripts(self.options.pre_shutdown_dir, "pre-shutdown")
        if self.supervisor is not None:  # the services, and the inner dockerd last
            killed = self.supervisor.stop_all(self._deadline)
            if killed:
                self.log.warning("init", f"killed after the grace period: {', '.join(killed)}")
        self.run_scripts(self.options.post_shutdown_dir, "post-shutdown")
        if self.system.getpid() == 1 and self.options.kill_all_on_exit:
            self.end_all_processes(limits.kill_all)
        if self.supervisor is not None:
            self.supervisor.close_outputs()
        self.docker.mark_stopped()
        self.phase = "stopped"
        self.write_status()
        self.log.info("init", f"exiting with status {exit_status}")
        return exit_status

    # -- the steps' details --------------------------------------------------------------

    def run_scripts(self, directory: Path, step: str) -> None:
        """Shutdown scripts: each in turn, all inside the grace period."""
        for script in services.scripts(directory):
            self.log.info(step, f"running {script}")
            exit_ = self.run_script(script, step, ends_on_stop_signal=False)
            if exit_ is not None and not exit_.ok:
                self.log.warning(step, f"{script} {exit_.describe()}")

    def run_script(self, script: Path, step: str, ends_on_stop_signal: bool) -> Exit | None:
        """Run one script under the loop; None if a stop signal or the deadline ended it.

        A startup script runs as long as it takes but ends on a stop signal; a shutdown script
        ends at the grace period's deadline. Either way it gets SIGTERM first, then SIGKILL.
        """
        output = OutputPipe(self.loop, self.log, f"{step} {script.name}")
        stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = self.system.spawn(
                SpawnSpec(
                    argv=(str(script),),
                    env=self.environ,
                    cwd=self.start_dir,  # where the scripts ran before the init left it
                    new_session=True,
                    stdin=stdin,
                    stdout=output.write_fd,
                    stderr=output.write_fd,
                )
            )
        except SpawnError as e:
            output.close()
            self.log.error(step, str(e))
            return Exit(127, None)
        finally:
            os.close(stdin)
        output.parent_side_started()
        result: list[Exit] = []
        self.loop.watch_child(pid, result.append)

        def must_end() -> bool:
            if ends_on_stop_signal:
                return self.stop_signal is not None
            return self.loop.clock() >= self._deadline()

        self.loop.run_until(
            lambda: bool(result) or must_end(), None if ends_on_stop_signal else self._deadline()
        )
        if not result:
            reason = "the init is stopping" if ends_on_stop_signal else "the grace period ran out"
            self.log.warning(step, f"ending {script}: {reason}")
            self.system.signal_group(pid, signal.SIGTERM)
            self.system.signal_group(pid, signal.SIGCONT)
            end = max(self._deadline(), self.loop.clock() + 0.5)
            if not self.loop.run_until(lambda: bool(result), end):
                self.system.signal_group(pid, signal.SIGKILL)
                self.loop.run_until(lambda: bool(result))
        output.close()
        return result[0] if result and not (ends_on_stop_signal and self.stop_signal) else None

    def end_all_processes(self, timeout: float) -> None:
        """As PID 1: SIGTERM everything left in the namespace, then SIGKILL at the timeout."""
        self.loop.reap_children()
        has_children = self.system.has_children
        if not has_children():
            return
        self.log.info("init", "ending the remaining processes")
        self.system.kill_all(signal.SIGTERM)
        self.system.kill_all(signal.SIGCONT)
        if self.loop.run_until(lambda: not has_children(), self.loop.clock() + timeout):
            return
        self.log.warning("init", f"processes left after {timeout:.1f} s; killing them")
        self.system.kill_all(signal.SIGKILL)
        self.loop.run_until(lambda: not has_children(), self.loop.clock() + 5.0)

    def _deadline(self) -> float:
        return self.deadline if self.deadline is not None else self.loop.clock()

    def _on_stop_signal(self, signum: int) -> None:
        name = process.signal_name(signum)
        if self.stop_signal is None:
            self.stop_signal = signum
            self.deadline = self.loop.clock() + self.options.shutdown.grace
            self.log.info("init", f"{name} received; stopping")
        else:
            # A second stop signal means "now": end the grace period here.
            self.log.warning("init", f"{name} again; cutting the grace period short")
            self.deadline = self.loop.clock()

    def _forward(self, signum: int) -> None:
        if self.supervisor is not None:
            quiet = signum in (signal.SIGCONT, signal.SIGWINCH)  # terminals send these often
            self.log.event(
                Level.DEBUG if quiet else Level.INFO,
                "init",
                f"passing {process.signal_name(signum)} to the services",
            )
            self.supervisor.forward(signum)

    def write_status(self) -> None:
        """The status document as things are now, written whole. The first write of this start
        clears what an earlier start left beside it. A write that fails (the dir read-only or
        full) is tried again on a timer of the loop, STATUS_REWRITE's backoff, until one
        succeeds: the file then says what is true, not what was true before the outage."""
        if not self._written_once:
            self._written_once = True
            self._boot = status_file.Boot.current()  # None without a /proc: the pid alone
            for path in status_file.clear_earlier(self.options.status_file):
                self.log.info("init", f"removed {path}, left by an earlier start")
        document = StatusDocument(
            pid=os.getpid(),
            phase=self.phase,
            started_at=self.started_at,
            message=self.message,
            boot=self._boot,
            services=tuple(
                ServiceStatus.from_json(s)
                for s in (self.supervisor.snapshot() if self.supervisor else [])
            ),
            engine=self.docker.engine_status(),
            texlive=self.docker.texlive_status(),
            compile_environment=self.docker.compile_environment(),
        )
        try:
            status_file.write(self.options.status_file, document)
        except OSError as e:
            self._status_write_failed(e)
            return
        if self._status_failures:
            outage = self.loop.clock() - self._status_failed_since
            self.log.info(
                "init",
                f"{self.options.status_file} written again, {outage:.1f} s after it could not be",
            )
        self._status_failures = 0
        if self._status_retry is not None:
            self._status_retry.cancel()
            self._status_retry = None

    def _status_write_failed(self, error: OSError) -> None:
        """Log once an outage, and keep one retry pending on the loop's timers (the loop goes
        on supervising meanwhile: nothing here waits)."""
        self._status_failures += 1
        if self._status_failures == 1:
            self._status_failed_since = self.loop.clock()
            self._status_retries = 0
            self.log.warning(
                "init",
                f"cannot write {self.options.status_file}: {error.strerror or error}; "
                f"trying again in {STATUS_REWRITE.first:g} s, then up to every "
                f"{STATUS_REWRITE.cap:g} s",
            )
        if self._status_retry is None:
            # The delay grows with the retries, not with the changes that failed meanwhile.
            delay = STATUS_REWRITE.delay(self._status_retries + 1)
            self._status_retry = self.loop.call_later(delay, self._rewrite_status)

    def _rewrite_status(self) -> None:
        self._status_retry = None
        self._status_retries += 1
        self.write_status()
