"""The one place the init talks to a Docker engine through the Docker SDK; engine errors mapped.

Every engine call of the init's helper processes (the readiness check, the sibling check and its
proof, the TeX Live installer, `doctor`) goes through `Engine` here: ping, version, info,
inspect, the compile containers and their sweep, a one-shot container, pull, load, build. The
SDK's and requests' exceptions are turned into the project's error tree once, by meaning
(`EngineUnreachable`, `NotFound`, `ImageMissing`, `Conflict`, `EngineRefused`), so callers catch
what they mean and never a library's type.

The SDK (and requests, urllib3) cost about 150 ms and 15 MiB a process: this module imports it
only when an `Engine` is made, so PID 1 may use the rest (the labels, the errors, and
`connect_error`, the one raw probe of a socket).

The compile path keeps a lighter client, `DockerBackend`, at the end of this module. It was
written when a process started per compile, and importing the SDK there cost ~150 ms (http.client
alone 25 ms) against a 0.3 s one-page compile; the compile broker, long-lived now, keeps it: the
SDK would add its ~15 MiB to the broker's 17 for no call this client lacks. It speaks the Engine
API over a plain socket (HTTP/1.1, one connection a request) at a fixed API version (1.41:
Docker 20.10, the oldest engine the sibling check accepts: no version round trip); images are
never inspected: a create that fails with "No such image" says it. Its calls (create, attach,
start, oom_killed, ended, remove, sweep_expired; exec, for the benches' reference column) are what
another backend (a Kubernetes pod per project) would offer beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from init.core import signals
from init.errors import ConfigError, EngineError

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
ENDED_WITHIN = 5.0  # s for the engine to take in the end of a container that has ended


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """The stop and forwarded signals held for a block that must not be cut short (a caller
    that turns a signal into an exception would leave it half done); one that came meanwhile
    is delivered at its end."""
    mask = signals.hold()
    try:
        yield
    finally:
        signals.restore(mask)


class EngineUnreachable(EngineError):
    """Nothing answers on the socket, or the engine stopped answering mid-call."""


class EngineRefused(EngineError):
    """The engine answered with an error (4xx/5xx) that has no narrower meaning here."""

    def __init__(self, message: str, status: int = 0, fix: str = "") -> None:
        super().__init__(message, fix)
        self.status = status


class NotFound(EngineRefused):
    """No such container (or other object)."""


class ImageMissing(NotFound):
    """No such image in the engine."""


class Conflict(EngineRefused):
    """The object is in the way: a name taken, a container being removed."""


class ContainerGone(EngineRefused):
    """The container has ended or does not exist (an exec into it is refused)."""


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
class ContainerEnd:
    """How a compile container ended under its compile, as its engine saw it."""

    oom_event: bool  # the engine's "oom" event since the compile began
    killed: bool  # a kill the engine sent it (`docker kill`, a stop, a forced removal)
    status: int | None  # its exit status; None when the engine did not say in time

    @property
    def oom_killed(self) -> bool:
        """The OOM killer ended it: the engine's event, or, when that event was lost, a SIGKILL
        the engine did not send. containerd drops the OOM event when the container's cgroup is
        gone before its shim reads the notice (pkg/oom/v1/v1.go, `process`), as when gVisor's
        whole sandbox is killed. Under runc nothing inside a container can SIGKILL its PID 1
        (the agent: Linux drops it from inside the namespace), so only the kernel, or root on
        the host, ends it that way. gVisor delivers it: a compile that SIGKILLs its own agent
        there reads as the memory limit, a label on its own compile alone."""
        return self.oom_event or (self.status == 128 + signal.SIGKILL and not self.killed)


@dataclass(frozen=True)
class EngineInfo:
    """What `docker info` and `docker version` say that the init uses."""

    server_version: str
    api_version: str
    driver: str
    runtimes: tuple[str, ...] = ()
    # Each runtime's runtimeArgs as the engine reports them (its daemon.json's).
    runtime_args: tuple[tuple[str, tuple[str, ...]], ...] = ()


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
            runtime_args=tuple(
                (str(name), tuple(str(a) for a in (spec or {}).get("runtimeArgs") or ()))
                for name, spec in sorted((info.get("Runtimes") or {}).items())
            ),
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
                # A stop signal the caller turns into an exception waits until the id is known:
                # one raised while the engine's answer is read would leave the container created
                # and nobody knowing its id to remove it (seen: PID 1's shutdown of the sibling
                # check left its proof container behind, "Created").
                with _uninterrupted():
                    container_id = self._api.create_container(
                        image,
                        entrypoint=list(command[:1]),
                        command=list(command[1:]),
                        user=user,
                        labels=dict(labels),
                        host_config=config,
                        network_disabled=True,
                    )["Id"]
                self._api.start(container_id)
                status = int(self._api.wait(container_id, timeout=deadline)["StatusCode"])
                output = self._api.logs(container_id).decode(errors="replace").strip()
            return RunResult(status, output)
        finally:
            if container_id:
                # Held the same way: a stop that came as the container ended would otherwise
                # cut its removal short (seen: an exited proof container left behind).
                with _uninterrupted():
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


# -- the compile path's light client ------------------------------------------------------------

API_VERSION = "1.41"
CREATE_PATIENCE = 5.0  # seconds a name may stay taken by a container being removed
CALL_TIMEOUT = 30.0  # seconds an engine may stay silent on one call
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def urlencode(query: Mapping[str, str]) -> str:
    """`a=1&b=%7B...` (urllib.parse costs 4 ms of import a compile)."""

    def quote(text: str) -> str:
        return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())

    return "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())


Connect = Callable[[float], socket.socket]


class ApiError(EngineRefused):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}", status)
        self.message = message


def connector(url: str, environ: Mapping[str, str]) -> Connect:
    """A function timeout -> connected socket for DOCKER_HOST `url`: a unix socket, or
    tcp:// with TLS (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH: never plain TCP)."""
    scheme, _, rest = url.partition("://")
    if scheme == "unix":
        path = rest

        def unix(timeout: float) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            sock.connect(path)
            return sock

        return unix
    if scheme == "tcp":
        if environ.get("DOCKER_TLS_VERIFY", "") in ("", "0"):
            raise ConfigError(
                [
                    f"DOCKER_HOST={url} is plain TCP: anyone on the network could run containers;"
                    " set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem)"
                ]
            )
        import ssl  # only here: 5 ms of every compile otherwise

        certs = Path(environ.get("DOCKER_CERT_PATH") or Path.home() / ".docker")
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        context.load_cert_chain(str(certs / "cert.pem"), str(certs / "key.pem"))
        host, _, port_text = rest.rstrip("/").partition(":")
        port = int(port_text) if port_text.isdigit() else 2376

        def tls(timeout: float) -> socket.socket:
            sock = socket.create_connection((host, port), timeout=timeout)
            return context.wrap_socket(sock, server_hostname=host)

        return tls
    raise ConfigError(
        [
            f"DOCKER_HOST={url!r} is not unix:///PATH or tcp://HOST:PORT (with TLS); "
            "e.g. unix:///var/run/docker.sock"
        ]
    )


