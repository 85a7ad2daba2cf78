"""The proxy as one of PID 1's own services: its ServiceSpec, worked out from the engine side's
variables once the mode's checks have run (init.engine.side.SandboxSide holds it)."""

from __future__ import annotations

import pwd
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from init.compiles.settings import limits_from_env
from init.config import (
    DEFAULT_SERVICE_USER,
    DOCKER_HOST,
    HOST_DIR_COMPILES,
    HOST_DIR_OUTPUT,
    SERVICE_USER,
    Mode,
    Settings,
)
from init.core.services import ServiceSpec
from init.core.status_file import REFUSALS_NAME
from init.engine.side import EngineProxy
from init.proxy.binds import Root
from init.proxy.settings import DEFAULT_SOCKET, MODULE, NAME, ProxyConfig


class ProxyService(EngineProxy):
    """`python -m init.proxy` in front of the engine the side found, its socket in the
    services' user's group; the services' DOCKER_HOST is this socket."""

    def __init__(
        self, settings: Settings, listen: Path = DEFAULT_SOCKET, python: str = sys.executable
    ) -> None:
        self.settings = settings
        self.listen = listen
        self.python = python
        self.docker_host = f"unix://{listen}"

    def spec(self, environ: Mapping[str, str]) -> ServiceSpec:
        engine = environ.get(DOCKER_HOST, "").removeprefix("unix://")
        roots = []
        for here, host_variable in (
            (self.settings.compiles_dir, HOST_DIR_COMPILES),
            (self.settings.output_dir, HOST_DIR_OUTPUT),
        ):
            # Sibling mode: binds name the host's paths; docker-in-docker: this filesystem's,
            # whatever an operator gave (config warns that it is replaced).
            sibling = self.settings.mode is Mode.SIBLING
            host = (environ.get(host_variable) if sibling else None) or str(here)
            roots.append(Root(PurePosixPath(here), PurePosixPath(host)))
        user = environ.get(SERVICE_USER) or DEFAULT_SERVICE_USER
        try:
            group: int | None = pwd.getpwnam(user).pw_gid
        except KeyError:
            group = None  # root's alone: a service user that does not exist cannot use it
        config = ProxyConfig(
            listen=self.listen,
            engine=Path(engine),
            images=self.settings.all_texlive_images,
            roots=tuple(roots),
            limits=limits_from_env(environ),
            group=group,
            refusals=self.listen.with_name(REFUSALS_NAME),
        )
        argv = (self.python, "-m", MODULE, *config.argv())
        return ServiceSpec(name=NAME, directory=Path("/"), argv=argv)
