"""The Docker side as PID 1 holds it: one interface, whatever the mode (off, dind, sibling).

PID 1 asks its docker side the same few things in every mode: prepare before anything runs (the
checks; what the services' environment gains), the inner engine's service (docker-in-docker
only), start what must run once the supervisor exists (the TeX Live installer), its parts of the
status document, and, when the init stops, to end its helper children and mark itself stopped.
This base class is the plain init's (compiles not sandboxed): nothing to do. The sandboxed modes
implement it in init.engine (dind.InnerDocker, host.HostDocker); init.boot picks one. Defined
here so that the core imports no engine module.
"""

from __future__ import annotations

from collections.abc import Mapping

from init.core.services import ServiceSpec
from init.core.supervisor import ServiceHooks, Supervisor

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any


class DockerSide:
    """What PID 1 asks of the Docker side. As it is: compiles not sandboxed, no engine."""

    mode = "off"

    def prepare(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Checks before anything runs; what the services' environment gains. ConfigError (exit
        78) for a setting that cannot work."""
        return {}

    def engine_service(self) -> tuple[ServiceSpec, ServiceHooks] | None:
        """The inner dockerd, to start as the first service (it then stops last), or None."""
        return None

    def start(self, supervisor: Supervisor) -> None:
        """Once the supervisor exists: what runs beside the engine (the TeX Live installer)."""

    def engine_status(self) -> dict[str, Any] | None:
        """The engine's part of the status document (init.engine.side.EngineStatus's JSON)."""
        return None

    def texlive_status(self) -> dict[str, Any] | None:
        """The installer's part (init.texlive.contract.TexLiveStatus's JSON)."""
        return None

    def compile_environment(self) -> dict[str, str]:
        """What the services were given to compile with (kept in the status, so that `docker
        exec ... sharelatex-init compile` by an operator compiles the same way)."""
        return {}

    def end_children(self, deadline: float) -> None:
        """The init is stopping: end its helper children still running (sibling: a check that
        is proving the host path), their clean-up given until `deadline`; start no more."""

    def mark_stopped(self) -> None:
        """The init is stopping: no more restarts or checks."""
