"""HTTP/1.1 framing on a socket, strict where a request could be read two ways.

A request the proxy cannot frame in exactly one way is refused (400) and its connection closed:
both Content-Length and Transfer-Encoding, repeated or malformed lengths, a transfer coding
other than `chunked`, folded or malformed header lines, bare line feeds. The request the engine
gets is never the caller's bytes: the proxy writes a head of its own (`request_head`) and the
body it read, framed by its length, so a second request hidden in the first (or after it, in
the same write) is read as a request of its own, and judged.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from init.proxy.decision import Refused

MAX_HEAD = 64 << 10
MAX_HEADERS = 100
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CHUNK_SIZE = re.compile(rb"^([0-9a-fA-F]{1,8})(;[^\r\n]*)?$")
# The target is bounded by MAX_HEAD alone: dockerode repeats a create's options in the query,
# seccomp profile included (Overleaf's clsi-profile.json, minified and percent-encoded: ~20 KB;
# ours ~11 KB), as Go's server allows (1 MiB for the whole head).
_REQUEST_LINE = re.compile(rb"^([A-Z]{1,10}) (\S+) HTTP/1\.([01])$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.([01]) ([0-9]{3})(?: .*)?$")


class Closed(Exception):
    """The peer closed the connection (or it broke) where a message was expected."""


class Reader:
    """A socket with a read buffer: lines, heads, exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionError, TimeoutError, OSError):
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def head(self) -> bytes | None:
        """The bytes up to the blank line ending a head (without it); None when the peer
        closed before sending anything. Closed mid-head; Refused past MAX_HEAD."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
                # Also a whole head that came in one read: the bound is the head's, not a read's.
                raise Refused(f"the request head is larger than {MAX_HEAD} bytes", 431)
            if end >= 0:
                data = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                return data
            if not self.fill():
                if self.buffer.strip():
                    raise Closed("the peer closed the connection mid-head")
                return None

    def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                data = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return data
            if len(self.buffer) > MAX_HEAD:
                raise Refused("a line too long in a chunked body", 400)
            if not self.fill():
                raise Closed("the peer closed the connection mid-line")

    def exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise Closed("the peer closed the connection mid-body")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def take(self) -> bytes:
        """Whatever is buffered (bytes read past a message: a hijacked stream's start)."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


@dataclass(frozen=True)
class Head:
    """A request's or response's first line and headers (names in lower case)."""

    first: tuple[str, ...]  # (method, target, minor) or (minor, status)
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",")}


def _headers(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADERS:
        raise Refused(f"more than {MAX_HEADERS} headers", 431)
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name) or b"\r" in value or b"\n" in value:
            raise Refused("a malformed header line", 400)
        headers.append((name.decode().lower(), value.strip(b" \t").decode("latin-1")))
    return tuple(headers)


def parse_request(raw: bytes) -> Head:
    """Refused (400) unless `raw` is a request line and headers, CRLF-separated."""
    lines = raw.split(b"\r\n")
    match = _REQUEST_LINE.match(lines[0])
    if match is None or b"\n" in raw.replace(b"\r\n", b""):
        raise Refused("a malformed request line or a bare line feed", 400)
    method, target, minor = (g.decode("latin-1") for g in match.groups())
    return Head((method, target, minor), _headers(lines[1:]))


def parse_response(raw: bytes) -> Head:
    lines = raw.split(b"\r\n")
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        raise Closed("the engine's answer is not HTTP/1.x")
    return Head((match.group(1).decode(), match.group(2).decode()), _headers(lines[1:]))


@dataclass(frozen=True)
class Framing:
    """How a message's body is delimited: by `length`, `chunked`, or not at all."""

    kind: str  # length, chunked, none (a request: no body; a response: until close)
    length: int = 0


