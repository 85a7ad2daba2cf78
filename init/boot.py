"""What `sharelatex-init run` assembles before PID 1's life begins: the Docker side for the mode.

PID 1's lifecycle (init.core.pid1) knows one interface, `DockerSide`; this module picks the one
the configuration asks for and hands it its parts: the engine side (init.engine.dind or
init.engine.host), the TeX Live installer's job (init.texlive.job), how the services reach the
sandbox (init.compiles.service_env), and the engine proxy the services reach the engine through
(init.proxy.service). It is the only module that sees them all, so that none of them imports
another concern's modules. Each mode's modules load only when that mode runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from init.config import Mode, Settings
from init.core.docker_side import DockerSide
from init.core.log import Log
from init.core.loop import EventLoop
from init.core.services import ServiceSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from init.engine.side import SandboxSide

    OnChange = Callable[[], None]


def docker_side(
    settings: Settings | None,
    environ: Mapping[str, str],
    status_file: Path,
    loop: EventLoop,
    log: Log,
    on_change: OnChange,
) -> DockerSide:
    """The Docker side for `settings.mode`, its parts wired together."""
    if settings is None or settings.mode is Mode.OFF:
        return DockerSide()
    from init.broker.supervision import BrokerService
    from init.compiles.service_env import ServicesCompile
    from init.config import BROKER_SOCKET_NAME, COMPILE_BROKER_SOCKET
    from init.proxy.service import ProxyService
    from init.texlive.job import TexLiveJob

    run_dir = status_file.parent
    broker = Path(environ.get(COMPILE_BROKER_SOCKET) or run_dir / BROKER_SOCKET_NAME)
    installer = TexLiveJob(log, settings, status_file, on_change=on_change)
    wiring = ServicesCompile(settings, run_dir / "shim", sys.executable, broker=broker)
    side: SandboxSide
    if settings.mode is Mode.DIND:
        from init.engine.dind import InnerDocker
        from init.engine.dockerd import layout_from_env

        layout = layout_from_env(environ)  # ConfigError (78) for a bad path or flag

        # The inner engine's socket stays root's (group root): the services get the proxy's.
        side = InnerDocker(
            loop, log, settings, layout, run_dir, installer, wiring,
            service_user="root", on_change=on_change,
        )  # fmt: skip
    else:
        from init.engine.host import HostDocker

        side = HostDocker(loop, log, settings, run_dir, installer, wiring, on_change=on_change)
    side.use_proxy(ProxyService(settings, run_dir / "docker.sock"))
    side.use_broker(BrokerService(broker))
    side.keep_own(environ)
    return side


def http_status_service(
    address: tuple[str, int] | None, status_file: Path
) -> tuple[ServiceSpec, ...]:
    """The optional /healthz /readyz /status endpoint: a child, so PID 1 serves nothing."""
    if address is None:
        return ()
    from init.httpd.status import MODULE, StatusServerRequest

    host, port = address
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = StatusServerRequest(listen, status_file)
    argv = (sys.executable, "-m", MODULE, *request.argv())
    return (ServiceSpec(name="http-status", directory=Path("/"), argv=argv),)
