"""`sharelatex-init run`: the life of the init, top to bottom, as an operator knows it.

export the environment ─► startup scripts ─► services ─► wait for a stop signal
─► pre-shutdown scripts ─► stop services (reverse order) ─► post-shutdown scripts
─► end every other process (when PID 1) ─► exit status
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init.config import DEFAULT_SERVICE_USER, SERVICE_USER, Mode, Settings
from init.core import container_env, process, services, status
from init.core.log import Level, Log
from init.core.loop import EventLoop
from init.core.output import OutputPipe
from init.core.process import Exit, SpawnSpec
from init.core.services import ServiceSpec
from init.core.supervisor import Supervisor
from init.engine import dockerd
from init.errors import SpawnError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any

    from init.engine.dind import InnerEngine
    from init.engine.host import HostEngine
    from init.texlive.job import TexLiveJob

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the init passes on to its services. Not the synchronous fault signals (SEGV, BUS, FPE,
# ILL, TRAP, SYS, ABRT): a handler for those would turn a real fault in PID 1 into a busy loop.
FORWARDED_SIGNALS = tuple(
    s
    for s in (
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
)
EXIT_STARTUP_FAILED = 1


@dataclass(frozen=True)
class Shutdown:
    """The time limits of stopping, named for what they bound."""

    grace: float = 8.0  # pre-shutdown scripts and services (my_init's KILL_PROCESS_TIMEOUT)
    kill_all: float = 1.0  # everything else left in the namespace (KILL_ALL_PROCESSES_TIMEOUT)


@dataclass(frozen=True)
class BootOptions:
    startup_dir: Path = services.DEFAULT_STARTUP_DIR
    pre_shutdown_dir: Path = services.DEFAULT_PRE_SHUTDOWN_DIR
    post_shutdown_dir: Path = services.DEFAULT_POST_SHUTDOWN_DIR
    service_dir: Path = services.DEFAULT_SERVICE_DIR
    env_files: container_env.EnvFiles = field(default_factory=container_env.EnvFiles)
    status_file: Path = status.DEFAULT_STATUS_FILE
    shutdown: Shutdown = field(default_factory=Shutdown)
    skip_startup_files: bool = False
    kill_all_on_exit: bool = True
    settings: Settings | None = None  # None: no sandboxed compiles (the plain init)
    engine_layout: dockerd.EngineLayout = field(default_factory=dockerd.EngineLayout)
    storage_opt_in: str | None = None  # SANDBOXED_COMPILES_STORAGE_DRIVER

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
        self.engine: InnerEngine | None = None
        self.host_engine: HostEngine | None = None
        self.texlive: TexLiveJob | None = None
        # What the services were given to compile with: kept in the status so that a `docker
        # exec ... sharelatex-init compile` by an operator compiles the same way.
        self.compile_environment: dict[str, str] = {}
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
        engine_spec = self.prepare_docker_side()
        self.start_engine(engine_spec)  # comes up while the rest of the boot runs
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

    def prepare_docker_side(self) -> ServiceSpec | None:
        """The Docker side before anything else: the inner dockerd's spec, or None.

        dind: privileges, cgroups and storage checked. Sibling: the host's socket and the host
        dirs checked, and the services' environment set from them.
        """
        settings = self.options.settings
        if settings is not None and settings.mode is Mode.SIBLING:
            from init.engine.host import HostEngine  # only sibling mode pays for its imports

            self.host_engine = HostEngine(
                self.loop, self.log, self.options.status_file.parent, on_change=self.write_status
            )
            self.environ.update(self.host_engine.prepare(settings, self.environ))
            self.prepare_compiles(settings, self.environ["DOCKER_HOST"])
            return None
        if settings is None or settings.mode is not Mode.DIND:
            return None
        from init.engine.dind import InnerEngine  # only dind mode pays for its imports

        layout = self.options.engine_layout
        self.engine = InnerEngine(
            self.loop,
            self.log,
            layout,
            run_dir=self.options.status_file.parent,
            on_change=self.write_status,
            on_ready=self.start_texlive,
        )
        self.environ["DOCKER_HOST"] = layout.docker_host
        self.prepare_compiles(settings, layout.docker_host)
        service_user = self.environ.get(SERVICE_USER) or DEFAULT_SERVICE_USER
        return self.engine.prepare(
            self.options.storage_opt_in, settings.all_texlive_images, service_user
        )

    def prepare_compiles(self, settings: Settings, docker_host: str) -> None:
        """The TeX Live installer's job, and what the services need to compile sandboxed: the
        shim first on their PATH, or the variables of their own docker runner."""
        from init.compiles import service_env as compile_env
        from init.texlive.job import TexLiveJob

        run_dir = self.options.status_file.parent
        self.texlive = TexLiveJob(
            self.log,
            settings,
            docker_host.removeprefix("unix://"),
            self.options.status_file,
            on_change=self.write_status,
            on_done=self._on_images_present,
        )
        runner = compile_env.choose_runner(settings)
        shim_dir = run_dir / "shim"
        if runner == "shim":
            compile_env.write_shims(shim_dir, sys.executable)
        self.environ.update(compile_env.environment(settings, self.environ, runner, shim_dir))
        self.compile_environment = {
            k: self.environ[k] for k in compile_env.SHARED_VARIABLES if k in self.environ
        }
        how = f"the sandboxing latexmk in {shim_dir}" if runner == "shim" else "their docker runner"
        self.log.info("init", f"the services compile through {how}")

    def start_texlive(self) -> None:
        """The installer, once the engine answers (dind: dockerd's first readiness)."""
        job = self.texlive
        if job is None or job.launched or self.supervisor is None or self.supervisor.stopping:
            return
        self.supervisor.start([job.spec()], {job.spec().name: job})

    def _on_images_present(self) -> None:
        if self.host_engine is not None:
            self.host_engine.prove_again()

    def export_environment(self) -> None:
        self.environ = container_env.export(self.options.env_files, self.environ)
        self.write_status()

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
            self.environ = container_env.reimport(self.options.env_files, self.environ)
        return True

    def start_engine(self, engine_spec: ServiceSpec | None) -> None:
        """The inner dockerd, first of all services, so that it is the last to stop."""
        self.supervisor = Supervisor(self.loop, self.log, self.environ, on_change=self.write_status)
        if engine_spec is not None and self.engine is not None:
            self.supervisor.start([engine_spec], {engine_spec.name: self.engine})
        if self.host_engine is not None:
            self.start_texlive()  # the host's engine answered already
        settings = self.options.settings
        if settings is not None and settings.http_address is not None:
            self.supervisor.start([self._http_spec(settings.http_address)])

    def _http_spec(self, address: tuple[str, int]) -> ServiceSpec:
        """The optional /healthz /readyz /status endpoint: a child, so PID 1 serves nothing."""
        host, port = address
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        argv = (
            sys.executable, "-m", "init.httpd.status",
            "--listen", listen, "--status-file", str(self.options.status_file),
        )  # fmt: skip
        return ServiceSpec(name="http-status", directory=Path("/"), argv=argv)

    def start_services(self) -> None:
        """The services of the service dir in name order, with the environment as it is now."""
        if self.supervisor is None:
            raise RuntimeError("start_engine makes the supervisor; call it first")
        specs = services.discover(self.options.service_dir)
        if self.engine is not None and any(s.name == dockerd.SERVICE_NAME for s in specs):
            self.log.warning(
                "init",
                f"{self.options.service_dir}/{dockerd.SERVICE_NAME} ignored: "
                "the init runs the inner dockerd itself",
            )
            specs = [s for s in specs if s.name != dockerd.SERVICE_NAME]
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
        if self.engine is not None:
            self.engine.mark_stopped()
        if self.texlive is not None:
            self.texlive.mark_stopped()
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

    def _engine_summary(self) -> dict[str, Any] | None:
        if self.engine is not None:
            return self.engine.summary()
        if self.host_engine is not None:
            return self.host_engine.summary()
        return None

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
        document: dict[str, Any] = {
            "pid": os.getpid(),
            "phase": self.phase,
            "started_at": round(self.started_at, 3),
            "message": self.message,
            "services": self.supervisor.snapshot() if self.supervisor else [],
            "engine": self._engine_summary(),
            "texlive": self.texlive.summary() if self.texlive is not None else None,
            "compile_environment": self.compile_environment,
        }
        try:
            status.write(self.options.status_file, document)
        except OSError as e:
            self.log.warning("init", f"cannot write {self.options.status_file}: {e.strerror}")
