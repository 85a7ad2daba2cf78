"""Serving a few routes over stdlib HTTP until SIGTERM: what the status endpoint and the compile
API share.

A route is a function of a `Request` that returns a `Response`; `serve` binds the address
(IPv4, IPv6 or a name), answers each connection in a thread, and returns 0 as soon as SIGTERM or
SIGINT arrives. Signals come in through a wakeup fd beside the listening socket, so an idle
server never wakes and a stop is not held up by a poll interval. Unknown paths get 404, known
paths asked with another method 405 (with `Allow`), HEAD is GET without the body. Requests are
not logged; errors are, one line each (a client's own, at debug level).

Hostile clients get bounded room (`ConnectionLimits`): at most `max_connections` connections,
each with a thread of its own; a new one takes the place of the oldest that has not sent a
whole request yet (or of an upload lagging behind the minimum rate), else it gets 503 at once.
Every read and write has a deadline: the request line and headers within `request_timeout` of
the connection's opening or its last answer (idle keep-alive included), the body and the answer
at `min_rate` after `io_timeout`, and never `io_timeout` without a byte. Headers over
`max_header_bytes`, a Content-Length that is not one number, and any Transfer-Encoding are
refused (431, 400, 411) before a route sees the request; a body that ends early is a BodyError,
never a short body taken as whole. A Response may carry an open file, streamed from disk.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import selectors
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import IO, Any
from urllib.parse import parse_qs, urlsplit

from init.config import parse_address
from init.core.log import Log
from init.core.wakeup import SignalWakeup
from init.errors import ConfigError, InitError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The standard methods a route may or may not allow (405); any other word gets 501.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
CHUNK = 1 << 16
_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only: "²".isdigit() is true, int() fails
LINGER = 1.0  # seconds a closing connection reads what its client still sends (so no RST
# destroys the answer it was given), at most LINGER_BYTES of it
LINGER_BYTES = 1 << 20
# Seconds an upload may lag behind min_rate before, the server full, it makes way for a new
# connection: stalled uploads cannot hold every connection until their io_timeout.
EVICT_GRACE = 5.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client may hold of a server, and for how long."""

    max_connections: int = 64  # open at once, each with its thread
    request_timeout: float = 10.0  # from opening (or the last answer) to the end of the headers
    io_timeout: float = 30.0  # no byte in or out for this long ends the connection
    min_rate: int = 64 * 1024  # bytes/s a body and an answer must average after io_timeout
    max_header_bytes: int = 64 * 1024  # the request line and the headers


class BodyError(Exception):
    """The request body did not arrive whole: the client closed early, or stalled past its
    deadline. The request must not be acted on."""


class HeadersTooLarge(OSError):
    """The request line and headers went over ConnectionLimits.max_header_bytes."""