def request_framing(head: Head) -> Framing:
    lengths = head.values("content-length")
    codings = head.values("transfer-encoding")
    if lengths and codings:
        raise Refused("both Content-Length and Transfer-Encoding (a smuggling attempt?)", 400)
    if codings:
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            raise Refused("a transfer coding other than chunked", 400)
        return Framing("chunked")
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 15:
            raise Refused("a malformed or repeated Content-Length", 400)
        return Framing("length", int(lengths[0]))
    return Framing("none")


def response_framing(head: Head, method: str) -> Framing:
    status = int(head.first[1])
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return Framing("length", 0)
    if "chunked" in head.tokens("transfer-encoding"):
        return Framing("chunked")
    length = head.get("content-length")
    if length is not None and length.isdigit():
        return Framing("length", int(length))
    return Framing("none")


def read_body(reader: Reader, framing: Framing, limit: int) -> bytes:
    """A request's whole body (chunked decoded); Refused (413) past `limit` bytes."""
    if framing.kind == "length":
        if framing.length > limit:
            raise Refused(f"the body is larger than {limit} bytes", 413)
        return reader.exact(framing.length)
    if framing.kind == "none":
        return b""
    parts: list[bytes] = []
    size_so_far = 0
    while True:
        match = _CHUNK_SIZE.match(reader.line())
        if match is None:
            raise Refused("a malformed chunk size", 400)
        size = int(match.group(1), 16)
        if size == 0:
            while reader.line():  # trailers: read, never passed on
                pass
            return b"".join(parts)
        size_so_far += size
        if size_so_far > limit:
            raise Refused(f"the body is larger than {limit} bytes", 413)
        parts.append(reader.exact(size))
        if reader.exact(2) != b"\r\n":
            raise Refused("a chunk not followed by CRLF", 400)


def relay_body(reader: Reader, out: socket.socket, framing: Framing) -> None:
    """Copy a response body of `framing` from `reader` to `out` as it comes (a follow of the
    logs, a wait, are long): the engine's own bytes, framing included."""
    if framing.kind == "length":
        left = framing.length
        while left > 0:
            if not reader.buffer and not reader.fill():
                raise Closed("the engine closed mid-answer")
            piece = bytes(reader.buffer[:left])
            del reader.buffer[: len(piece)]
            out.sendall(piece)
            left -= len(piece)
        return
    if framing.kind == "chunked":
        while True:
            line = reader.line()
            match = _CHUNK_SIZE.match(line)
            if match is None:
                raise Closed("the engine sent a malformed chunk")
            size = int(match.group(1), 16)
            out.sendall(line + b"\r\n")
            if size == 0:
                while True:
                    trailer = reader.line()
                    out.sendall(trailer + b"\r\n")
                    if not trailer:
                        return
            relay_body(reader, out, Framing("length", size + 2))
    # none: until the engine closes
    while True:
        if reader.buffer:
            out.sendall(reader.take())
        if not reader.fill():
            return


def request_head(
    method: str, target: str, body: bytes | None, upgrade: bool, agent: str | None
) -> bytes:
    """The head the engine gets: built here, nothing of the caller's but the user agent."""
    lines = [f"{method} {target} HTTP/1.1", "Host: docker"]
    if agent and agent.isprintable() and len(agent) < 200:
        lines.append(f"User-Agent: {agent}")
    if upgrade:
        lines += ["Connection: Upgrade", "Upgrade: tcp"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    elif method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(
    status: int, reason: str, body: bytes, close: bool, kind: str = "application/json"
) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {kind}", f"Content-Length: {len(body)}"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def response_head(head: Head, length: int | None) -> bytes:
    """The engine's head as it was, or with a new Content-Length for a body rewritten here."""
    lines = [f"HTTP/1.{head.first[0]} {head.first[1]} {_reason(int(head.first[1]))}"]
    for name, value in head.headers:
        if length is not None and name in ("content-length", "transfer-encoding"):
            continue
        lines.append(f"{_title(name)}: {value}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _title(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:] for p in name.split("-"))


_REASONS = {
    101: "UPGRADED", 200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
    413: "Payload Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway",
}  # fmt: skip


def _reason(status: int) -> str:
    return _REASONS.get(status, "Status")
