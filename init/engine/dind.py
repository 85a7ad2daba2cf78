"""Docker-in-docker mode inside PID 1: preflight, the inner dockerd's hooks, its readiness.

The steps in order: the privilege check (refuse with the fix), cgroups set up, the data root
claimed for this engine alone (a second container on the same volume is refused with the
fix: its engine would hang on the first's), the compiles root on a filesystem of its own
(init.engine.compiles_fs: a loop-mounted ext4 image, made or reused by a child PID 1 waits
for), the storage choice (refuse a layered data root with the fix), then dockerd as the first
service. Each time dockerd starts, a child (`init.engine.ready`) waits for its API, sweeps the
compile containers an earlier run left (the engine has just started: nothing of ours runs there
yet), and reports the storage driver; until it reports, compiles are not ready.

Once ready, the engine is watched for what its ping does not show (an engine that answers
`/_ping` but cannot run a container): dockerd's containerd through a pidfd in the loop (its end
is known at once), and a self-test every SELF_TEST_PERIOD seconds by the same child in its
`--self-test` mode (`/_ping` within 2 s, containerd accepting, and every SELF_TEST_RUN_EVERY-th
time one container of the compile image run to its end). Either failing makes the engine
`failed` with the reason; self-tests then come every SELF_TEST_RETRY seconds, each running a
container, and the first that passes makes it ready again. PID 1 only keeps a timer and an fd;
the child asks the engine, bounded by SELF_TEST_DEADLINE. A self-test never sweeps and touches
no container but its own.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from init.checks import Status
from init.config import (
    COMPILES_SIZE,
    DEFAULT_SERVICE_USER,
    DOCKER_HOST,
    SERVICE_USER,
    Mode,
    Settings,
)
from init.core import children
from init.core.component import Component, Phase
from init.core.log import Log
from init.core.loop import EventLoop, Timer
from init.core.process import Exit
from init.core.services import ServiceSpec
from init.core.supervisor import Service, ServiceHooks
from init.engine import cgroups, compiles_fs, dockerd, privilege, runtime, storage
from init.engine.ready import MODULE as READY_CHECK
from init.engine.ready import ReadyRequest, ReadyResult
from init.engine.side import CompileWiring, EngineStatus, Installer, OnChange, SandboxSide
from init.errors import ConfigError, SpawnError

# dockerd stops its containers on SIGTERM and waits this long for each (default 15 s): compile
# containers end at once on SIGTERM, and the whole stop must fit Docker's 10 s.
DOCKERD_SHUTDOWN_TIMEOUT = ("--shutdown-timeout", "2")
SELF_TEST_RESULT = "engine-self-test.json"
# The self-test: every 30 s while it passes (a Python child: 60 ms of CPU, 0.2 % of a core),
# with a container run every 10th time (5 min: a run costs ~0.3 s of CPU across dockerd,
# containerd, the shim and runc, and a few lines of dockerd's log); every 3 s with a container
# while it fails. Each within 10 s.
SELF_TEST_PERIOD = 30.0
SELF_TEST_RUN_EVERY = 10
SELF_TEST_RETRY = 3.0
SELF_TEST_DEADLINE = 10.0


class InnerDocker(SandboxSide, ServiceHooks):
    """The inner dockerd as PID 1 sees it: preflight, hooks around its starts, its state."""

    mode = Mode.DIND.value

    def __init__(
        self,
        loop: EventLoop,
        log: Log,
        settings: Settings,
        layout: dockerd.EngineLayout,
        run_dir: Path,
        installer: Installer,
        wiring: CompileWiring,
        service_user: str = "www-data",
        on_change: OnChange = lambda: None,
        root: Path = Path("/"),
    ) -> None:
        super().__init__(log, installer, wiring)
        self.loop = loop
        self.settings = settings
        self.layout = layout
        self.run_dir = run_dir
        self.service_user = service_user
        self.root = root
        self.state = Component(Phase.STARTING, on_change=on_change)
        self.driver = ""
        self.platform: runtime.Platform | None = None  # runsc's, when compiles use it
        self.ready_seconds: float | None = None
        self._checking = False
        self._service: Service | None = None
        self._spec: ServiceSpec | None = None
        self._self_test: Timer | None = None
        self._testing = False  # a self-test child runs
        self._self_tests = 0
        self._containerd: tuple[int, int] | None = None  # (pid, pidfd) of dockerd's containerd
        self._generation = 0  # one per start and end of dockerd: a self-test's answer is its own
        self._compiles_mount: Path | None = None  # the compiles root, when this boot mounted it
        self._data_root_lock: int | None = None  # storage.claim's fd, held for PID 1's life
        installer.use_socket(str(layout.socket))

    # -- preflight -----------------------------------------------------------------------

    def prepare(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Everything before dockerd may start. No privileges is a configuration error (exit
        78); a layered data root only keeps compiles off, so the site still comes up and says
        why."""
        verdict = privilege.check(self.root)
        if verdict.status is Status.FAIL:
            raise ConfigError([f"{verdict.message}; {verdict.fix}"])
        registration = self._register_runtimes()
        plan = cgroups.plan(self.root)
        for line in cgroups.describe(plan):
            self.log.info("cgroups", line)
        cgroups.apply(plan, self.root)
        claimed = storage.claim(self.layout.data_root)
        if claimed.refused:
            self._refuse(claimed.refused, claimed.fix)
        self._data_root_lock = claimed.fd
        # Refused: no compile runs, so no filesystem is made for them either.
        bounded = not claimed.refused and self._compiles_filesystem({**environ, **self.own})
        need = storage.bytes_needed(self.settings.all_texlive_images)
        choice = storage.plan(self.layout.data_root, self.settings.storage_driver, need_bytes=need)
        verdict = storage.check(choice)
        if not bounded:
            pass  # refused already, with the fix
        elif verdict.status is Status.FAIL:
            self._refuse(verdict.message, verdict.fix)
        else:
            (self.log.warning if verdict.status is Status.WARN else self.log.info)(
                "storage", verdict.message
            )
            args = (
                *storage.dockerd_args(choice),
                *DOCKERD_SHUTDOWN_TIMEOUT,
                *dockerd.socket_group_args(self.layout, self.service_user),
                *(registration.dockerd_args() if registration else ()),
            )
            self._spec = dockerd.service_spec(self.layout, tuple(args))
        return self.with_compiles(environ, {DOCKER_HOST: self.layout.docker_host})

    def _compiles_filesystem(self, environ: Mapping[str, str]) -> bool:
        """The compiles root on a filesystem of its own, before dockerd and the services start.
        False when it was asked (an explicit size) and cannot be: compiles are refused with the
        fix; auto only warns, the per-compile budget still holding each compile."""
        fs_plan = compiles_fs.plan(
            self.settings.compiles_dir, self.settings.compiles_size, _owner(environ)
        )
        warn = fs_plan.action is compiles_fs.Action.SKIP
        for note in fs_plan.notes:
            (self.log.warning if warn else self.log.info)(compiles_fs.NAME, note)
        if not fs_plan.works:
            return True
        result = self._run_compiles_fs(fs_plan)
        for note in result.notes:
            self.log.info(compiles_fs.NAME, note)
        if result.ok:
            self._compiles_mount = fs_plan.compiles_dir
            return True
        message = f"cannot give {fs_plan.compiles_dir} a filesystem of its own: {result.error}"
        if fs_plan.explicit:
            self._refuse(message, result.fix)
            return False
        self.log.warning(compiles_fs.NAME, f"{message}; {result.fix}")
        return True

    def _run_compiles_fs(self, fs_plan: compiles_fs.Plan) -> compiles_fs.Result:
        """The child that runs mkfs, fsck and mount; PID 1 waits for it (nothing else runs
        yet), its output in the log."""
        path = self.run_dir / "compiles-fs.json"
        box: list[compiles_fs.Result] = []
        try:
            children.start(
                self.loop, self.log, "compiles-fs", compiles_fs.MODULE, fs_plan.argv(path), path,
                lambda document: box.append(compiles_fs.Result.from_json(document)),
            )  # fmt: skip
        except SpawnError as e:
            return compiles_fs.Result(False, error=str(e), fix=f"set {COMPILES_SIZE}=0")
        self.loop.run_until(lambda: bool(box), self.loop.clock() + compiles_fs.DEADLINE + 10)
        return box[0] if box else compiles_fs.Result(False, error="no answer from its child")

    def _register_runtimes(self) -> runtime.Registration | None:
        """runsc registered with the inner dockerd when a compile image runs under it (exit 78
        when it cannot be: no runsc in the image, KVM asked where it cannot run)."""
        registration = runtime.plan_registration(
            self.settings, self.layout.extra_args, self.run_dir, self.root
        )
        if registration is None:
            return None
        runtime.apply_registration(registration)
        self.platform = registration.platform
        self.log.info(
            "runtime", f"compiles run under {runtime.describe(self.settings, self.platform.name)}"
            f" ({self.platform.reason})"
        )  # fmt: skip
        return registration

    def engine_service(self) -> tuple[ServiceSpec, ServiceHooks] | None:
        return (self._spec, self) if self._spec is not None else None

    # -- hooks around each start of dockerd ----------------------------------------------

    def before_start(self, service: Service) -> None:
        leftovers = dockerd.find_leftovers(self.layout, self.root / "proc")
        for path in leftovers.paths():
            self.log.info("dockerd", f"removing {path}, left by an unclean stop")
        dockerd.clear(leftovers)

    def started(self, service: Service) -> None:
        self._service = service
        self._new_generation()
        self.state.set(Phase.STARTING)
        self._start_check()

    def exited(self, service: Service, exit_: Exit) -> None:
        self._new_generation()
        if not self.state.is_(Phase.REFUSED):
            self.state.set(Phase.DOWN, f"dockerd {exit_.describe()}")

    def _new_generation(self) -> None:
        """dockerd started or ended: what its earlier self-tests say is no longer about it."""
        self._generation += 1
        self._unwatch_containerd()
        if self._self_test is not None:
            self._self_test.cancel()
            self._self_test = None

    # -- readiness -------------------------------------------------------------------------

    def _start_check(self) -> None:
        if self._checking:
            return  # the running check keeps asking; it will see the new dockerd
        started = self.loop.clock()
        request = ReadyRequest(
            socket=self.layout.socket,
            result=self.run_dir / "engine-check.json",
            deadline=self.layout.ready_timeout,
            sweep=True,  # dockerd has just started: what carries our label is left over
        )

        def done(document: object) -> None:
            self._checking = False
            self._on_check_done(ReadyResult.from_json(document), self.loop.clock() - started)

        try:
            children.start(
                self.loop, self.log, "engine", READY_CHECK, request.argv(), request.result, done
            )
        except SpawnError as e:
            self.state.set(Phase.FAILED, f"cannot check the engine: {e}")
            return
        self._checking = True

    def _on_check_done(self, result: ReadyResult, seconds: float) -> None:
        if self.state.is_(Phase.REFUSED, Phase.STOPPED):
            return
        if not result.ready:
            tail = " | ".join(list(self._service.recent)[-5:]) if self._service else ""
            self.state.set(Phase.FAILED, f"{result.error}; dockerd said: {tail}")
            self.log.error("dockerd", self.state.reason)
            return
        self.driver = result.driver
        if self.driver == "vfs" and self.settings.storage_driver != "vfs":
            # dockerd falls back to vfs by itself when overlay2 cannot work: every layer a
            # full copy, the trap users of the old images hit without a word.
            self._refuse(
                "dockerd chose the vfs storage driver (overlay2 does not work on "
                f"{self.layout.data_root}); compiles stay off",
                storage.volume_fix(self.layout.data_root),
            )
            return
        self.ready_seconds = round(seconds, 3)
        self.state.set(Phase.READY)
        self._watch_containerd()
        self._schedule_self_test(SELF_TEST_PERIOD)
        swept = f"; removed {len(result.swept)} leftover compile containers" if result.swept else ""
        self.log.info(
            "dockerd",
            f"ready in {seconds:.2f} s, storage driver {self.driver}, "
            f"engine {result.server_version or '?'}{swept}",
        )
        self.start_installer()

    # -- the self-test and containerd's watch, while the engine runs ------------------------

    def _schedule_self_test(self, delay: float) -> None:
        if self._self_test is None and not self.state.is_(Phase.REFUSED, Phase.STOPPED):
            self._self_test = self.loop.call_later(delay, self._run_self_test)

    def _run_self_test(self) -> None:
        self._self_test = None
        if self._checking or self._testing or not self.state.is_(Phase.READY, Phase.FAILED):
            return  # dockerd (re)starting: its start check speaks, then schedules the next
        if self._supervisor is not None and self._supervisor.stopping:
            return
        self._self_tests += 1
        # A container of the compile image takes the path a compile takes: while the engine
        # is failed (to say it works again only once it does), and every SELF_TEST_RUN_EVERY
        # tests (a hung containerd still accepts connections). Not on vfs, where a container
        # is a full copy of the image.
        full = self.state.is_(Phase.FAILED) or self._self_tests % SELF_TEST_RUN_EVERY == 0
        generation = self._generation
        # Under the compile image's own runtime: a runsc that cannot start a sandbox fails here.
        under = runtime.runtime_for(self.settings, self.settings.texlive_image)
        request = ReadyRequest(
            socket=self.layout.socket,
            result=self.run_dir / SELF_TEST_RESULT,
            deadline=SELF_TEST_DEADLINE,
            self_test=True,
            image=self.settings.texlive_image if full and self.driver != "vfs" else "",
            containerd=self._containerd_dir() / "containerd.sock",
            runtime="" if under == runtime.RUNC else under,
        )

        def done(document: object) -> None:
            self._testing = False
            if generation == self._generation:
                self._on_self_test_done(ReadyResult.from_json(document))

        try:
            children.start(
                self.loop, self.log, "engine", READY_CHECK, request.argv(), request.result, done
            )
        except SpawnError as e:
            self.log.warning("dockerd", f"cannot self-test the engine: {e}")
            self._schedule_self_test(SELF_TEST_RETRY)
            return
        self._testing = True

    def _on_self_test_done(self, result: ReadyResult) -> None:
        if self.state.is_(Phase.REFUSED, Phase.STOPPED):
            return
        if result.ready:
            if self.state.is_(Phase.FAILED):
                self.log.info("dockerd", "the self-test passes again: compiles can run")
                self.state.set(Phase.READY)
            self._watch_containerd()
            self._schedule_self_test(SELF_TEST_PERIOD)
            return
        self._failed(f"self-test: {result.error}")

    def _failed(self, reason: str) -> None:
        """Compiles cannot run now; test again soon, so that the engine is ready again within
        SELF_TEST_RETRY of its recovery (dockerd starts a dead containerd again by itself)."""
        if self.state.reason != reason:
            self.log.error("dockerd", f"{reason}; compiles are not ready, testing again every "
                           f"{SELF_TEST_RETRY:g} s")  # fmt: skip
            self.state.set(Phase.FAILED, reason)
        self._schedule_self_test(SELF_TEST_RETRY)

    def _containerd_dir(self) -> Path:
        # dockerd's own containerd (the inner engine has no other) keeps its pid and socket here.
        return self.layout.exec_root / "containerd"

    def _watch_containerd(self) -> None:
        """Know at once when dockerd's containerd ends (kill -9, the OOM killer): it is not
        PID 1's child, so no SIGCHLD; a pidfd in the loop instead, no polling. dockerd starts
        it again after a while: the self-test says when compiles can run again."""
        if self._containerd is not None:
            return
        try:
            pid = int((self._containerd_dir() / "containerd.pid").read_text().strip())
            fd = os.pidfd_open(pid)
        except (OSError, ValueError, AttributeError):
            return  # no pidfile (an external containerd), or no pidfd: the self-test alone
        if process_name(self.root / "proc", pid) != "containerd":
            os.close(fd)  # a pidfile naming a pid that is no longer containerd
            return
        self._containerd = (pid, fd)
        self.loop.add_reader(fd, self._containerd_ended)

    def _unwatch_containerd(self) -> None:
        if self._containerd is not None:
            _pid, fd = self._containerd
            self.loop.remove_reader(fd)
            os.close(fd)
            self._containerd = None

    def _containerd_ended(self) -> None:
        pid = self._containerd[0] if self._containerd else 0
        self._unwatch_containerd()
        if not self.state.is_(Phase.READY, Phase.FAILED):
            return
        if self._supervisor is not None and self._supervisor.stopping:
            return
        if self._self_test is not None:
            self._self_test.cancel()
            self._self_test = None
        self._failed(f"containerd (pid {pid}) ended; dockerd starts it again")

    def _refuse(self, message: str, fix: str) -> None:
        # Logged first: a reader of the status (written at once by the state's change) then
        # finds the line in the log too.
        self.log.error("dockerd", f"{message}; {fix}" if fix else message)
        self.state.set(Phase.REFUSED, message, fix)

    def mark_stopped(self) -> None:
        super().mark_stopped()
        if self._compiles_mount is not None:
            # After dockerd and every process have ended: the filesystem is clean for the next
            # boot's fsck, its loop device freed, and the log says so.
            self.log.info(compiles_fs.NAME, compiles_fs.unmount(self._compiles_mount))
            self._compiles_mount = None
        self._new_generation()
        self.state.set(Phase.STOPPED)

    @property
    def ready(self) -> bool:
        return self.state.is_(Phase.READY)

    def status(self) -> EngineStatus:
        return EngineStatus(
            mode=self.mode,
            state=self.state.phase.value,
            ready=self.ready,
            reason=self.state.reason,
            fix=self.state.fix,
            since=round(self.state.since, 3),
            socket=str(self.layout.socket),
            driver=self.driver,
            ready_seconds=self.ready_seconds,
            runtimes=runtime.describe(self.settings, self.platform.name if self.platform else ""),
        )


def _owner(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(uid, gid) of the services' user, who owns the compiles root; None when unknown or root
    (the root then stays root's, and the image's startup script chowns it)."""
    name = environ.get(SERVICE_USER, "").strip() or DEFAULT_SERVICE_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return (entry.pw_uid, entry.pw_gid) if entry.pw_uid and entry.pw_gid else None


def process_name(proc: Path, pid: int) -> str:
    """The command name of `pid` (/proc/<pid>/comm), "" when there is no such process."""
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""