class Response:
    """An HTTP/1.1 response read off a socket: status, headers, then the body (by length,
    chunked, or until the engine closes it, as an exec's raw stream is)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buffer:
            if not self._fill():
                raise ConnectionError("the engine closed the connection mid-answer")
        head, _, self.buffer = self.buffer.partition(mark)
        return head

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size and self._fill():
            pass
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def body(self) -> bytes:
        if "content-length" in self.headers:
            return self.read_exact(int(self.headers["content-length"]))
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    return b"".join(parts)
                parts.append(self.read_exact(size))
                self._until(b"\r\n")
        if self.status in (204, 304):
            return b""
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def request(sock: socket.socket, method: str, target: str, body: Any = None) -> Response:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return Response(sock)


class Execution:
    """One `docker exec` started: its output as it comes, then its exit status."""

    def __init__(self, backend: DockerBackend, exec_id: str, response: Response) -> None:
        self.backend = backend
        self.exec_id = exec_id
        self._response = response

    def stream(self) -> Iterator[bytes]:
        """The payload of the engine's multiplexed stream (stdout and stderr, in order)."""
        try:
            while True:
                header = self._response.read_exact(8)
                if len(header) < 8:
                    return
                (size,) = struct.unpack(">I", header[4:])
                payload = self._response.read_exact(size)
                if payload:
                    yield payload
                if len(payload) < size:
                    return
        finally:
            self._response.sock.close()

    def abort(self) -> None:
        """End the stream's read (a stream the engine never closes: gVisor's dead sandbox)."""
        with contextlib.suppress(OSError):
            self._response.sock.shutdown(socket.SHUT_RDWR)

    def exit_code(self) -> int | None:
        """The exit status once the engine has it (it may lag the stream's end a little)."""
        for _ in range(100):
            try:
                info = self.backend.call("GET", f"/exec/{self.exec_id}/json")
            except ApiError:
                return None
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            time.sleep(0.01)
        return None


