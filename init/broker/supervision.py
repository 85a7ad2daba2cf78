"""The compile broker as one of PID 1's own services: its ServiceSpec, worked out from the
engine side's variables once the mode's checks have run (init.engine.side.SandboxSide starts
it right after the engine, before the site's services, so it stops after them). Standard
library and the init's own light modules only: PID 1 imports this, never the broker's engine
client."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from init.config import COMPILE_BROKER_SOCKET
from init.core.services import ServiceSpec
from init.engine.side import CompileBroker

NAME = "compile-broker"
MODULE = "init.broker.service"


class BrokerService(CompileBroker):
    """`python -m init.broker.service` on `socket`, with the init's own compile settings and
    the engine's own DOCKER_HOST (not the services' proxy)."""

    def __init__(self, socket: Path, python: str = sys.executable) -> None:
        self.socket = socket
        self.python = python

    def spec(self, environ: Mapping[str, str]) -> ServiceSpec:
        """`environ`: the services' environment with the init's own variables and the
        engine side's (its DOCKER_HOST, the host dirs) on top; the broker reads its settings
        from it once."""
        env = {**environ, COMPILE_BROKER_SOCKET: str(self.socket)}
        return ServiceSpec(
            name=NAME,
            directory=Path("/"),
            argv=(self.python, "-m", MODULE),
            env=tuple(sorted(env.items())),
        )
