"""Sibling-containers mode inside PID 1: the host's engine, through its mounted socket.

Before the services start, a child (`init.engine.sibling_check`) checks the socket, inspects this
container through it, and works out the host paths behind the compile and output dirs (the
value users most often get wrong); a problem there is a configuration error (exit 78). The
services then get the socket and the resolved host paths in their environment. Once the TeX Live
installer has the compile image on the host engine, the check runs again to prove the mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

from init.checks import Status
from init.config import (
    DEFAULT_SERVICE_USER,
    DOCKER_HOST,
    HOST_DIR,
    HOST_DIR_COMPILES,
    HOST_DIR_OUTPUT,
    SERVICE_USER,
    Mode,
    Settings,
)
from init.core import children
from init.core.component import Component, Phase
from init.core.log import Log
from init.core.loop import EventLoop
from init.core.supervisor import Supervisor
from init.engine import compiles_fs, runtime, sibling
from init.engine.sibling_check import MODULE as SIBLING_CHECK
from init.engine.sibling_check import SiblingRequest, SiblingResult
from init.engine.side import (
    CompileWiring,
    EngineStatus,
    Installer,
    OnChange,
    Proof,
    SandboxSide,
)
from init.errors import ConfigError, EngineError, SpawnError

CHECK_DEADLINE = 5.0  # seconds for the host's engine to answer


class HostDocker(SandboxSide):
    """The host's engine as PID 1 sees it: checked at boot, then handed to the services."""

    mode = Mode.SIBLING.value

    def __init__(
        self,
        loop: EventLoop,
        log: Log,
        settings: Settings,
        run_dir: Path,
        installer: Installer,
        wiring: CompileWiring,
        on_change: OnChange = lambda: None,
    ) -> None:
        super().__init__(log, installer, wiring)
        self.loop = loop
        self.settings = settings
        self.run_dir = run_dir
        self.on_change = on_change
        self.state = Component(Phase.CHECKING, on_change=on_change)
        self.request: SiblingRequest | None = None
        self.result = SiblingResult()
        self._check: children.Child | None = None  # the last check started
        self._stopping = False
        installer.on_done = self.prove_again

    def prepare(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Check the socket and the host dirs; the environment the services need. Exit 78 on
        a problem, with every problem's fix."""
        try:
            socket = sibling.socket_path(environ)
        except EngineError as e:
            raise ConfigError([str(e)]) from e
        settings = self.settings
        own = {**environ, **self.own}
        services_user = own.get(SERVICE_USER) or DEFAULT_SERVICE_USER
        self.request = SiblingRequest.for_settings(
            settings,
            own,
            self.run_dir / "sibling-check.json",
            socket=socket,
            # Behind the proxy only the init (root) opens the host's socket: no service is given
            # its group. Without one, the services' user must be able to use it.
            service_user="root" if self.proxy is not None else services_user,
            deadline=CHECK_DEADLINE,
            grant_group=self.proxy is None,
        )
        result = self._run_check(self.request)
        self.result = result
        for note in result.notes:
            self.log.info("sibling", note)
        for warning in result.warnings:
            self.log.warning("sibling", warning)
        if not result.ok:
            self.state.set(Phase.FAILED, "; ".join(result.problems))
            raise ConfigError(result.problems)
        self.state.set(Phase.READY)
        shared = compiles_fs.check(settings.compiles_dir)  # no mount here: say so, with the fix
        if shared.status is Status.WARN:
            self.log.warning(compiles_fs.NAME, f"{shared.message}; {shared.fix}")
        compiles, output = result.host_dir_compiles, result.host_dir_output
        how = "derived from this container's mounts" if result.derived else "checked"
        self.log.info("sibling", f"host compile dir {compiles}, output dir {output} ({how})")
        self.installer.use_socket(str(socket))
        engine_env = {DOCKER_HOST: f"unix://{socket}"}
        if compiles:
            engine_env[HOST_DIR_COMPILES] = compiles
            engine_env[HOST_DIR] = compiles
        if output:
            engine_env[HOST_DIR_OUTPUT] = output
        return self.with_compiles(environ, engine_env)

    def start(self, supervisor: Supervisor) -> None:
        super().start(supervisor)
        self.start_installer()  # the host's engine answered already

    def prove_again(self) -> None:
        """Once the compile image is present (the proof at boot is skipped without it): run the
        check again in the background; a failure now keeps compiles off and says why. When the
        boot's proof passed (the image was there), it stands: a second proof container would
        only be one more thing a shutdown can catch half-made."""
        if self.request is None or self._stopping:
            return
        if self.result.proof.status == "passed":
            self.log.info("sibling", "the boot's proof stands: no proof again after the install")
            return

        def done(document: object) -> None:
            if self._stopping:  # ended by end_children, its proof container removed
                self.log.info("sibling", "the proof again was ended by the stop")
                return
            result = SiblingResult.from_json(document)
            self.result = dataclasses.replace(self.result, proof=result.proof)
            if result.ok and result.proof.status != "failed":
                self.log.info("sibling", f"proof: {result.proof.message or result.proof.status}")
                self.on_change()
            else:  # logged first, as dind's refusal: the status's change comes with its line
                reason = "; ".join(result.problems)
                self.log.error("sibling", f"compiles cannot run: {reason}")
                self.state.set(Phase.FAILED, reason)

        request = dataclasses.replace(
            self.request, result=self.run_dir / "sibling-proof.json", grant_group=False
        )
        try:
            self._start_check(request, done)
        except SpawnError as e:
            self.log.error("sibling", f"cannot prove the host path: {e}")

    def _run_check(self, request: SiblingRequest) -> SiblingResult:
        """Run the check child to its end under the loop (signals and reaping go on)."""
        results: list[SiblingResult] = []
        try:
            self._start_check(request, lambda doc: results.append(SiblingResult.from_json(doc)))
        except SpawnError as e:
            raise ConfigError([f"sibling check: {e}"]) from e
        self.loop.run_until(lambda: bool(results))
        return results[0]

    def _start_check(self, request: SiblingRequest, on_done: Callable[[object], None]) -> None:
        """`init.engine.sibling_check` with `request`; SpawnError if it cannot start."""
        self._check = children.start(
            self.loop, self.log, "sibling", SIBLING_CHECK, request.argv(), request.result, on_done
        )

    def end_children(self, deadline: float) -> None:
        """A check still running (the proof again, after the install) is ended: its proof
        container on the host engine, which outlives this container, is removed first (the
        check's `finally`), inside the grace period."""
        self._stopping = True
        check = self._check
        if check is None or check.ended:
            return
        self.log.info("sibling", "ending the check: the init is stopping")
        if children.end(self.loop, self.log, check, deadline):
            self.log.info("sibling", "the check has ended")

    @property
    def ready(self) -> bool:
        return self.state.is_(Phase.READY)

    def status(self) -> EngineStatus:
        result = self.result
        return EngineStatus(
            mode=self.mode,
            state=self.state.phase.value,
            ready=self.ready,
            reason=self.state.reason,
            fix=self.state.fix,
            since=round(self.state.since, 3),
            socket=result.socket,
            host_dir_compiles=result.host_dir_compiles,
            host_dir_output=result.host_dir_output,
            derived=result.derived,
            api_version=result.api_version,
            proof=Proof(result.proof.status, result.proof.message),
            runtimes=runtime.describe(self.settings),
        )
