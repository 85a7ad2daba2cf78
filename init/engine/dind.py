"""Docker-in-docker mode inside PID 1: preflight, the inner dockerd's hooks, its readiness.

The steps in order: the privilege check (refuse with the fix), cgroups set up, the storage
choice (refuse a layered data root with the fix), then dockerd as the first service. Each time
dockerd starts, a child (`init.engine.ready`) waits for its API, sweeps compile containers an
earlier run left, and reports the storage driver; until it reports, compiles are not ready.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from init.checks import Status
from init.core import children
from init.core.log import Log
from init.core.loop import EventLoop
from init.core.process import Exit
from init.core.services import ServiceSpec
from init.core.supervisor import Service, ServiceHooks
from init.engine import cgroups, dockerd, privilege, storage
from init.errors import ConfigError, SpawnError

# dockerd stops its containers on SIGTERM and waits this long for each (default 15 s): compile
# containers end at once on SIGTERM, and the whole stop must fit Docker's 10 s.
DOCKERD_SHUTDOWN_TIMEOUT = ("--shutdown-timeout", "2")


class InnerEngine(ServiceHooks):
    """The inner dockerd as PID 1 sees it: preflight, hooks around its starts, its state."""

    def __init__(
        self,
        loop: EventLoop,
        log: Log,
        layout: dockerd.EngineLayout,
        run_dir: Path,
        on_change: Callable[[], None] = lambda: None,
        root: Path = Path("/"),
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.loop = loop
        self.on_change = on_change
        self.on_ready = on_ready
        self.log = log
        self.layout = layout
        self.run_dir = run_dir
        self.root = root
        self.state = "starting"
        self.reason = ""
        self.fix = ""
        self.driver = ""
        self.since = time.time()
        self.ready_seconds: float | None = None
        self._checking = False
        self._service: Service | None = None
        self._storage_opt_in: str | None = None

    # -- preflight -----------------------------------------------------------------------

    def prepare(
        self, storage_opt_in: str | None, images: tuple[str, ...], service_user: str = "www-data"
    ) -> ServiceSpec | None:
        """Everything before dockerd may start; its service spec, or None when refused.

        No privileges is a configuration error (exit 78); a layered data root only keeps
        compiles off, so the site still comes up and says why.
        """
        verdict = privilege.check(self.root)
        if verdict.status is Status.FAIL:
            raise ConfigError([f"{verdict.message}; {verdict.fix}"])
        plan = cgroups.plan(self.root)
        for line in cgroups.describe(plan):
            self.log.info("cgroups", line)
        cgroups.apply(plan, self.root)
        self._storage_opt_in = storage_opt_in
        need = storage.bytes_needed(images)
        choice = storage.plan(self.layout.data_root, storage_opt_in, need_bytes=need)
        verdict = storage.check(choice)
        if verdict.status is Status.FAIL:
            self._refuse(verdict.message, verdict.fix)
            return None
        if verdict.status is Status.WARN:
            self.log.warning("storage", verdict.message)
        else:
            self.log.info("storage", verdict.message)
        args = (
            *storage.dockerd_args(choice),
            *DOCKERD_SHUTDOWN_TIMEOUT,
            *dockerd.socket_group_args(self.layout, service_user),
        )
        return dockerd.service_spec(self.layout, tuple(args))

    # -- hooks around each start of dockerd ----------------------------------------------

    def before_start(self, service: Service) -> None:
        leftovers = dockerd.find_leftovers(self.layout, self.root / "proc")
        for path in leftovers.paths():
            self.log.info("dockerd", f"removing {path}, left by an unclean stop")
        dockerd.clear(leftovers)

    def started(self, service: Service) -> None:
        self._service = service
        self._set("starting", "")
        self._start_check()

    def exited(self, service: Service, exit_: Exit) -> None:
        if self.state != "refused":
            self._set("down", f"dockerd {exit_.describe()}")

    # -- readiness -------------------------------------------------------------------------

    def _start_check(self) -> None:
        if self._checking:
            return  # the running check keeps asking; it will see the new dockerd
        started = self.loop.clock()

        def done(result: dict[str, Any]) -> None:
            self._checking = False
            self._on_check_done(result, self.loop.clock() - started)

        args = ("--socket", str(self.layout.socket), "--deadline", str(self.layout.ready_timeout))
        result_file = self.run_dir / "engine-check.json"
        try:
            children.start(
                self.loop, self.log, "engine", "init.engine.ready",
                (*args, "--result", str(result_file)), result_file, done,
            )  # fmt: skip
        except SpawnError as e:
            self._set("failed", f"cannot check the engine: {e}")
            return
        self._checking = True

    def _on_check_done(self, result: dict[str, Any], seconds: float) -> None:
        if self.state in ("refused", "stopped"):
            return
        if not result.get("ready"):
            tail = " | ".join(list(self._service.recent)[-5:]) if self._service else ""
            self._set("failed", f"{result.get('error', 'not ready')}; dockerd said: {tail}")
            self.log.error("dockerd", self.reason)
            return
        self.driver = str(result.get("driver", ""))
        if self.driver == "vfs" and self._storage_opt_in != "vfs":
            # dockerd falls back to vfs by itself when overlay2 cannot work: every layer a
            # full copy, the trap users of the old images hit without a word.
            self._refuse(
                "dockerd chose the vfs storage driver (overlay2 does not work on "
                f"{self.layout.data_root}); compiles stay off",
                storage.volume_fix(self.layout.data_root),
            )
            return
        self.ready_seconds = round(seconds, 3)
        swept = result.get("swept") or []
        self._set("ready", "")
        self.log.info(
            "dockerd",
            f"ready in {seconds:.2f} s, storage driver {self.driver}, "
            f"engine {result.get('server_version', '?')}"
            + (f"; removed {len(swept)} leftover compile containers" if swept else ""),
        )
        self.on_ready()

    def _refuse(self, message: str, fix: str) -> None:
        self.fix = fix
        self._set("refused", message)
        self.log.error("dockerd", f"{message}; {fix}" if fix else message)

    def _set(self, state: str, reason: str) -> None:
        self.state = state
        self.reason = reason
        self.since = time.time()
        self.on_change()

    def mark_stopped(self) -> None:
        self._set("stopped", "")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def summary(self) -> dict[str, Any]:
        return {
            "mode": "dind",
            "state": self.state,
            "ready": self.ready,
            "reason": self.reason,
            "fix": self.fix,
            "driver": self.driver,
            "socket": str(self.layout.socket),
            "since": round(self.since, 3),
            "ready_seconds": self.ready_seconds,
        }
