"""The broker's thin client: the shim on the services' PATH, and the transport of
`sharelatex-init compile`; the HTTP compile service (init.compiles.api, threads: no signals)
uses its connection, its line for a broker down and its reading of the answers.

  python3 -I -S -c '...client.main()' --socket PATH [--wait S] COMMAND ARGS...   (the shim)

It connects to the broker's socket (a broker restarting: it tries again for `--wait` seconds,
then exits 69 with one line naming the socket and the fix; never a compile outside the
sandbox), sends one request, copies the compile's output to its stdout as it comes, and ends
as the broker's Final says: its lines printed, then its exit status, or the signal it must die
of. SIGTERM, SIGINT and SIGHUP (the compile service stops a compile by SIGTERM to its process
group) are sent on as a Stop; the client dies of that signal once the broker has answered.
A client killed outright closes its connection: the broker stops its compile.

Standard library only, nothing read from the configuration: the shim's start is the whole
cost of a compile's client (init.compiles.messages is its one import from the package).
"""

from __future__ import annotations

import _socket as socket  # not `socket`, nor `signal`: their enums (and re) cost the shim ~10 ms
import errno
import os
import select
import sys
import time

from init.compiles.messages import (
    MAX_LINE,
    Chunk,
    CommandRequest,
    Final,
    FromBroker,
    MessageError,
    ShimRequest,
    Stop,
    decode_answer,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the shim's start
if TYPE_CHECKING:
    import signal  # the same functions and numbers, typed
    from collections.abc import Callable
else:
    import _signal as signal

EX_USAGE = 64
EX_UNAVAILABLE = 69
DEFAULT_WAIT = 10.0  # seconds a client waits for a broker that is (re)starting
RETRY_PAUSE = 0.1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class BrokerDown(Exception):
    """No broker answers at the socket (within the wait)."""


def die_of(signum: int) -> None:
    """End this process by `signum`, as if it had never been caught."""
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)


def connect(path: str, wait: float, wakeup: int) -> socket.socket:
    """A connection to the broker at `path`, tried again until `wait` seconds have passed
    (the socket missing, or nobody listening on it: a broker starting); BrokerDown then. A
    stop signal meanwhile (a byte on `wakeup`) ends the wait: the caller dies of it."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                raise BrokerDown(f"{e.strerror}") from e
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerDown("nothing listens there" if e.errno != errno.ENOENT
                                 else "the socket is not there") from e  # fmt: skip
            ready, _, _ = select.select([wakeup], [], [], min(RETRY_PAUSE, left))
            if ready:
                raise KeyboardInterrupt from e  # a stop signal: the caller dies of it


def down_line(path: str, why: BrokerDown, wait: float) -> str:
    """The one line for a broker that did not answer within `wait` (BrokerDown `why`)."""
    return (
        f"the compile broker does not answer at {path} ({why}, waited {wait:g} s): it runs "
        "with the site when sandboxed compiles are on; see `sharelatex-init status` and "
        "the site's log (the compile was not run)"
    )


class Answers:
    """The broker's lines, as they come off its connection, read as its messages: `feed` the
    bytes received, get the whole messages in them. MessageError for a line that is not one,
    or one longer than the messages allow (the connection is not trusted further)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[FromBroker]:
        self._buffer += data
        messages: list[FromBroker] = []
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            messages.append(decode_answer(line))
        if len(self._buffer) > 2 * MAX_LINE:
            raise MessageError("a line too long")
        return messages


def call(
    path: str,
    request: ShimRequest | CommandRequest,
    wait: float = DEFAULT_WAIT,
    out: int = 1,
    err: int = 2,
    who: str = "sharelatex-init",
    down: Callable[[str], int] | None = None,
) -> int:
    """Send `request` to the broker at `path`; the compile's output to fd `out` as it comes;
    the exit status (or death by the signal the Final names). No broker within `wait`: its
    one line to `down` (its status returned), else to fd `err` and 69."""
    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda s, f: None)  # taken as bytes on wakeup_r
    try:
        sock = connect(path, wait, wakeup_r)
    except BrokerDown as e:
        line = down_line(path, e, wait)
        if down is not None:
            return down(line)
        _write(err, f"{who}: {line}\n")
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        taken = os.read(wakeup_r, 64)
        die_of(taken[0] if taken else signal.SIGTERM)
        return EX_UNAVAILABLE
    try:
        sock.sendall(request.encode())
        return _follow(sock, wakeup_r, out, err, who)
    finally:
        sock.close()


def _follow(sock: socket.socket, wakeup: int, out: int, err: int, who: str) -> int:
    stopped: int | None = None
    answers = Answers()
    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wakeup], [], [])
        except InterruptedError:
            continue
        if wakeup in ready:
            taken = [s for s in os.read(wakeup, 64) if s in STOP_SIGNALS]
            if taken and stopped is None:
                stopped = taken[0]
                sock.sendall(Stop(stopped).encode())
        if sock.fileno() not in ready:
            continue
        data = sock.recv(1 << 16)
        if not data:
            _write(err, f"{who}: the compile broker ended during the compile; compile again\n")
            if stopped is not None:
                die_of(stopped)
            return EX_UNAVAILABLE
        try:
            messages = answers.feed(data)
        except MessageError as e:
            _write(err, f"{who}: the compile broker sent {e}\n")
            return EX_UNAVAILABLE
        for message in messages:
            if isinstance(message, Chunk):
                _write_bytes(out, message.data)
                continue
            return _end(message, stopped, out, err)


def _end(final: Final, stopped: int | None, out: int, err: int) -> int:
    _write(out, final.stdout)
    _write(err, final.stderr)
    signum = final.signal or stopped
    if signum is not None:
        die_of(signum)
    return final.status


def _write(fd: int, text: str) -> None:
    if text:
        _write_bytes(fd, text.encode(errors="surrogateescape"))


def _write_bytes(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # the caller stopped reading: the compile goes on, its status still counts


def main(argv: list[str] | None = None) -> int:
    """The shim: `--socket PATH [--wait S] COMMAND ARGS...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    path, wait = "", DEFAULT_WAIT
    while args[:1] in (["--socket"], ["--wait"]) and len(args) > 1:
        if args[0] == "--socket":
            path = args[1]
        else:
            try:
                wait = float(args[1])
            except ValueError:
                wait = -1
        args = args[2:]
    if not path or not args or wait < 0:
        _write(2, "usage: client --socket PATH [--wait SECONDS] COMMAND ARGS...\n")
        return EX_USAGE
    return call(path, ShimRequest(tuple(args), os.getcwd(), dict(os.environ)), wait,
                who="sharelatex-init shim")  # fmt: skip