class Body:
    """The request body: reads stop at Content-Length, so the next request stays intact; one
    that ends early raises BodyError. `done` is called once the whole body is in."""

    def __init__(
        self,
        stream: IO[bytes] | io.BufferedIOBase,
        length: int | None,
        done: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self.length = length or 0
        self.remaining = self.length
        self._done = done

    def read(self, size: int) -> bytes:
        if not self.remaining:
            return b""
        want = min(size, self.remaining)
        try:
            data = self._stream.read(want)
        except OSError as e:  # a timeout or a reset
            raise BodyError(self._short(f"then {e or type(e).__name__}")) from e
        if len(data or b"") < want:
            raise BodyError(self._short("then the client closed", len(data or b"")))
        self.remaining -= len(data)
        if not self.remaining and self._done is not None:
            try:
                self._done()
            except OSError as e:  # the connection made way for another meanwhile
                raise BodyError(self._short(str(e))) from e
        return data

    def _short(self, why: str, more: int = 0) -> str:
        got = self.length - self.remaining + more
        return f"the body stopped after {got} of its {self.length} bytes ({why})"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]  # the last value of each parameter
    headers: Mapping[str, str]  # names in lower case
    body: Body
    content_length: int | None
    # The client's connection: POLLRDHUP on it says the client has closed its end (a handler
    # that runs long watches it, as nginx does for a proxied request). None: not a socket.
    connection: int | None = None

    def accepts_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    file: IO[bytes] | None = None  # sent in place of `body` from where it stands, then closed

    @classmethod
    def text(cls, status: int, line: str, **kw: Any) -> Response:
        return cls(status, (line.rstrip("\n") + "\n").encode(), **kw)

    @classmethod
    def json(cls, status: int, document: object, **kw: Any) -> Response:
        body = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
        return cls(status, body, "application/json", **kw)

    def length(self) -> int:
        if self.file is None:
            return len(self.body)
        return max(0, os.fstat(self.file.fileno()).st_size - self.file.tell())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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
        except BodyError as e:
            return Response.text(HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:  # a bug in one request must not end the server
            self.log.error(self.name, f"{request.method} {request.path}: {type(e).__name__}: {e}")
            return Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {e}")


def body_length(headers: Any) -> tuple[int | None, tuple[int, str] | None]:
    """(Content-Length or None, None) or (None, (status, why)) for a framing this server does
    not read: several different lengths, one that is not a number, any Transfer-Encoding."""
    lengths = {v.strip() for v in headers.get_all("Content-Length") or ()}
    if headers.get_all("Transfer-Encoding"):
        if lengths:
            return None, (400, "Content-Length and Transfer-Encoding together; send one length")
        return None, (411, "chunked bodies are not read here; send the body with a Content-Length")
    if len(lengths) > 1:
        return None, (400, f"{len(lengths)} different Content-Length headers; send one")
    if not lengths:
        return None, None
    (text,) = lengths
    if not _LENGTH.fullmatch(text):
        return None, (400, f"Content-Length {text[:40]!r} is not a number of bytes")
    return int(text), None


# -- connections ---------------------------------------------------------------------------

WAITING = "waiting"  # for a request: idle, or its line and headers coming in
BODY = "body"  # the body coming in
HANDLING = "handling"  # the route at work (a compile): no reads, no writes
ANSWERING = "answering"


class Connection:
    """One client's socket: each read and write bounded by the deadline of its phase."""

    def __init__(
        self,
        sock: socket.socket,
        address: Any,
        limits: ConnectionLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.address = address
        self.limits = limits
        self.clock = clock
        self.lock = threading.Lock()
        self.evicted = False
        self.phase = WAITING
        self.started = clock()
        self.deadline = self.started + limits.request_timeout
        self.received = 0
        self.expected = 0

    def enter(self, phase: str, seconds: float, expected: int = 0) -> None:
        with self.lock:
            if self.evicted:
                raise ConnectionAbortedError(errno.ECONNABORTED, "made way for another client")
            self.phase, self.started = phase, self.clock()
            self.deadline = self.started + seconds
            self.received, self.expected = 0, expected

    def wait_for_request(self) -> None:
        self.enter(WAITING, self.limits.request_timeout)

    def transfer(self, phase: str, size: int) -> None:
        """Enter a phase that moves `size` bytes: io_timeout, plus size at min_rate."""
        self.enter(phase, self.limits.io_timeout + size / self.limits.min_rate, size)

    def recv_into(self, buffer: Any) -> int:
        self.sock.settimeout(self._timeout())
        count = self.sock.recv_into(buffer)
        self.received += count
        if self.phase == WAITING and self.received > self.limits.max_header_bytes:
            raise HeadersTooLarge(errno.EMSGSIZE, "the request's headers are too large")
        return count

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self.sock.settimeout(self._timeout())
            self.sock.sendall(view[start : start + CHUNK])

    def _timeout(self) -> float:
        left = self.deadline - self.clock()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, f"over the deadline of its {self.phase} phase")
        return min(self.limits.io_timeout, left)

    def evictable(self, now: float) -> bool:
        """No whole request yet, or a body lagging behind min_rate (after EVICT_GRACE)."""
        if self.phase == WAITING:
            return True
        if self.phase == BODY:
            due = (now - self.started - EVICT_GRACE) * self.limits.min_rate
            return self.received < min(self.expected, due)
        return False

    def evict(self, now: float) -> bool:
        """End the connection to make way for another, if it still may be; its thread wakes
        from its read at once."""
        with self.lock:
            if self.evicted or not self.evictable(now):
                return False
            self.evicted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return True

    def close(self, linger: bool) -> None:
        """Close; with `linger`, first read for a moment what the client still sends, so that
        closing with unread bytes does not reset the connection before it read its answer."""
        with contextlib.suppress(OSError):
            if linger and not self.evicted:
                self.sock.shutdown(socket.SHUT_WR)
                end = time.monotonic() + LINGER
                drained = 0
                while drained < LINGER_BYTES and (left := end - time.monotonic()) > 0:
                    self.sock.settimeout(left)
                    chunk = self.sock.recv(CHUNK)
                    if not chunk:
                        break
                    drained += len(chunk)
        self.sock.close()


BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 5\r\nConnection: close\r\nContent-Length: 42\r\n\r\n"
    b"too many connections; try again in a while\n"
)