@dataclass
class Attachment:
    """A container's attached stdio: `sock` (write: its stdin; read: multiplexed frames), and
    the first bytes of the stream, read with the engine's answer."""

    sock: socket.socket
    first: bytes = b""

    def close_stdin(self) -> None:
        """EOF on the container's stdin (it was created with StdinOnce)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _refused(e: ApiError) -> EngineRefused:
    """The engine said no to a compile container (its create or start)."""
    return EngineRefused(
        f"the engine refused the compile container: {e.message}",
        e.status,
        "see `sharelatex-init doctor`",
    )


def _short_ids(text: str) -> str:
    """`text` with each 64-digit id cut to its first 12, as `docker ps` shows them."""
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1", text)


def _gone(message: str) -> bool:
    """An engine's words for a container that has ended or is going, whatever the status it
    came with (dockerd answers a container being removed with a 500 on some calls)."""
    said = message.lower()
    return any(w in said for w in ("is not running", "removal in progress", "no such container"))


class DockerBackend:
    """The Docker engine at `url` (DOCKER_HOST), as the compile runner uses it."""

    def __init__(
        self,
        url: str,
        exec_timeout: float,
        expiry_grace: float,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self._connect = connector(url, os.environ if environ is None else environ)
        self.timeout = exec_timeout  # how long an exec's stream may stay silent
        self.expiry_grace = expiry_grace  # past its expiry label, a running container is stale

    def _error(self, e: BaseException, asked: str = "") -> EngineError:
        """`asked`: the request, as `METHOD /path` (its ids cut to 12): which call it was."""
        to = f" {_short_ids(asked)}" if asked else ""
        return EngineUnreachable(
            f"the Docker engine at {self.url} did not answer{to}: {e}",
            "check that it runs (`sharelatex-init status`) and DOCKER_HOST points at it",
        )

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> Any:
        """One request; the decoded JSON answer (None when empty). ApiError on 4xx/5xx,
        EngineError when the engine cannot be reached, or is silent for `timeout` s."""
        target = f"/v{API_VERSION}{path}"
        if query:
            target += "?" + urlencode(query)
        try:
            with self._connect(timeout) as sock:
                response = request(sock, method, target, body)
                raw = response.body()
        except OSError as e:
            raise self._error(e, f"{method} {path}") from e
        if response.status >= 400:
            try:
                message = json.loads(raw).get("message", "")
            except ValueError:
                message = raw.decode(errors="replace")
            raise ApiError(response.status, message)
        return json.loads(raw) if raw else None

    def start(self, name: str, body: Mapping[str, Any]) -> str:
        """Create (the body of `POST /containers/create`) and start a container named `name`;
        its id. ImageMissing when the image is not in the engine. A container of that name left
        behind is removed first."""
        self.sweep_expired()
        container = self.create(name, body)
        try:
            self.call("POST", f"/containers/{container}/start")
        except ApiError as e:
            raise _refused(e) from e
        return container

    def _create(self, name: str, body: Mapping[str, Any]) -> Any:
        """`POST /containers/create`; a container of that name in the way (one that ended and is
        still being removed answers 409 for a moment) is removed and the create tried again,
        for up to CREATE_PATIENCE seconds."""
        deadline = time.monotonic() + CREATE_PATIENCE
        while True:
            try:
                return self.call("POST", "/containers/create", body, {"name": name})
            except ApiError as e:
                if e.status == 404 and "image" in e.message.lower():
                    raise ImageMissing(e.message, 404) from e
                if e.status != 409 or time.monotonic() >= deadline:
                    raise
            self.remove(name)
            time.sleep(0.05)

    def create(self, name: str, body: Mapping[str, Any]) -> str:
        """Create (not start) a container named `name`; its id. ImageMissing, EngineRefused."""
        try:
            return str(self._create(name, body)["Id"])
        except ApiError as e:
            raise _refused(e) from e

    def start_created(self, container: str) -> None:
        """Start a container made by `create`; ContainerGone when it is gone meanwhile."""
        try:
            self.call("POST", f"/containers/{container}/start")
        except ApiError as e:
            if e.status in (404, 409) or _gone(e.message):
                raise ContainerGone(e.message, e.status) from e
            raise self._error(e) from e

    def attach(self, container: str) -> Attachment:
        """The container's stdin, stdout and stderr (`POST /containers/{id}/attach`, upgraded
        to a raw stream): made before the start, so no byte of its output is missed. Writes go
        to its stdin; reads are the engine's multiplexed frames."""
        query = urlencode({"stream": "1", "stdin": "1", "stdout": "1", "stderr": "1"})
        target = f"/v{API_VERSION}/containers/{container}/attach?{query}"
        head = (
            f"POST {target} HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\n"
            "Upgrade: tcp\r\nContent-Length: 0\r\n\r\n"
        )
        asked = f"POST /containers/{container}/attach"
        try:
            sock = self._connect(CALL_TIMEOUT)
        except OSError as e:
            raise self._error(e, asked) from e
        try:
            sock.sendall(head.encode())
            response = Response(sock)
        except (OSError, ValueError, IndexError) as e:
            sock.close()
            raise self._error(e, asked) from e
        if response.status not in (101, 200):
            message = response.body().decode(errors="replace")
            sock.close()
            if response.status in (404, 409) or _gone(message):
                raise ContainerGone(message, response.status)
            raise self._error(ApiError(response.status, message))
        sock.settimeout(None)
        return Attachment(sock, response.buffer)

    def exec(
        self, container: str, command: list[str], user: str, workdir: str, env: Mapping[str, str]
    ) -> Execution:
        """Start `command` in the running `container`; Gone when it is not running."""
        body = {
            "AttachStdin": False, "AttachStdout": True, "AttachStderr": True, "Tty": False,
            "Cmd": command, "Env": [f"{k}={v}" for k, v in env.items()],
            "WorkingDir": workdir, "User": user,
        }  # fmt: skip
        try:
            created = self.call("POST", f"/containers/{container}/exec", body)
        except ApiError as e:
            if e.status in (404, 409) or _gone(e.message):
                raise ContainerGone(e.message, e.status) from e
            raise self._error(e) from e
        asked = f"POST /exec/{created['Id']}/start"
        try:
            sock = self._connect(self.timeout)
        except OSError as e:
            raise self._error(e, asked) from e
        try:
            response = request(
                sock, "POST", f"/v{API_VERSION}/exec/{created['Id']}/start",
                {"Detach": False, "Tty": False},
            )  # fmt: skip
        except OSError as e:
            sock.close()
            raise self._error(e, asked) from e
        if response.status >= 400:
            message = response.body().decode(errors="replace")
            sock.close()
            if response.status in (404, 409) or _gone(message):
                raise ContainerGone(message, response.status)
            raise self._error(ApiError(response.status, message))
        return Execution(self, created["Id"], response)

    def oom_killed(self, container: str, since: float) -> bool:
        """Whether the kernel's OOM killer struck in running `container` since `since` (epoch):
        the engine's "oom" event (20.10 does not set State.OOMKilled while the container runs)."""
        return "oom" in self._events(container, since, ("oom",))

    def ended(self, container: str, since: float) -> ContainerEnd:
        """How `container`, whose agent's stream has closed, ended: its exit status once the
        engine has taken the end in (the stream can close first), then its events since
        `since` (epoch). The engine handles one container's events in order, so an OOM event
        the engine got is in by then; one containerd lost never comes (`ContainerEnd`)."""
        status = self.wait_ended(container, ENDED_WITHIN)
        seen = self._events(container, since, ("oom", "kill"))
        return ContainerEnd("oom" in seen, "kill" in seen, status)

    def _events(self, container: str, since: float, wanted: Sequence[str]) -> set[str]:
        """Which of the `wanted` events the engine logged for `container` since `since`; none
        when it does not answer."""
        query = {
            "since": f"{since - 1:.3f}",
            "until": f"{time.time():.3f}",
            "filters": json.dumps({"container": [container], "event": list(wanted)}),
        }
        target = f"/v{API_VERSION}/events?" + urlencode(query)
        try:
            with self._connect(CALL_TIMEOUT) as sock:
                response = request(sock, "GET", target)
                raw = response.body()
        except OSError:
            return set()
        if response.status != 200:
            return set()
        seen = set()
        for line in raw.splitlines():
            with contextlib.suppress(ValueError, AttributeError):  # not an event: passed by
                event = json.loads(line)
                action = event.get("Action", event.get("status"))
                if action in wanted:
                    seen.add(str(action))
        return seen

    def wait_ended(self, container: str, timeout: float) -> int | None:
        """Until the engine says `container` is not running (`POST .../wait`, condition
        not-running), at most `timeout` s: its exit status. Gone, or no answer in time: None."""
        target = f"/v{API_VERSION}/containers/{container}/wait?condition=not-running"
        try:
            with self._connect(timeout) as sock:
                response = request(sock, "POST", target)
                raw = response.body()
        except OSError:
            return None
        try:
            status = json.loads(raw).get("StatusCode") if response.status == 200 else None
        except (ValueError, AttributeError):
            return None
        return status if isinstance(status, int) else None

    def remove(self, container: str, timeout: float = CALL_TIMEOUT) -> None:
        """Kill and remove; gone already (or being removed) is fine."""
        try:
            query = {"force": "1", "v": "1"}
            self.call("DELETE", f"/containers/{container}", query=query, timeout=timeout)
        except ApiError as e:
            if e.status not in (404, 409):
                raise self._error(e) from e

    def containers(self) -> list[dict[str, Any]]:
        """Every compile container (any project), as the engine lists them."""
        filters = json.dumps({"label": [COMPILE_LABEL]})
        found: list[dict[str, Any]] = self.call(
            "GET", "/containers/json", query={"all": "1", "filters": filters}
        )
        return found

    def sweep_expired(self, now: float | None = None) -> list[str]:
        """Remove compile containers left behind: ended, never started, or past their lifetime
        (their watchdog should have ended them). Running ones of other projects stay."""
        now = time.time() if now is None else now
        removed = []
        for found in self.containers():
            labels = found.get("Labels") or {}
            try:
                expires = float(labels.get(EXPIRES_LABEL, "0"))
            except ValueError:
                expires = 0.0
            state = found.get("State")
            # "created" for a moment is another runner between its create and start.
            stale = state in ("exited", "dead") or (
                state == "created" and now - float(found.get("Created") or now) > 60
            )
            if stale or (state == "running" and expires + self.expiry_grace < now):
                self.remove(found["Id"])
                removed.append(found["Id"][:12])
        return removed

    def close(self) -> None:
        pass
