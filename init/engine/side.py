"""What the two sandboxed modes share as PID 1's Docker side (init.core.docker_side).

`SandboxSide` holds what docker-in-docker (init.engine.dind.InnerDocker) and sibling containers
(init.engine.host.HostDocker) have in common: the TeX Live installer started once the engine
answers, and the services' compile environment on top of the engine's own variables. The
installer and the compile wiring come from other concerns, handed in by init.boot through the
small interfaces here (`Installer`, `CompileWiring`). `EngineStatus` is the engine's part of the
status document. Standard library only: PID 1 imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from init.config import DOCKER_HOST, OWN_PREFIX
from init.core.docker_side import DockerSide
from init.core.log import Log
from init.core.services import ServiceSpec
from init.core.supervisor import ServiceHooks, Supervisor

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True)
class Proof:
    """Sibling mode: whether a container of the host engine wrote through the host path."""

    status: str  # passed, failed, skipped
    message: str = ""


@dataclass(frozen=True)
class EngineStatus:
    """The engine's entry in the status document (both modes; unused fields stay empty)."""

    mode: str  # dind or sibling
    state: str
    ready: bool
    reason: str = ""
    fix: str = ""
    since: float = 0.0
    socket: str = ""
    driver: str = ""  # dind: the inner dockerd's storage driver
    ready_seconds: float | None = None
    host_dir_compiles: str = ""  # sibling: what the compile containers bind
    host_dir_output: str = ""
    derived: bool = False  # sibling: the host dirs were worked out, not given
    api_version: str = ""
    proof: Proof | None = None
    runtimes: str = ""  # what the compile images run under (init.engine.runtime.describe)

    def to_json(self) -> dict[str, Any]:
        document = dict(self.__dict__)
        document["proof"] = None if self.proof is None else dict(self.proof.__dict__)
        return document

    @classmethod
    def from_json(cls, document: object) -> EngineStatus | None:
        if not isinstance(document, dict) or "mode" not in document:
            return None
        proof = document.get("proof")
        return cls(
            mode=str(document["mode"]),
            state=str(document.get("state") or "?"),
            ready=document.get("ready") is True,
            reason=str(document.get("reason") or ""),
            fix=str(document.get("fix") or ""),
            since=float(document.get("since") or 0.0),
            socket=str(document.get("socket") or ""),
            driver=str(document.get("driver") or ""),
            ready_seconds=_number(document.get("ready_seconds")),
            host_dir_compiles=str(document.get("host_dir_compiles") or ""),
            host_dir_output=str(document.get("host_dir_output") or ""),
            derived=document.get("derived") is True,
            api_version=str(document.get("api_version") or ""),
            runtimes=str(document.get("runtimes") or ""),
            proof=Proof(str(proof.get("status", "")), str(proof.get("message", "")))
            if isinstance(proof, dict)
            else None,
        )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


OnChange = Callable[[], None]


class Installer(ServiceHooks):
    """What the sandboxed sides need of the TeX Live installer (init.texlive.job.TexLiveJob):
    told the engine's socket, started as a service once the engine answers, shown in the
    status, and calling `on_done` once every image is present."""

    launched: bool
    on_done: Callable[[], None]

    def use_socket(self, socket: str) -> None:
        raise NotImplementedError

    def spec(self) -> ServiceSpec:
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    def mark_stopped(self) -> None:
        raise NotImplementedError


class CompileWiring:
    """What the services' environment gains for compiling, given the engine side's own part
    (DOCKER_HOST, the host dirs): init.compiles.service_env's, wired in by init.boot."""

    # The variables a compile run by hand (`docker exec ... sharelatex-init compile`) needs too.
    shared: tuple[str, ...] = ()

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {}

    def describe(self) -> str:
        """How the services compile, for the log: `the sandboxing latexmk in DIR`."""
        return "nothing"

    def publish(self, compile_environment: Mapping[str, str]) -> None:
        """Hand the compile path (the shim, run by the services) the init's compile settings,
        which the services' own environment no longer carries."""


