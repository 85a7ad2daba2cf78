"""The proxy's I/O: the listening socket, a thread per caller's connection, the engine's
look-ups, forwarding, and hijacked streams spliced both ways.

Each connection reads one request at a time (keep-alive, and a second request pipelined in the
same write is simply the next one), judges it (policy.decide) and either refuses it with a
one-line JSON reason or sends the engine the request the policy built, over the connection's
own connection to the engine. The engine's answer is streamed back as it comes (a wait, the
logs); the listing calls' answers are read whole and filtered (answers.py). When the engine
hijacks the connection (`101 UPGRADED` for attach or exec start, or the 200 raw stream), the
two sockets are spliced until either side ends: the multiplexed frames pass untouched.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from init.core.log import Log
from init.core.status_file import REFUSALS_KEPT, Refusal, write_refusals
from init.core.wakeup import SignalWakeup
from init.engine import client
from init.engine.client import COMPILE_LABEL
from init.proxy import answers, body, policy, route, sweep, wire
from init.proxy.decision import Answer, Forward, Refused
from init.proxy.settings import NAME, ProxyConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

IDLE = 600.0  # seconds a caller's connection may sit between requests
LOOKUP_TIMEOUT = 10.0
REPEAT_WINDOW = 60.0  # seconds: the same refusal of the same uid is logged once in this
CACHE_SIZE = 4096


class EngineFacts(policy.Facts):
    """The policy's questions, answered by the engine (raw socket), remembered by full id:
    ids are never reused, and a container's labels never change."""

    def __init__(self, engine: Path) -> None:
        self.engine = str(engine)
        self.compile: dict[str, bool] = {}
        self.execs: dict[str, str] = {}
        self.lock = threading.Lock()

    def _get(self, target: str) -> tuple[int, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(LOOKUP_TIMEOUT)
                sock.connect(self.engine)
                answer = client.request(sock, "GET", target)
                raw = answer.body()
        except OSError as e:
            raise Refused(f"the engine does not answer ({e})", 502) from e
        if answer.status == 404:
            return 404, None
        if answer.status != 200:
            raise Refused(f"the engine answered a look-up with {answer.status}", 502)
        return 200, json.loads(raw)

    def container(self, name: str) -> policy.Container | None:
        with self.lock:
            known = self.compile.get(name) if policy.is_full_id(name) else None
        if known is not None:
            return policy.Container(name, known)
        status, document = self._get("/containers/" + _segment(name) + "/json")
        if status == 404 or not isinstance(document, dict):
            return None
        labels = (document.get("Config") or {}).get("Labels") or {}
        found = policy.Container(str(document["Id"]), labels.get(COMPILE_LABEL) == "1")
        self.remember(found.id, found.compile)
        return found

    def exec_container(self, exec_id: str) -> str | None:
        with self.lock:
            known = self.execs.get(exec_id)
        if known is not None:
            return known
        status, document = self._get("/exec/" + _segment(exec_id) + "/json")
        if status == 404 or not isinstance(document, dict):
            return None
        return str(document.get("ContainerID") or "") or None

    def remember(self, container_id: str, compile_: bool = True) -> None:
        with self.lock:
            if len(self.compile) > CACHE_SIZE:
                self.compile.clear()
            self.compile[container_id] = compile_

    def remember_exec(self, exec_id: str, container_id: str) -> None:
        with self.lock:
            if len(self.execs) > CACHE_SIZE:
                self.execs.clear()
            self.execs[exec_id] = container_id


def _segment(text: str) -> str:
    return route.Route("GET", None, (text,)).target()[1:]


class Refusals:
    """One log line per refusal, with the caller's uid; the same refusal of the same uid again
    within REPEAT_WINDOW is counted, not logged (a loop of a broken runner floods nothing)."""

    def __init__(self, log: Log, keep: Path | None = None) -> None:
        self.log = log
        self.keep = keep  # the file `status` and `doctor` read the last refusals from
        self.lock = threading.Lock()
        self.last: dict[tuple[int, str], tuple[float, int]] = {}
        self.recent: list[Refusal] = []

    def note(self, uid: int, pid: int, what: str, reason: str) -> None:
        now = time.monotonic()
        key = (uid, reason)
        with self.lock:
            seen, count = self.last.get(key, (-REPEAT_WINDOW, 0))
            if now - seen < REPEAT_WINDOW:
                self.last[key] = (seen, count + 1)
                return
            self._record(Refusal(time.time(), uid, what, reason, count))
            if len(self.last) > CACHE_SIZE:
                self.last.clear()
            self.last[key] = (now, 0)
        more = f" (and {count} more like it)" if count else ""
        said = reason if reason.startswith(what) else f"{what}: {reason}"
        self.log.warning(NAME, f"refused uid {uid} (pid {pid}): {said}{more}")

    def _record(self, refusal: Refusal) -> None:
        """Kept for `status` and `doctor` (under the lock; a write that fails is only logged:
        refusing goes on whether or not it can be shown)."""
        self.recent = [*self.recent, refusal][-REFUSALS_KEPT:]
        if self.keep is None:
            return
        try:
            write_refusals(self.keep, tuple(self.recent))
        except OSError as e:
            self.log.warning(NAME, f"cannot keep the refusals in {self.keep}: {e.strerror}")


def peer(sock: socket.socket) -> tuple[int, int]:
    """(uid, pid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return -1, -1
    pid, uid, _ = struct.unpack("3i", raw)
    return uid, pid


class Session:
    """One caller's connection, and its own connection to the engine."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.config = server.config
        self.sock = sock
        self.reader = wire.Reader(sock)
        self.uid, self.pid = peer(sock)
        self.upstream: socket.socket | None = None
        self.upstream_reader: wire.Reader | None = None

    def run(self) -> None:
        try:
            while self.serve_one():
                pass
        except (wire.Closed, OSError):
            pass
        except Exception as e:  # the thread's boundary: one line, never a traceback
            self.server.log.error(NAME, f"a connection of uid {self.uid} ended: {e!r}")
        finally:
            self.close_upstream()
            self.sock.close()

    def serve_one(self) -> bool:
        """One request; whether the connection may carry another."""
        self.sock.settimeout(IDLE)
        try:
            raw = self.reader.head()
        except Refused as refused:
            return self.refuse(refused, "?", close=True)
        if raw is None:
            return False
        self.sock.settimeout(None)
        what = raw.split(b"\r\n", 1)[0][:120].decode("latin-1")
        try:
            head = wire.parse_request(raw)
            framing = wire.request_framing(head)
        except Refused as refused:
            return self.refuse(refused, what, close=True)
        method, target, minor = head.first
        close = minor == "0" or "close" in head.tokens("connection")
        try:
            parsed = route.parse(method, target)
            what = f"{method} {parsed.path[:100]}"
            if framing.kind != "none" and "100-continue" in head.tokens("expect"):
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            payload = wire.read_body(self.reader, framing, self.config.max_body)
        except Refused as refused:
            return self.refuse(refused, what, close=True)
        try:
            forward = policy.decide(
                parsed, payload, "tcp" in head.tokens("upgrade"), self.config, self.server.facts
            )
        except Refused as refused:
            return self.refuse(refused, what, close=close)
        if forward.rewritten:
            self.server.log.debug(NAME, f"{what}: {'; '.join(forward.rewritten)}")
        return self.forward(forward, head.get("user-agent"), close)

    def refuse(self, refused: Refused, what: str, close: bool) -> bool:
        if refused.status != 404:
            self.server.refusals.note(self.uid, self.pid, what, refused.reason)
        document = body.dumps({"message": refused.message()}) + b"\n"
        reason = wire._reason(refused.status)
        try:
            self.sock.sendall(wire.response(refused.status, reason, document, close))
        except OSError:
            return False
        return not close

    # -- the engine's side ---------------------------------------------------------------

    def connect_upstream(self) -> tuple[socket.socket, wire.Reader]:
        if self.upstream is None or self.upstream_reader is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.config.engine))
            except OSError as e:
                sock.close()
                raise Refused(f"the engine does not answer ({e.strerror})", 502) from e
            self.upstream, self.upstream_reader = sock, wire.Reader(sock)
        return self.upstream, self.upstream_reader

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self.upstream = self.upstream_reader = None

    def forward(self, forward: Forward, agent: str | None, close: bool) -> bool:
        head_bytes = wire.request_head(
            forward.method, forward.target, forward.body, forward.upgrade, agent
        )
        for attempt in (1, 2):
            try:
                upstream, reader = self.connect_upstream()
            except Refused as refused:
                return self.refuse(refused, f"{forward.method} {forward.target[:100]}", close)
            try:
                upstream.sendall(head_bytes + (forward.body or b""))
                raw = reader.head()
            except (OSError, wire.Closed, Refused):
                raw = None
            if raw is not None:
                break
            # A kept-alive engine connection closed by the engine in between: once more, fresh.
            self.close_upstream()
            if attempt == 2:
                return self.refuse(Refused("the engine closed the connection", 502), "", close)
        if raw is None:
            return False
        head = wire.parse_response(raw)
        framing = wire.response_framing(head, forward.method)
        status = int(head.first[1])
        if status == 101 or (forward.stream and framing.kind == "none" and status == 200):
            self.sock.sendall(raw + b"\r\n\r\n")
            self.splice(upstream, reader)
            return False
        if forward.answer is Answer.PASS or status >= 300:
            self.sock.sendall(raw + b"\r\n\r\n")
            wire.relay_body(reader, self.sock, framing)
        else:
            self.rewrite_answer(forward, head, reader, framing)
        if framing.kind == "none" or "close" in head.tokens("connection"):
            self.close_upstream()
            return False if framing.kind == "none" else not close
        return not close

    def rewrite_answer(
        self, forward: Forward, head: wire.Head, reader: wire.Reader, framing: wire.Framing
    ) -> None:
        raw = _whole(reader, framing)
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = None
        answer = forward.answer
        if answer is Answer.REMEMBER_CONTAINER and isinstance(document, dict):
            self.server.facts.remember(str(document.get("Id", "")))
        elif answer is Answer.REMEMBER_EXEC and isinstance(document, dict):
            container = forward.target.split("/containers/", 1)[1].split("/", 1)[0]
            self.server.facts.remember_exec(str(document.get("Id", "")), container)
        elif answer is Answer.TRIM_INFO:
            raw = body.dumps(answers.trim_info(document))
        elif answer is Answer.FILTER_IMAGES:
            raw = body.dumps(answers.filter_images(document, self.config.images))
        elif answer is Answer.FILTER_CONTAINERS:
            raw = body.dumps(answers.filter_containers(document))
        elif answer is Answer.RETIRE_STALE and isinstance(document, dict) and self.retire(document):
            name = forward.target.split("/containers/", 1)[1].split("/", 1)[0]
            missing = body.dumps({"message": f"No such container: {name}"}) + b"\n"
            self.sock.sendall(wire.response(404, wire._reason(404), missing, False))
            return
        self.sock.sendall(wire.response_head(head, len(raw)) + raw)

    def retire(self, document: dict[str, Any]) -> bool:
        """Whether the stopped compile container inspected is now removed (sweep.py)."""
        labels = (document.get("Config") or {}).get("Labels") or {}
        seen = sweep.Seen.from_inspect(document)
        if labels.get(COMPILE_LABEL) != "1":
            return False
        if not sweep.retire_on_inspect(seen, time.time(), self.config.rules):
            return False
        try:
            gone = sweep.remove(self.config.engine, seen.id, force=False)
        except (OSError, ValueError):
            return False
        if gone:
            self.server.log.debug(NAME, f"retired {seen.id[:12]}: idle too long to start again")
        return gone

    def splice(self, upstream: socket.socket, reader: wire.Reader) -> None:
        """Both ways until the engine's side ends; the caller's end of sending (shutdown of
        its write side: stdin closed) is passed on, the stream back keeps flowing."""
        pending_down = reader.take()
        pending_up = self.reader.take()
        if pending_down:
            self.sock.sendall(pending_down)
        if pending_up:
            upstream.sendall(pending_up)
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, self.sock)
            open_ways = 2
            while open_ways:
                for key, _ in selector.select():
                    source = key.fileobj
                    target: socket.socket = key.data
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        try:
                            target.sendall(data)
                        except OSError:
                            return
                        continue
                    selector.unregister(source)
                    open_ways -= 1
                    if source is upstream:
                        return  # the stream is over
                    try:
                        upstream.shutdown(socket.SHUT_WR)
                    except OSError:
                        return


