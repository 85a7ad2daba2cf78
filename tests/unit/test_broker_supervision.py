"""The compile broker as PID 1's service: it starts with the engine, beside the proxy, talks to
the raw engine (never the services' proxy) with the init's own settings, and the shims PID 1
writes are its clients on its socket."""

from __future__ import annotations

from pathlib import Path

from init import config
from init.broker.supervision import BrokerService
from init.core.log import Log
from init.core.services import ServiceSpec
from init.engine.side import CompileWiring, EngineProxy, Installer, SandboxSide


class FakeProxy(EngineProxy):
    docker_host = "unix:///run/proxy.sock"

    def spec(self, environ: object) -> ServiceSpec:
        return ServiceSpec(name="engine-proxy", directory=Path("/"), argv=("proxy",))


class FakeSupervisor:
    def __init__(self) -> None:
        self.started: list[ServiceSpec] = []

    def start(self, specs: list[ServiceSpec], hooks: object = None) -> None:
        self.started += specs


def test_the_broker_starts_with_the_engine_on_the_raw_engine_with_the_inits_settings() -> None:
    side = SandboxSide(Log(), Installer(), CompileWiring())
    side.use_proxy(FakeProxy())
    side.use_broker(BrokerService(Path("/run/sharelatex-init/broker.sock"), python="/py"))
    side.keep_own({config.COMPILE_TIMEOUT: "30", "PATH": "/bin"})
    gained = side.with_compiles({"PATH": "/bin"}, {config.DOCKER_HOST: "unix:///raw.sock"})
    assert gained[config.DOCKER_HOST] == "unix:///run/proxy.sock"  # the services' own
    supervisor = FakeSupervisor()
    side.start(supervisor)  # type: ignore[arg-type]
    assert [s.name for s in supervisor.started] == ["engine-proxy", "compile-broker"]
    broker = supervisor.started[1]
    env = dict(broker.env)
    assert broker.argv == ("/py", "-m", "init.broker.service")
    assert env[config.DOCKER_HOST] == "unix:///raw.sock"
    assert env[config.COMPILE_TIMEOUT] == "30"
    assert env[config.COMPILE_BROKER_SOCKET] == "/run/sharelatex-init/broker.sock"
