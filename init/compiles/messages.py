"""The messages between a thin client (the shim, `sharelatex-init compile`, the HTTP service)
and the broker, as typed values that write and read themselves: one ASCII JSON object a line
each way. The compile's output travels base64 inside the broker's own lines (`Chunk`), so what
a compile prints can never parse as an answer.

Standard library only and no import from `init`: the shim's client loads this under
`python3 -I -S` and nothing else. Its start is the shim's whole cost, so the client's half (the
requests' encoding, the answers' decoding) imports neither json nor dataclasses (with re, enum
and inspect behind them: ~30 ms a compile): the values are small frozen classes, a request is
written by `_json` and an answer's line is one flat object of numbers, null and base64 strings,
read by `decode_answer` field by field. The broker reads requests with json.

Client -> broker:  ShimRequest | CommandRequest, then at most one Stop (a stop signal came)
Broker -> client:  Chunk* (the compile's output, in order), then one Final
A client that closes its end (it was SIGKILLed) stops its compile.
"""

from __future__ import annotations

import binascii
import math

VERSION = 1
MAX_LINE = 1 << 20  # a request (its environment included) or an answer line; longer is refused


class MessageError(ValueError):
    """A line that is not one of these messages: the connection is not trusted further."""


# -- the wire: JSON written by hand (ASCII only: a newline inside a value is escaped) ----------

_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)} | {ord('"'): '\\"', ord("\\"): "\\\\"}


def _non_ascii(char: str) -> str:
    code = ord(char)
    if code < 0x80:
        return char
    if code < 0x10000:  # a lone surrogate (a name os.fsdecode made of bytes) too, as json does
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _json(value: object) -> str:
    """`value` (str, bool, int, float, None, list or dict of them) as ASCII JSON."""
    if isinstance(value, str):
        text = value.translate(_ESCAPES)
        if not text.isascii():
            text = "".join(map(_non_ascii, text))
        return f'"{text}"'
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value)
            if math.isfinite(value)
            else ("NaN" if value != value else "Infinity" if value > 0 else "-Infinity")
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(_json, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no JSON for {type(value).__name__}")


def _line(body: dict[str, object]) -> bytes:
    return (_json(body) + "\n").encode("ascii")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class _Value:
    """A frozen value: its fields are `__slots__`, set once by its __init__."""

    __slots__: tuple[str, ...] = ()

    def _set(self, **fields: object) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, f) == getattr(other, f) for f in self.__slots__
        )

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, f)) for f in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({fields})"


class ShimRequest(_Value):
    """A shimmed command (latexmk, an engine, synctex, texcount) as the compile service spawned
    it: its argv, its cwd, and the caller's environment (the broker passes on only what a
    compile may see: init.compiles.profile.PASSED_VARIABLES)."""

    __slots__ = ("argv", "cwd", "env")
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]

    def __init__(self, argv: tuple[str, ...], cwd: str, env: dict[str, str] | None = None):
        self._set(argv=tuple(argv), cwd=cwd, env=dict(env or {}))

    def encode(self) -> bytes:
        return _line(
            {"op": "shim", "version": VERSION, "argv": list(self.argv), "cwd": self.cwd,
             "env": self.env}
        )  # fmt: skip