class EngineProxy:
    """The engine policy proxy (init.proxy.service, wired in by init.boot): given the engine
    side's variables, the service that fronts the engine; the services' DOCKER_HOST is its
    socket, never the engine's."""

    docker_host: str = ""

    def spec(self, environ: Mapping[str, str]) -> ServiceSpec:
        raise NotImplementedError


class CompileBroker:
    """The compile broker (init.broker.supervision, wired in by init.boot): given the engine
    side's variables, the service that owns the compile path; it talks to the engine itself,
    never through the services' proxy."""

    def spec(self, environ: Mapping[str, str]) -> ServiceSpec:
        raise NotImplementedError


class SandboxSide(DockerSide):
    """What docker-in-docker and sibling mode share: the installer and the services' compile
    environment on top of the engine's own variables."""

    def __init__(self, log: Log, installer: Installer, wiring: CompileWiring) -> None:
        self.log = log
        # The init's own variables (OWN_PREFIX): the services' environment, which `prepare` is
        # given, never carries them (config.is_consumed); init.boot hands them over here.
        self.own: dict[str, str] = {}
        self.installer = installer
        self.wiring = wiring
        self._compile_environment: dict[str, str] = {}
        self._supervisor: Supervisor | None = None
        self.proxy: EngineProxy | None = None
        self._proxy_spec: ServiceSpec | None = None
        self.broker: CompileBroker | None = None
        self._broker_spec: ServiceSpec | None = None

    def use_proxy(self, proxy: EngineProxy) -> None:
        """The services reach the engine through `proxy` only (started with the engine)."""
        self.proxy = proxy

    def use_broker(self, broker: CompileBroker) -> None:
        """The services' compiles go through `broker` (started with the engine)."""
        self.broker = broker

    def with_compiles(
        self, environ: Mapping[str, str], engine_env: Mapping[str, str]
    ) -> dict[str, str]:
        """`engine_env` plus what the services need to compile through it."""
        if self.broker is not None:  # the engine itself, not the proxy: the broker is the init's
            self._broker_spec = self.broker.spec({**environ, **self.own, **engine_env})
        if self.proxy is not None:
            self._proxy_spec = self.proxy.spec({**environ, **self.own, **engine_env})
            engine_env = {**engine_env, DOCKER_HOST: self.proxy.docker_host}
        merged = {**environ, **self.own, **engine_env}
        gained = {**engine_env, **self.wiring.environment(merged)}
        merged.update(gained)  # what the services get is `gained` alone: never self.own
        # The init's own variables never reach the services (config.is_consumed): what the
        # compile path needs of them is handed over here, with the engine and the images.
        self._compile_environment = {
            k: v for k, v in merged.items() if k in self.wiring.shared or k.startswith(OWN_PREFIX)
        }
        self.wiring.publish(self._compile_environment)
        self.log.info("init", f"the services compile through {self.wiring.describe()}")
        return gained

    def keep_own(self, environ: Mapping[str, str]) -> None:
        """The init's own variables of the whole environment (read before they are consumed)."""
        self.own = {k: v for k, v in environ.items() if k.startswith(OWN_PREFIX)}

    def start(self, supervisor: Supervisor) -> None:
        """The proxy and the broker, right after the engine (so they stop after the services,
        before it)."""
        self._supervisor = supervisor
        specs = [s for s in (self._proxy_spec, self._broker_spec) if s is not None]
        if specs:
            supervisor.start(specs)

    def start_installer(self) -> None:
        """The installer, once the engine answers (at most once; never while stopping)."""
        supervisor = self._supervisor
        if self.installer.launched or supervisor is None or supervisor.stopping:
            return
        spec = self.installer.spec()
        supervisor.start([spec], {spec.name: self.installer})

    def texlive_status(self) -> dict[str, Any] | None:
        return self.installer.status()

    def engine_status(self) -> dict[str, Any] | None:
        return self.status().to_json()

    def status(self) -> EngineStatus:
        raise NotImplementedError

    def compile_environment(self) -> dict[str, str]:
        return dict(self._compile_environment)

    def mark_stopped(self) -> None:
        self.installer.mark_stopped()
