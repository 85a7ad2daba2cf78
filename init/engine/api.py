"""Every engine call of the compile runner, behind one small class (the Docker backend).

Another backend (a Kubernetes pod per project, exec into it) would sit beside this one with
the same calls: start, exec, oom_killed, remove, sweep_expired. It speaks the Engine API over a
plain socket (HTTP/1.1, one connection a request) rather than through the Docker SDK: importing
the SDK (and requests) costs ~150 ms per process here and http.client 25 ms, and every
`compile` and every shim is a process of its own, so that alone would add a third to a
one-page compile. The API version is fixed (1.41: Docker 20.10, the oldest engine the sibling
check accepts), which also saves the version round trip; images are never inspected: a create
that fails with "No such image" says it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from init.compiles.profile import COMPILE_LABEL, EXPIRES_LABEL, ContainerSpec
from init.compiles.settings import KILL_GRACE, Limits
from init.errors import ConfigError, EngineError

API_VERSION = "1.41"
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def urlencode(query: Mapping[str, str]) -> str:
    """`a=1&b=%7B...` (urllib.parse costs 4 ms of import a compile)."""

    def quote(text: str) -> str:
        return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())

    return "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())


Connect = Callable[[float], socket.socket]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
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


class DockerBackend:
    """The Docker engine at `url` (DOCKER_HOST), as the compile runner uses it."""

    class ImageMissing(Exception):
        """The image is not in the engine."""

    class Gone(Exception):
        """The container has ended or does not exist."""

    def __init__(self, url: str, limits: Limits, environ: Mapping[str, str] | None = None) -> None:
        self.url = url
        self._connect = connector(url, os.environ if environ is None else environ)
        self.timeout = limits.deadlines.engine_call

    def _error(self, e: BaseException) -> EngineError:
        return EngineError(
            f"the Docker engine at {self.url} did not answer: {e}",
            "check that it runs (`sharelatex-init status`) and DOCKER_HOST points at it",
        )

    def call(
        self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None
    ) -> Any:
        """One request; the decoded JSON answer (None when empty). ApiError on 4xx/5xx,
        EngineError when the engine cannot be reached."""
        target = f"/v{API_VERSION}{path}"
        if query:
            target += "?" + urlencode(query)
        try:
            with self._connect(30.0) as sock:
                response = request(sock, method, target, body)
                raw = response.body()
        except OSError as e:
            raise self._error(e) from e
        if response.status >= 400:
            try:
                message = json.loads(raw).get("message", "")
            except ValueError:
                message = raw.decode(errors="replace")
            raise ApiError(response.status, message)
        return json.loads(raw) if raw else None

    def start(self, spec: ContainerSpec) -> str:
        """Create and start the project's container; its id. ImageMissing when the image is not
        in the engine. A container of that name left behind is removed first."""
        body = spec.create_body()
        try:
            self.sweep_expired()
            try:
                created = self.call("POST", "/containers/create", body, {"name": spec.name})
            except ApiError as e:
                if e.status == 404 and "image" in e.message.lower():
                    raise self.ImageMissing(e.message) from e
                if e.status != 409:
                    raise
                self.remove(spec.name)
                created = self.call("POST", "/containers/create", body, {"name": spec.name})
            self.call("POST", f"/containers/{created['Id']}/start")
        except ApiError as e:
            raise EngineError(
                f"the engine refused the compile container: {e.message}",
                "see `sharelatex-init doctor`",
            ) from e
        return str(created["Id"])

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
            if e.status in (404, 409):
                raise self.Gone(e.message) from e
            raise self._error(e) from e
        try:
            sock = self._connect(self.timeout)
        except OSError as e:
            raise self._error(e) from e
        try:
            response = request(
                sock, "POST", f"/v{API_VERSION}/exec/{created['Id']}/start",
                {"Detach": False, "Tty": False},
            )  # fmt: skip
        except OSError as e:
            sock.close()
            raise self._error(e) from e
        if response.status >= 400:
            message = response.body().decode(errors="replace")
            sock.close()
            if response.status in (404, 409):
                raise self.Gone(message)
            raise self._error(ApiError(response.status, message))
        return Execution(self, created["Id"], response)

    def oom_killed(self, container: str, since: float) -> bool:
        """Whether the kernel's OOM killer struck in `container` since `since` (epoch): the
        engine's "oom" event (20.10 does not set State.OOMKilled while the container runs)."""
        query = {
            "since": f"{since - 1:.3f}",
            "until": f"{time.time():.3f}",
            "filters": json.dumps({"container": [container], "event": ["oom"]}),
        }
        target = f"/v{API_VERSION}/events?" + urlencode(query)
        try:
            with self._connect(30.0) as sock:
                response = request(sock, "GET", target)
                raw = response.body()
        except OSError:
            return False
        return response.status == 200 and b'"oom"' in raw

    def remove(self, container: str) -> None:
        """Kill and remove; gone already (or being removed) is fine."""
        try:
            self.call("DELETE", f"/containers/{container}", query={"force": "1", "v": "1"})
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

    def sweep(self) -> list[str]:
        """Remove every compile container; their short ids."""
        removed = []
        for found in self.containers():
            self.remove(found["Id"])
            removed.append(found["Id"][:12])
        return removed

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
            if stale or (state == "running" and expires + KILL_GRACE < now):
                self.remove(found["Id"])
                removed.append(found["Id"][:12])
        return removed

    def close(self) -> None:
        pass
