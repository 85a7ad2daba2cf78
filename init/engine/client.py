"""The one place the init talks to a Docker engine through the Docker SDK; engine errors mapped.

Every engine call of the init's helper processes (the readiness check, the sibling check and its
proof, the TeX Live installer, `doctor`) goes through `Engine` here: ping, version, info,
inspect, the compile containers and their sweep, a one-shot container, pull, load, build. The
SDK's and requests' exceptions are turned into the project's error tree once, by meaning
(`EngineUnreachable`, `NotFound`, `ImageMissing`, `Conflict`, `EngineRefused`), so callers catch
what they mean and never a library's type.

The SDK (and requests, urllib3) cost about 150 ms and 15 MiB a process: this module imports it
only when an `Engine` is made, so PID 1 may use the rest (the labels, the errors, and
`connect_error`, the one raw probe of a socket). The compile path, where a process starts per
compile, uses `init.engine.api` instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from init.errors import EngineError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: PID 1 imports this
if TYPE_CHECKING:
    from typing import Any

    import docker

# What every compile container carries (the runner's, the sibling proof's): what carries it is
# ours to remove when an engine (re)starts. EXPIRES_LABEL: when its owner meant it to be gone.
COMPILE_LABEL = "sharelatex-init.compile"
PROJECT_LABEL = "sharelatex-init.project"
COMPILE_ID_LABEL = "sharelatex-init.compile-id"
EXPIRES_LABEL = "sharelatex-init.expires"


class EngineUnreachable(EngineError):
    """Nothing answers on the socket, or the engine stopped answering mid-call."""


class EngineRefused(EngineError):
    """The engine answered with an error (4xx/5xx) that has no narrower meaning here."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NotFound(EngineRefused):
    """No such container (or other object)."""


class ImageMissing(NotFound):
    """No such image in the engine."""


class Conflict(EngineRefused):
    """The object is in the way: a name taken, a container being removed."""


