"""The messages between the broker and a compile agent, as typed values, and their wire form:
one JSON object a line each way (ASCII only: a newline inside an argument is escaped, never a
line break). The compile's output travels base64 inside the agent's own lines, so what a
compile prints can never parse as an answer. Every line from the agent is checked here; one
that does not fit is a ProtocolError, and the container is not trusted again.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from init.errors import SandboxError

VERSION = 1
# The agent's lines carry at most 64 KiB of output (base64: ~87 KiB); anything much longer is
# not the agent speaking.
MAX_LINE = 1 << 20


class ProtocolError(SandboxError):
    """The agent's stream broke the protocol: the container is replaced, never reused."""


class Reason(enum.Enum):
    """How a compile ended, as the agent saw it."""

    EXIT = "exit"
    SIGNAL = "signal"
    TIMEOUT = "timeout"  # the agent killed its process group at the request's timeout
    CANCELLED = "cancelled"  # the broker asked (a stop signal to the client, the client gone)
    ERROR = "error"  # the request was refused or could not start (message says why)


@dataclass(frozen=True)
class Request:
    """One compile for the agent: argv run in `cwd` with `env` added to the container's, for at
    most `timeout` seconds; after it, and before it in a container that has not tidied yet, the
    agent's tidy (every process killed, /tmp emptied, what the compile made in the dir `tidy`
    names handed back to the dir's group; "": none; agent.pl says why once is enough)."""

    id: str
    argv: tuple[str, ...]
    cwd: str
    timeout: float
    env: Mapping[str, str] = field(default_factory=dict)
    tidy: str = ""

    def encode(self) -> bytes:
        body = {
            "id": self.id,
            "argv": list(self.argv),
            "cwd": self.cwd,
            "timeout": self.timeout,
            "env": dict(self.env),
            "tidy": self.tidy,
        }
        return (json.dumps(body, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


def cancel(request_id: str) -> bytes:
    """The line that stops the running compile `request_id`."""
    body = {"op": "cancel", "id": request_id}
    return (json.dumps(body, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


@dataclass(frozen=True)
class Ready:
    """The agent is up (its first line)."""

    version: int
    pid: int


@dataclass(frozen=True)
class Output:
    """A piece of the compile's stdout (fd 1) or stderr (fd 2), exactly as written."""

    id: str
    fd: int
    data: bytes


@dataclass(frozen=True)
class Answer:
    """How the compile `id` ended. `status` is the shell's number for it (128 + signal)."""

    id: str | None
    reason: Reason
    exit: int | None = None
    signal: int | None = None
    seconds: float = 0.0
    leftovers: int = 0  # processes still there after the compile's own exit, killed
    message: str = ""

    @property
    def status(self) -> int | None:
        if self.exit is not None:
            return self.exit
        return None if self.signal is None else 128 + self.signal


Message = Ready | Output | Answer


class Lines:
    """Bytes in, whole lines out; a line longer than MAX_LINE is a ProtocolError."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._partial += data
        *lines, rest = bytes(self._partial).split(b"\n")
        if len(rest) > self.limit or any(len(line) > self.limit for line in lines):
            raise ProtocolError(f"the agent sent a line longer than {self.limit} bytes")
        self._partial = bytearray(rest)
        return lines

    @property
    def pending(self) -> int:
        return len(self._partial)


def decode(line: bytes) -> Message:
    """One of the agent's lines as a message; ProtocolError for anything else."""
    try:
        body = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"the agent sent a line that is not JSON: {line[:80]!r}") from e
    if not isinstance(body, dict):
        raise ProtocolError(f"the agent sent {type(body).__name__}, not an object")
    if "agent" in body:
        return Ready(_int(body, "version"), _int(body, "pid"))
    if "data" in body:
        fd = _int(body, "fd")
        if fd not in (1, 2):
            raise ProtocolError(f"the agent sent output of fd {fd}")
        try:
            data = base64.b64decode(_str(body, "data"), validate=True)
        except binascii.Error as e:
            raise ProtocolError("the agent sent output that is not base64") from e
        return Output(_str(body, "id"), fd, data)
    try:
        reason = Reason(body.get("reason"))
    except ValueError as e:
        raise ProtocolError(f"the agent sent reason {body.get('reason')!r}") from e
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("the agent sent an answer whose id is not a string")
    return Answer(
        id=request_id,
        reason=reason,
        exit=_optional_int(body, "exit"),
        signal=_optional_int(body, "signal"),
        seconds=float(_number(body, "seconds", 0.0)),
        leftovers=_optional_int(body, "leftovers") or 0,
        message=str(body.get("message") or ""),
    )


def _str(body: dict[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"the agent sent {key}={value!r}, not a string")
    return value


def _int(body: dict[str, object], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"the agent sent {key}={value!r}, not an integer")
    return value


def _optional_int(body: dict[str, object], key: str) -> int | None:
    return None if body.get(key) is None else _int(body, key)


def _number(body: dict[str, object], key: str, default: float) -> float:
    value = body.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"the agent sent {key}={value!r}, not a number")
    return float(value)