def _whole(reader: wire.Reader, framing: wire.Framing) -> bytes:
    if framing.kind == "length":
        return reader.exact(framing.length)
    if framing.kind == "chunked":
        return wire.read_body(reader, framing, 1 << 30)
    while reader.fill():
        pass
    return reader.take()


class Server:
    """The listening socket and its connections' threads."""

    def __init__(self, config: ProxyConfig, log: Log) -> None:
        self.config = config
        self.log = log
        self.facts = EngineFacts(config.engine)
        self.refusals = Refusals(log, config.refusals)
        self.listener: socket.socket | None = None

    def listen(self) -> socket.socket:
        """Bind the socket: root's and the services' group's (0660), or root's alone (0600).
        A stale socket file (an earlier run's) is replaced; anything else there is an error.
        It is made under a temporary name and renamed into place once its owner, mode and
        backlog are set: whoever sees the path finds it whole (seen: a reader found 0600)."""
        path = self.config.listen
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                # What bind() said of it before: the same line from __main__.
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), str(path))
        except FileNotFoundError:
            pass
        making = path.with_name(f".{path.name}.{os.getpid()}")
        making.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(making))
        finally:
            os.umask(old)
        try:
            if self.config.group is not None:
                os.chown(making, 0 if os.geteuid() == 0 else -1, self.config.group)
                os.chmod(making, 0o660)
            sock.listen(128)
            os.replace(making, path)  # a stale socket there goes
        except BaseException:
            sock.close()
            making.unlink(missing_ok=True)
            raise
        self.listener = sock
        return sock

    def serve(self, stop_signals: tuple[int, ...]) -> None:
        """Accept until one of `stop_signals` arrives (through a wakeup fd: no handler does
        work), sweeping meanwhile. Connections still open end with the process: the services
        stop before it."""
        listener = self.listener or self.listen()
        sweeper = sweep.Sweeper(
            self.config.engine, self.config.rules, self.swept,
            lambda problem: self.log.warning(NAME, problem), time.time,
        )  # fmt: skip
        sweeper.start()
        try:
            self._accept(listener, stop_signals)
        finally:
            sweeper.stop()

    def swept(self, removed: list[tuple[str, str]]) -> None:
        said = ", ".join(f"{short} ({why})" for short, why in removed)
        self.log.info(NAME, f"removed {len(removed)} compile container(s): {said}")

    def _accept(self, listener: socket.socket, stop_signals: tuple[int, ...]) -> None:
        with SignalWakeup(stop_signals) as wakeup, selectors.DefaultSelector() as selector:
            selector.register(wakeup.fd, selectors.EVENT_READ, "signal")
            selector.register(listener, selectors.EVENT_READ, "accept")
            while True:
                for key, _ in selector.select():
                    if key.data == "signal":
                        if wakeup.drain():
                            return
                        continue
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    session = Session(self, conn)
                    threading.Thread(target=session.run, name="proxy-session", daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