def refuse(sock: socket.socket) -> None:
    """503 to a connection there is no room for, without waiting on its client."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(BUSY_ANSWER)
    sock.close()


class _Incoming(io.RawIOBase):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.connection.recv_into(buffer)


class _Outgoing:
    """BaseHTTPRequestHandler's wfile: every write against the connection's deadline."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.closed = False

    def write(self, data: bytes) -> int:
        self.connection.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "sharelatex-init"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # A request line without a version is not answered as HTTP/0.9 (a body without a status).
    default_request_version = "HTTP/1.0"
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"
    conn: Connection
    lingering = False

    def setup(self) -> None:
        self.conn = self.request
        self.connection = self.conn.sock
        # The headers and the body go out in two writes: Nagle would hold the second back
        # until the client's delayed ACK of the first (40 ms on Linux).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = io.BufferedReader(_Incoming(self.conn))
        self.wfile = _Outgoing(self.conn)  # type: ignore[assignment]

    def handle(self) -> None:
        self.close_connection = True
        try:
            self.handle_one_request()
            while not self.close_connection:
                self.conn.wait_for_request()
                self.handle_one_request()
        except HeadersTooLarge:
            limit = self.conn.limits.max_header_bytes
            # Cut off before parse_request set these; send_error needs them.
            self.command, self.requestline, self.request_version = "", "", "HTTP/1.0"
            self.lingering = True
            with contextlib.suppress(OSError):
                self.conn.enter(ANSWERING, self.conn.limits.io_timeout)
                self.send_error(431, f"the request line and headers are over {limit} bytes")
        except OSError:
            pass  # the client went away, stalled past a deadline, or made way for another

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        length, problem = body_length(self.headers)
        if problem is not None:
            status, why = problem
            self.lingering = True
            self._answer(Response.text(status, why), keep=False)
            return
        if length:
            self.conn.transfer(BODY, length)
        else:
            self.conn.enter(HANDLING, 0)
        request = Request(
            method=self.command,
            path=url.path,
            query={k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=Body(self.rfile, length, done=lambda: self.conn.enter(HANDLING, 0)),
            content_length=length,
            connection=self.connection.fileno(),
        )
        with self.server.busy:
            self.server.inflight += 1
        try:
            response = self.server.app.respond(request)
            if request.body.remaining:  # left unread: the rest may never come, or be a bomb
                self.lingering = True
            self._answer(response, keep=not request.body.remaining)
        finally:
            with self.server.busy:
                self.server.inflight -= 1
                self.server.busy.notify_all()

    def _answer(self, response: Response, keep: bool) -> None:
        try:
            length = response.length()
            self.conn.transfer(ANSWERING, length)
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(length))
            for name, value in response.headers:
                self.send_header(name, value)
            if not keep:  # the connection cannot carry another request
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            if response.file is None:
                self.wfile.write(response.body)
                return
            while chunk := response.file.read(CHUNK):
                self.wfile.write(chunk)
        finally:
            response.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no line per request: probes would fill the log

    def log_message(self, format: str, *args: Any) -> None:
        # Only a client's errors reach here (send_error: bad request lines, timeouts): a line
        # each at the default level would let any client fill the log.
        self.server.app.log.debug(
            self.server.app.name, f"{self.client_address[0]}: {format % args}"
        )