@contextlib.contextmanager
def mapped(what: str) -> Iterator[None]:
    """Turn the SDK's and the transport's exceptions raised inside into the error tree."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound as e:
        raise ImageMissing(f"{what}: {_explanation(e)}", 404) from e
    except docker.errors.NotFound as e:
        raise NotFound(f"{what}: {_explanation(e)}", 404) from e
    except docker.errors.APIError as e:
        status = e.status_code or 0
        kind = Conflict if status == 409 else EngineRefused
        raise kind(f"{what}: {_explanation(e)}", status) from e
    except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as e:
        raise EngineUnreachable(f"{what}: {e}") from e


def connect_error(path: Path, timeout: float = 2.0) -> int | None:
    """The errno of a plain connect(2) to the unix socket `path`, or None when something accepts
    (ECONNREFUSED: a socket file nobody listens on, left by an engine that died)."""
    import socket  # here: the module alone costs PID 1 0.75 MiB

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except OSError as e:
            return e.errno or 0
    return None


def _explanation(e: Any) -> str:
    return str(getattr(e, "explanation", None) or e)


@dataclass(frozen=True)
class EngineInfo:
    """What `docker info` and `docker version` say that the init uses."""

    server_version: str
    api_version: str
    driver: str
    runtimes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunResult:
    """How a one-shot container ended: its exit status and what it printed."""

    exit_status: int
    output: str


class Engine:
    """A Docker engine at `url` (`unix:///path`), through the SDK's low-level API client."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import docker

        self.url = url
        with mapped(f"connecting to the engine at {url}"):
            self._api: docker.APIClient = docker.APIClient(
                base_url=url, version="auto", timeout=timeout
            )

    @classmethod
    def connect(cls, url: str, deadline: float, first_wait: float = 0.02) -> Engine:
        """The engine once `/_ping` answers; EngineUnreachable with the last error when it has
        not by `deadline` seconds. Asks often at first (dockerd answers in ~0.4 s here), then
        backs off: ENGINE_READY's policy."""
        import tenacity

        policy = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=first_wait, min=first_wait, max=0.5),
            stop=tenacity.stop_after_delay(deadline),
            retry=tenacity.retry_if_exception_type(EngineError),
            reraise=True,
        )
        for attempt in policy:
            with attempt:
                engine = cls(url, timeout=10)
                engine.ping()
                return engine
        raise AssertionError("unreachable: Retrying either returns or raises")

    @property
    def api_version(self) -> str:
        return str(self._api.api_version)

    # -- the engine itself ---------------------------------------------------------------

    def ping(self) -> None:
        with mapped(f"ping of {self.url}"):
            self._api.ping()

    def info(self) -> EngineInfo:
        with mapped(f"info of {self.url}"):
            info = self._api.info()
            version = self._api.version()
        return EngineInfo(
            server_version=str(version.get("Version") or info.get("ServerVersion") or ""),
            api_version=str(version.get("ApiVersion") or ""),
            driver=str(info.get("Driver") or ""),
            runtimes=tuple(sorted((info.get("Runtimes") or {}).keys())),
        )

    # -- containers ------------------------------------------------------------------------

    def inspect_container(self, container: str) -> dict[str, Any]:
        with mapped(f"inspect of container {container[:12]}"):
            data: dict[str, Any] = self._api.inspect_container(container)
        return data

    def compile_containers(self) -> list[dict[str, Any]]:
        """Every container carrying the compile label (any state)."""
        with mapped("list of compile containers"):
            found: list[dict[str, Any]] = self._api.containers(
                all=True, filters={"label": COMPILE_LABEL}
            )
        return found

    def remove(self, container: str) -> bool:
        """Kill and remove; False when it was gone already (or being removed)."""
        try:
            with mapped(f"removal of {container[:12]}"):
                self._api.remove_container(container, force=True, v=True)
        except (NotFound, Conflict):
            return False
        return True

    def sweep(self) -> list[str]:
        """Remove every compile container; their short ids. Only for an engine that has just
        (re)started: a compile that is running now would be killed (see `doctor`, which never
        sweeps)."""
        return [c["Id"][:12] for c in self.compile_containers() if self.remove(c["Id"])]

    def run_once(
        self,
        image: str,
        command: Sequence[str],
        binds: Iterable[tuple[str, str]],
        user: str,
        labels: Mapping[str, str],
        deadline: float,
        host_config: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Create, start and wait for a container that runs `command` with each (source, target)
        bound (type=bind: a missing source is an error, never an empty dir made on the host),
        no network; always removed. ImageMissing, EngineRefused, EngineUnreachable."""
        from docker.types import Mount

        container_id = ""
        try:
            with mapped(f"one-shot container of {image}"):
                config = self._api.create_host_config(
                    mounts=[Mount(target=t, source=s, type="bind") for s, t in binds],
                    network_mode="none",
                    **dict(host_config or {}),
                )
                created = self._api.create_container(
                    image,
                    entrypoint=list(command[:1]),
                    command=list(command[1:]),
                    user=user,
                    labels=dict(labels),
                    host_config=config,
                    network_disabled=True,
                )
                container_id = created["Id"]
                self._api.start(container_id)
                status = int(self._api.wait(container_id, timeout=deadline)["StatusCode"])
                output = self._api.logs(container_id).decode(errors="replace").strip()
            return RunResult(status, output)
        finally:
            if container_id:
                self.remove(container_id)

    # -- images ------------------------------------------------------------------------------

    def image_present(self, image: str) -> bool:
        try:
            with mapped(f"inspect of image {image}"):
                self._api.inspect_image(image)
        except NotFound:
            return False
        return True

    def networks(self) -> list[str]:
        with mapped("list of networks"):
            return [str(n.get("Name")) for n in self._api.networks()]

    def pull(self, image: str) -> Iterator[dict[str, Any]]:
        """The engine's decoded pull events (progress, errors as {"error": ...})."""
        import docker.utils

        repository, tag = docker.utils.parse_repository_tag(image)
        with mapped(f"pull of {image}"):
            yield from self._api.pull(repository, tag=tag or "latest", stream=True, decode=True)

    def load(self, chunks: Iterable[bytes]) -> Iterator[Any]:
        """Load a `docker save` tarball streamed as `chunks`; the engine's events."""
        with mapped("load of an image tarball"):
            yield from self._api.load_image(chunks)

    def build(self, context: bytes, timeout: float, **options: Any) -> Iterator[dict[str, Any]]:
        """Build from a tar `context` (custom context); the engine's decoded build events."""
        import io

        with mapped("image build"):
            yield from self._api.build(
                fileobj=io.BytesIO(context),
                custom_context=True,
                decode=True,
                timeout=timeout,
                **options,
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._api.close()


def wait_ready(url: str, deadline: float) -> tuple[Engine, float]:
    """`Engine.connect`, and how many seconds it took."""
    started = time.monotonic()
    engine = Engine.connect(url, deadline)
    return engine, time.monotonic() - started
