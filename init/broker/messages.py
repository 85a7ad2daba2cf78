"""The messages between a thin client (the shim, `sharelatex-init compile`, the HTTP service)
and the broker, as typed values that write and read themselves: one ASCII JSON object a line
each way. The compile's output travels base64 inside the broker's own lines (`Chunk`), so what
a compile prints can never parse as an answer.

Standard library only and no import from `init`: the shim's client loads this under
`python3 -I -S` and nothing else.

Client -> broker:  ShimRequest | CommandRequest, then at most one Stop (a stop signal came)
Broker -> client:  Chunk* (the compile's output, in order), then one Final
A client that closes its end (it was SIGKILLed) stops its compile.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

VERSION = 1
MAX_LINE = 1 << 20  # a request (its environment included) or an answer line; longer is refused


class MessageError(ValueError):
    """A line that is not one of these messages: the connection is not trusted further."""


def _line(body: dict[str, object]) -> bytes:
    return (json.dumps(body, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


@dataclass(frozen=True)
class ShimRequest:
    """A shimmed command (latexmk, an engine, synctex, texcount) as the compile service spawned
    it: its argv, its cwd, and the caller's environment (the broker passes on only what a
    compile may see: init.compiles.profile.PASSED_VARIABLES)."""

    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _line(
            {"op": "shim", "version": VERSION, "argv": list(self.argv), "cwd": self.cwd,
             "env": dict(self.env)}
        )  # fmt: skip


@dataclass(frozen=True)
class CommandRequest:
    """`sharelatex-init compile DIR` with its options (init.compiles.command)."""

    directory: str
    main: str = "main.tex"
    engine: str = "pdflatex"
    image: str | None = None
    timeout: float | None = None
    project: str | None = None
    json: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _line(
            {"op": "compile", "version": VERSION, "directory": self.directory,
             "main": self.main, "engine": self.engine, "image": self.image,
             "timeout": self.timeout, "project": self.project, "json": self.json,
             "env": dict(self.env)}
        )  # fmt: skip


@dataclass(frozen=True)
class Stop:
    """The client got `signal` (SIGTERM, SIGINT, SIGHUP): stop the compile, then answer."""

    signal: int

    def encode(self) -> bytes:
        return _line({"op": "stop", "signal": self.signal})


@dataclass(frozen=True)
class Chunk:
    """A piece of the compile's output (its stdout and stderr, as the shim printed them)."""

    data: bytes

    def encode(self) -> bytes:
        return _line({"out": base64.b64encode(self.data).decode("ascii")})


@dataclass(frozen=True)
class Final:
    """What the client does at the end: print `stdout` and `stderr` as they are, then die of
    `signal` when it is set (a stop: Community Edition checks for SIGTERM), else exit
    `status`."""

    status: int
    stdout: str = ""
    stderr: str = ""
    signal: int | None = None

    def encode(self) -> bytes:
        return _line(
            {"status": self.status, "stdout": self.stdout, "stderr": self.stderr,
             "signal": self.signal}
        )  # fmt: skip


Request = ShimRequest | CommandRequest
FromClient = ShimRequest | CommandRequest | Stop
FromBroker = Chunk | Final


def _object(line: bytes) -> dict[str, object]:
    try:
        body = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MessageError(f"not a JSON line: {line[:80]!r}") from e
    if not isinstance(body, dict):
        raise MessageError(f"{type(body).__name__}, not an object")
    return body


def _str(body: dict[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise MessageError(f"{key}={value!r}, not a string")
    return value


def _optional_str(body: dict[str, object], key: str) -> str | None:
    return None if body.get(key) is None else _str(body, key)


def _int(body: dict[str, object], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"{key}={value!r}, not an integer")
    return value


def _strings(body: dict[str, object], key: str) -> tuple[str, ...]:
    value = body.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MessageError(f"{key}: not a list of strings")
    return tuple(value)


def _env(body: dict[str, object]) -> dict[str, str]:
    value = body.get("env") or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise MessageError("env: not an object of strings")
    return dict(value)


def decode_request(line: bytes) -> FromClient:
    """A client's line as its message; MessageError for anything else."""
    body = _object(line)
    op = body.get("op")
    if op == "stop":
        return Stop(_int(body, "signal"))
    if body.get("version") != VERSION:
        raise MessageError(f"version {body.get('version')!r}; this broker speaks {VERSION}")
    if op == "shim":
        argv = _strings(body, "argv")
        if not argv:
            raise MessageError("argv: empty")
        return ShimRequest(argv, _str(body, "cwd"), _env(body))
    if op == "compile":
        timeout = body.get("timeout")
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool)
        ):
            raise MessageError(f"timeout={timeout!r}, not a number")
        flag = body.get("json")
        if not isinstance(flag, bool):
            raise MessageError(f"json={flag!r}, not true or false")
        return CommandRequest(
            _str(body, "directory"), _str(body, "main"), _str(body, "engine"),
            _optional_str(body, "image"), None if timeout is None else float(timeout),
            _optional_str(body, "project"), flag, _env(body),
        )  # fmt: skip
    raise MessageError(f"op {op!r}: not shim, compile or stop")


def decode_answer(line: bytes) -> FromBroker:
    """A broker's line as its message; MessageError for anything else."""
    body = _object(line)
    if "out" in body:
        try:
            return Chunk(base64.b64decode(_str(body, "out"), validate=True))
        except binascii.Error as e:
            raise MessageError("output that is not base64") from e
    signal = body.get("signal")
    return Final(
        _int(body, "status"),
        _str(body, "stdout"),
        _str(body, "stderr"),
        None if signal is None else _int(body, "signal"),
    )