class _Server(HTTPServer):
    app: App
    limits: ConnectionLimits
    request_queue_size = 128  # a burst of connections waits in the kernel, not refused by it
    inflight = 0  # requests being answered, so that a stop lets them finish writing
    busy: threading.Condition
    lock: threading.Lock
    connections: dict[Connection, None]  # open, oldest first

    def accept_one(self) -> None:
        """Take one connection off the listening socket and give it a thread, making room for
        it at the cap (or answering 503 when there is none)."""
        try:
            sock, address = self.socket.accept()
        except OSError:  # gone before we took it; EMFILE
            return
        with self.lock:
            if len(self.connections) >= self.limits.max_connections and not self._make_room():
                refuse(sock)
                return
            connection = Connection(sock, address, self.limits)
            self.connections[connection] = None
        try:
            threading.Thread(
                target=self._serve, args=(connection,), name=f"http-{address}", daemon=True
            ).start()
        except RuntimeError:  # no thread to be had
            with self.lock:
                self.connections.pop(connection, None)
            refuse(sock)

    def _make_room(self) -> bool:
        """Evict the oldest connection without a whole request, else the most lagging upload."""
        now = time.monotonic()
        waiting = [c for c in self.connections if c.phase == WAITING]
        lagging = sorted(
            (c for c in self.connections if c.phase == BODY and c.evictable(now)),
            key=lambda c: c.received / max(1.0, now - c.started),
        )
        for connection in (*waiting, *lagging):
            if connection.evict(now):
                self.connections.pop(connection, None)
                return True
        return False

    def _serve(self, connection: Connection) -> None:
        handler: _Handler | None = None
        try:
            # The Connection stands in for the socket: the handler's setup takes it.
            handler = _Handler(connection, connection.address, self)  # type: ignore[arg-type]
        except Exception as e:  # a client's connection failing must not print a traceback
            self.app.log.debug(self.app.name, f"{connection.address[0]}: {e}")
        finally:
            with self.lock:
                self.connections.pop(connection, None)
            connection.close(linger=handler is not None and handler.lingering)

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


def bind(app: App, listener: Listener, limits: ConnectionLimits | None = None) -> _Server:
    """The server, bound and listening (OSError from bind: address in use, not ours, ...)."""

    class Server(_Server):
        address_family = listener.family

    server = Server(listener.sockaddr, _Handler, bind_and_activate=False)
    server.app = app
    server.limits = limits or ConnectionLimits()
    server.busy = threading.Condition()
    server.lock = threading.Lock()
    server.connections = {}
    try:
        server.server_bind()
        server.server_activate()
        server.socket.setblocking(False)  # accept() after a select: never wait on a client
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
    try:
        with SignalWakeup(STOP_SIGNALS) as wakeup, selectors.DefaultSelector() as selector:
            selector.register(server.fileno(), selectors.EVENT_READ, "accept")
            selector.register(wakeup.fd, selectors.EVENT_READ, "signal")
            while True:
                ready = {key.data for key, _ in selector.select()}
                if "signal" in ready and wakeup.drain():
                    break
                if "accept" in ready:
                    server.accept_one()
            if on_stop is not None:
                on_stop()
            server.drain(drain)
    finally:
        server.server_close()
    return 0


def listen(app: App, text: str, source: str, limits: ConnectionLimits | None = None) -> _Server:
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
        return bind(app, listener, limits)
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