class CommandRequest(_Value):
    """`sharelatex-init compile DIR` with its options (init.compiles.command)."""

    __slots__ = ("directory", "engine", "env", "image", "json", "main", "project", "timeout")
    directory: str
    main: str
    engine: str
    image: str | None
    timeout: float | None
    project: str | None
    json: bool
    env: dict[str, str]

    def __init__(
        self,
        directory: str,
        main: str = "main.tex",
        engine: str = "pdflatex",
        image: str | None = None,
        timeout: float | None = None,
        project: str | None = None,
        json: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self._set(directory=directory, main=main, engine=engine, image=image, timeout=timeout,
                  project=project, json=json, env=dict(env or {}))  # fmt: skip

    def encode(self) -> bytes:
        return _line(
            {"op": "compile", "version": VERSION, "directory": self.directory,
             "main": self.main, "engine": self.engine, "image": self.image,
             "timeout": self.timeout, "project": self.project, "json": self.json,
             "env": self.env}
        )  # fmt: skip


class Stop(_Value):
    """The client got `signal` (SIGTERM, SIGINT, SIGHUP): stop the compile, then answer."""

    __slots__ = ("signal",)
    signal: int

    def __init__(self, signal: int) -> None:
        self._set(signal=signal)

    def encode(self) -> bytes:
        return _line({"op": "stop", "signal": self.signal})


class Chunk(_Value):
    """A piece of the compile's output (its stdout and stderr, as the shim printed them)."""

    __slots__ = ("data",)
    data: bytes

    def __init__(self, data: bytes) -> None:
        self._set(data=data)

    def encode(self) -> bytes:
        return _line({"out": _b64(self.data)})


class Final(_Value):
    """What the client does at the end: print `stdout` and `stderr` as they are, then die of
    `signal` when it is set (a stop: Community Edition checks for SIGTERM), else exit
    `status`. Its texts travel base64 (UTF-8, undecodable bytes as surrogateescape made
    them), so its line is flat."""

    __slots__ = ("signal", "status", "stderr", "stdout")
    status: int
    stdout: str
    stderr: str
    signal: int | None

    def __init__(
        self, status: int, stdout: str = "", stderr: str = "", signal: int | None = None
    ) -> None:
        self._set(status=status, stdout=stdout, stderr=stderr, signal=signal)

    def encode(self) -> bytes:
        def text(value: str) -> str:
            return _b64(value.encode("utf-8", "surrogateescape"))

        return _line({"status": self.status, "stdout": text(self.stdout),
                      "stderr": text(self.stderr), "signal": self.signal})  # fmt: skip


Request = ShimRequest | CommandRequest
FromClient = ShimRequest | CommandRequest | Stop
FromBroker = Chunk | Final


# -- the broker's reading of a request (json: the broker has it anyway) --------------------


def _object(line: bytes) -> dict[str, object]:
    import json

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
    """A broker's line as its message; MessageError for anything else. The line is one flat
    object (Chunk.encode, Final.encode): read field by field, without json (the client's
    start)."""
    if not (line.startswith(b"{") and line.endswith(b"}")) or len(line) > MAX_LINE:
        raise MessageError(f"not an answer: {line[:80]!r}")
    fields: dict[str, bytes] = {}
    for item in line[1:-1].split(b","):
        key, colon, value = item.partition(b":")
        if not colon or len(key) < 3 or key[:1] != b'"' or key[-1:] != b'"':
            raise MessageError(f"not an answer: {line[:80]!r}")
        fields[key[1:-1].decode("ascii", "replace")] = value
    if set(fields) == {"out"}:
        return Chunk(_base64(fields["out"]))
    if set(fields) != {"status", "stdout", "stderr", "signal"}:
        raise MessageError(f"an answer with fields {sorted(fields)}")
    signal = None if fields["signal"] == b"null" else _number(fields["signal"], "signal")
    return Final(
        _number(fields["status"], "status"),
        _base64(fields["stdout"]).decode("utf-8", "surrogateescape"),
        _base64(fields["stderr"]).decode("utf-8", "surrogateescape"),
        signal,
    )


def _base64(value: bytes) -> bytes:
    if len(value) < 2 or value[:1] != b'"' or value[-1:] != b'"':
        raise MessageError(f"{value[:20]!r}: not a string")
    try:
        return binascii.a2b_base64(value[1:-1], strict_mode=True)
    except binascii.Error as e:
        raise MessageError("output that is not base64") from e


def _number(value: bytes, name: str) -> int:
    digits = value[1:] if value[:1] == b"-" else value
    if not digits.isdigit() or not digits.isascii() or len(digits) > 10:
        raise MessageError(f"{name}={value[:20]!r}, not an integer")
    return int(value)
