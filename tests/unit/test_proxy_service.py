"""The proxy as PID 1's service: its spec from the engine side's variables, and the sides
hand the services the proxy's socket, never the engine's."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from init import config
from init.core.log import Log
from init.core.services import ServiceSpec
from init.engine.side import CompileWiring, EngineProxy, Installer, SandboxSide
from init.proxy.binds import Root
from init.proxy.service import ProxyService
from init.proxy.settings import parse_argv


def settings(**env: str) -> config.Settings:
    return config.load({"SANDBOXED_COMPILES": "true", "TEX_LIVE_DOCKER_IMAGE": "texlive:1", **env})


def test_the_spec_fronts_the_engine_side_socket_with_the_roots_of_the_mode() -> None:
    sibling = settings(SANDBOXED_COMPILES_SIBLING_CONTAINERS="true")
    service = ProxyService(sibling, Path("/run/x/docker.sock"), python="/py")
    environ = {
        config.DOCKER_HOST: "unix:///var/run/docker.sock",
        config.HOST_DIR_COMPILES: "/srv/site/data/compiles",
        "OVERLEAF_INIT_COMPILE_PIDS": "99",
        config.SERVICE_USER: "nobody-such-user",
    }
    spec = service.spec(environ)
    assert spec.name == "engine-proxy" and spec.argv[:3] == ("/py", "-m", "init.proxy")
    proxy = parse_argv(spec.argv[3:])
    assert proxy.engine == Path("/var/run/docker.sock")
    assert proxy.listen == Path("/run/x/docker.sock")
    assert proxy.images == ("texlive:1",)
    assert proxy.roots[0] == Root(
        PurePosixPath(config.DEFAULT_COMPILES_DIR), PurePosixPath("/srv/site/data/compiles")
    )
    assert proxy.roots[1].host == proxy.roots[1].here  # no host dir given: the same path
    assert proxy.limits.pids == 99
    assert proxy.group is None  # no such user: the socket stays root's
    assert service.docker_host == "unix:///run/x/docker.sock"
    # Docker-in-docker: the inner engine sees this container's paths, whatever was given.
    dind = parse_argv(ProxyService(settings(), Path("/run/x/docker.sock")).spec(environ).argv[3:])
    assert [r.here == r.host for r in dind.roots] == [True, True]


class FakeProxy(EngineProxy):
    docker_host = "unix:///run/proxy.sock"

    def __init__(self) -> None:
        self.given: dict[str, str] = {}

    def spec(self, environ: dict[str, str]) -> ServiceSpec:  # type: ignore[override]
        self.given = dict(environ)
        return ServiceSpec("engine-proxy", Path("/"), ("proxy",))


class FakeSupervisor:
    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, specs: list[ServiceSpec], hooks: object = None) -> None:
        self.started += [s.name for s in specs]


def test_the_services_get_the_proxys_socket_and_the_proxy_starts_with_the_engine() -> None:
    side = SandboxSide(Log(), Installer(), CompileWiring())
    proxy = FakeProxy()
    side.use_proxy(proxy)
    gained = side.with_compiles({"PATH": "/bin"}, {config.DOCKER_HOST: "unix:///raw.sock"})
    assert gained[config.DOCKER_HOST] == "unix:///run/proxy.sock"
    assert proxy.given[config.DOCKER_HOST] == "unix:///raw.sock"  # the proxy fronts the raw one
    supervisor = FakeSupervisor()
    side.start(supervisor)  # type: ignore[arg-type]
    assert supervisor.started == ["engine-proxy"]
