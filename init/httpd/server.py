"""Serving a few routes over stdlib HTTP until SIGTERM: what the status endpoint and the compile
API share.

A route is a function of a `Request` that returns a `Response`; `serve` binds the address
(IPv4, IPv6 or a name), answers each connection in a thread, and returns 0 as soon as SIGTERM or
SIGINT arrives. Signals come in through a wakeup fd beside the listening socket, so an idle
server never wakes and a stop is not held up by a poll interval. Unknown paths get 404, known
paths asked with another method 405 (with `Allow`), HEAD is GET without the body. Requests are
not logged; errors are, one line each.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import selectors
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from init.config import parse_address
from init.core.log import Log
from init.core.wakeup import SignalWakeup
from init.errors import ConfigError, InitError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The standard methods a route may or may not allow (405); any other word gets 501.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class Body:
    """The request body: reads stop at Content-Length, so the next request stays intact."""

    def __init__(self, stream: io.BufferedIOBase, length: int | None) -> None:
        self._stream = stream
        self.remaining = length or 0

    def read(self, size: int) -> bytes:
        data = self._stream.read(min(size, self.remaining)) if self.remaining else b""
        self.remaining = 0 if not data else self.remaining - len(data)
        return data


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]  # the last value of each parameter
    headers: Mapping[str, str]  # names in lower case
    body: Body
    content_length: int | None

    def accepts_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, line: str, **kw: Any) -> Response:
        return cls(status, (line.rstrip("\n") + "\n").encode(), **kw)

    @classmethod
    def json(cls, status: int, document: object, **kw: Any) -> Response:
        body = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
        return cls(status, body, "application/json", **kw)


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class App:
    """What a server answers: routes[path][method], and the name its log lines start with."""

    name: str
    routes: Mapping[str, Mapping[str, Handler]]
    log: Log = field(default_factory=Log)

    def respond(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            return Response.text(HTTPStatus.NOT_FOUND, f"no {request.path} here")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            return Response.text(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                headers=(("Allow", ", ".join(allowed)),),
            )
        try:
            return handler(request)
        except Exception as e:  # a bug in one request must not end the server
            self.log.error(self.name, f"{request.method} {request.path}: {type(e).__name__}: {e}")
            return Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {e}")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "sharelatex-init"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        length_header = self.headers.get("Content-Length", "").strip()
        length = int(length_header) if length_header.isdigit() else None
        request = Request(
            method=self.command,
            path=url.path,
            query={k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=Body(self.rfile, length),
            content_length=length,
        )
        with self.server.busy:
            self.server.inflight += 1
        try:
            self._answer(request, self.server.app.respond(request))
        finally:
            with self.server.busy:
                self.server.inflight -= 1
                self.server.busy.notify_all()

    def _answer(self, request: Request, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if request.body.remaining:  # left unread: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(OSError):  # the client went away: nothing to tell it
                self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no line per request: probes would fill the log

    def log_message(self, format: str, *args: Any) -> None:
        # Only errors reach here (send_error: bad request lines, timeouts).
        self.server.app.log.error(
            self.server.app.name, f"{self.client_address[0]}: {format % args}"
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: App
    inflight = 0  # requests being answered, so that a stop lets them finish writing
    busy: threading.Condition

    def drain(self, timeout: float) -> None:
        """Wait up to `timeout` for the requests being answered to be written out."""
        deadline = time.monotonic() + timeout
        with self.busy:
            while self.inflight and (left := deadline - time.monotonic()) > 0:
                self.busy.wait(left)

    def server_bind(self) -> None:
        # HTTPServer's own asks getfqdn() of the address: a reverse DNS lookup that can hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


@dataclass(frozen=True)
class Listener:
    """A resolved address to bind: the family getaddrinfo gave and its socket address."""

    family: socket.AddressFamily
    sockaddr: tuple[Any, ...]
    shown: str  # as an operator writes it: 127.0.0.1:8089, [::1]:8089


def resolve(host: str, port: int) -> Listener:
    """The first passive address for host:port (OSError when the name does not resolve)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return Listener(family, tuple(sockaddr), _shown(family, str(sockaddr[0]), int(sockaddr[1])))


def _shown(family: int, host: str, port: int) -> str:
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def bind(app: App, listener: Listener) -> _Server:
    """The server, bound and listening (OSError from bind: address in use, not ours, ...)."""

    class Server(_Server):
        address_family = listener.family

    server = Server(listener.sockaddr, _Handler, bind_and_activate=False)
    server.app = app
    server.busy = threading.Condition()
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    return server


def bound_address(server: _Server) -> str:
    """host:port the server really listens on (the port the kernel chose for port 0)."""
    host, port = server.socket.getsockname()[:2]
    return _shown(server.address_family, str(host), int(port))


def serve(server: _Server, on_stop: Callable[[], None] | None = None, drain: float = 5.0) -> int:
    """Answer requests until SIGTERM or SIGINT; then `on_stop()`, let the answers being written
    finish (up to `drain` seconds), close, and return 0."""
    server.timeout = 1.0  # handle_request's own wait, should a wakeup be spurious
    try:
        with SignalWakeup(STOP_SIGNALS) as wakeup, selectors.DefaultSelector() as selector:
            selector.register(server.fileno(), selectors.EVENT_READ, "accept")
            selector.register(wakeup.fd, selectors.EVENT_READ, "signal")
            while True:
                ready = {key.data for key, _ in selector.select()}
                if "signal" in ready and wakeup.drain():
                    break
                if "accept" in ready:
                    server.handle_request()
            if on_stop is not None:
                on_stop()
            server.drain(drain)
    finally:
        server.server_close()
    return 0


def listen(app: App, text: str, source: str) -> _Server:
    """Parse, resolve and bind `text` (named by `source`: --listen, or the variable it came
    from). ConfigError (exit 78) for an address that cannot be right; InitError when binding
    fails for a reason that may pass (the port in use)."""
    try:
        host, port = parse_address(text)
        listener = resolve(host, port)
    except (ValueError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([f"{source}={text!r}: {reason}"]) from e
    try:
        return bind(app, listener)
    except OSError as e:
        fix = {
            errno.EADDRINUSE: f"something else listens there; choose another port with {source}",
            errno.EADDRNOTAVAIL: f"no interface has that address; use 0.0.0.0 or [::] in {source}",
            errno.EACCES: f"ports below 1024 need root; choose a higher one with {source}",
        }.get(e.errno or 0, f"check {source}")
        message = f"cannot listen on {listener.shown}: {e.strerror}"
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError([f"{source}={text!r}: {message}; {fix}"]) from e
        raise InitError(message, fix) from e


def run(
    app: App, make_server: Callable[[], _Server], on_stop: Callable[[], None] | None = None
) -> int:
    """The boundary of a server's `main`: an InitError becomes one line and its exit status."""
    try:
        server = make_server()
    except ConfigError as e:
        for problem in e.problems:
            app.log.error(app.name, problem)
        return e.exit_status
    except InitError as e:
        app.log.error(app.name, str(e))
        return e.exit_status
    app.log.info(app.name, f"listening on {bound_address(server)}")
    code = serve(server, on_stop)
    app.log.info(app.name, "stopped")
    return code
