"""One client's connection to the broker, in a thread of its own: its request read and checked,
the compile run (init.broker.execute) as the shim or the compile command would have run it
(their own `answer`: the same outcome, log notes and messages), its output passed on as it
comes, and one Final at the end. While the compile runs, the client's end is watched: a Stop
(a signal to the client) or its end (the client was killed) stops the compile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from init.broker import execute
from init.broker.execute import SHUTDOWN, STOP, Broker, BrokerStopping, Stopper
from init.broker.readable import readable
from init.compiles import command, shim
from init.compiles.messages import (
    MAX_LINE,
    Chunk,
    CommandRequest,
    Final,
    MessageError,
    ShimRequest,
    Stop,
    decode_request,
)
from init.compiles.outcome import Ran
from init.compiles.profile import Job
from init.compiles.settings import CompileSettings
from init.config import UidRange
from init.errors import EX_TEMPFAIL, ConfigError

REQUEST_DEADLINE = 10.0  # seconds a client has to send its whole request once connected
STOPPING = "the compile broker is stopping (the site is stopping or restarting); compile again"


def peer(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end (SO_PEERCRED: the kernel's word, not
    the client's)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def parent_of(pid: int) -> int:
    """`pid`'s parent (0 when it is gone or cannot be read)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat_line.rpartition(")")[2].split()[1])


def watch_parent(pid: int) -> int | None:
    """A pidfd readable when the client's caller ends (what the shim's PR_SET_PDEATHSIG did:
    the compile service killed outright must not leave its compile running); None when there
    is none to watch (the caller is init, or the client is gone) or no fd to watch it with
    (the caller's end is not taken for it: the client's own end still stops the compile); -1
    when the caller has ended. The caller may end between the read of the parent and the
    open: the parent read again after it says so (then the fd is of another process, and is
    not used)."""
    parent = parent_of(pid)
    if parent <= 1:
        return None
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return -1
    except OSError:  # out of fds (the broker waits for room before it takes a connection)
        return None
    if parent_of(pid) != parent:
        os.close(fd)
        return -1
    return fd


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """The client's first line and whatever came after it; MessageError when none comes
    within REQUEST_DEADLINE or it is too long."""
    conn.settimeout(REQUEST_DEADLINE)
    data = b""
    try:
        while b"\n" not in data:
            got = conn.recv(1 << 16)
            if not got:
                raise MessageError("the client closed its end before its request")
            data += got
            if len(data) > MAX_LINE:
                raise MessageError(f"a request longer than {MAX_LINE} bytes")
    except TimeoutError as e:
        raise MessageError(f"no whole request within {REQUEST_DEADLINE:g} s") from e
    finally:
        conn.settimeout(None)
    line, _, rest = data.partition(b"\n")
    return line, rest


class Session:
    """A client's connection, from its request to its Final."""

    def __init__(
        self,
        broker: Broker,
        ids: UidRange,
        conn: socket.socket,
        register: Callable[[Stopper | None], None],
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.broker = broker
        self.ids = ids
        self.conn = conn
        self.stopper = Stopper()
        self._register = register
        self._log = log
        self._gone = False
        self._watcher: threading.Thread | None = None
        self.pid, self.peer = peer(conn)

    def serve(self) -> None:
        try:
            self._register(self.stopper)
            final = self._answer()
            self._send(final.encode())
        finally:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            if self._watcher is not None:
                # Its end before the fd's: a number closed under its select could be the
                # next client's by then.
                self._watcher.join()
            self.conn.close()
            self._register(None)
            self.stopper.close()

    def _answer(self) -> Final:
        try:
            line, rest = read_request(self.conn)
            request = decode_request(line)
        except (MessageError, OSError) as e:
            return Final(64, stderr=f"sharelatex-init broker: a bad request: {e}\n")
        if isinstance(request, Stop):
            return Final(64, stderr="sharelatex-init broker: a stop before any request\n")
        self._watch_client(rest)
        try:
            if isinstance(request, ShimRequest):
                return self._shim(request)
            return self._command(request)
        except BrokerStopping:
            return Final(EX_TEMPFAIL, stderr=f"sharelatex-init broker: {STOPPING}\n")

    # -- the client's end, while its compile runs ------------------------------------------

    def _watch_client(self, rest: bytes) -> None:
        """A thread that reads the client's end: a Stop, or its end, stops the compile."""

        caller = watch_parent(self.pid)
        if caller == -1:  # the caller ended already
            self.stopper.trip(STOP, signal.SIGTERM, "its caller had ended")

        def watch() -> None:
            try:
                read(caller if caller is not None and caller >= 0 else None)
            finally:
                if caller is not None and caller >= 0:
                    os.close(caller)

        def read(caller: int | None) -> None:
            data = rest
            while True:
                while b"\n" in data:
                    line, _, data = data.partition(b"\n")
                    try:
                        message = decode_request(line)
                    except MessageError:
                        message = None
                    if isinstance(message, Stop):
                        why = f"its client got signal {message.signal}"
                        self.stopper.trip(STOP, message.signal, why)
                if len(data) > MAX_LINE:
                    data = b""
                watched = [self.conn.fileno()] + ([caller] if caller is not None else [])
                try:
                    ready = readable(watched, None)
                except InterruptedError:
                    continue
                except OSError:
                    return  # the session closed the connection: its compile is over
                if caller in ready:
                    # As PR_SET_PDEATHSIG would:
                    self.stopper.trip(STOP, signal.SIGTERM, "its caller ended")
                    caller = None
                    continue
                try:
                    got = self.conn.recv(4096)
                except OSError:
                    got = b""
                if not got:
                    # The client is gone (SIGKILLed): nobody waits for this compile.
                    self._gone = True
                    self.stopper.trip(STOP, None, "its client is gone")
                    return
                data += got

        self._watcher = threading.Thread(target=watch, name="broker-client", daemon=True)
        self._watcher.start()

    def _send(self, data: bytes) -> None:
        if self._gone:
            return
        try:
            self.conn.sendall(data)
        except OSError:
            self._gone = True  # its watcher sees the end too, and stops the compile

    def _run(self, settings: CompileSettings, job: Job, stream: bool) -> Ran:
        owner = job.directory.uid
        if self.peer not in (0, owner):
            # The broker is root: a client compiles only what it could have written itself.
            raise ConfigError(
                [f"uid {self.peer} may not compile {job.directory.path} (owned by uid {owner}); "
                 "compile as the dir's owner (the services' user) or as root"]
            )  # fmt: skip

        def output(data: bytes) -> None:
            if stream:
                self._send(Chunk(data).encode())

        began = time.monotonic()
        ran = execute.run(self.broker, settings, job, output, self.stopper)
        stopped = self.stopper.tripped_at
        if self.stopper.reason == STOP and stopped is not None:
            # The operator's one line for a compile its caller gave up on (the compile
            # service stopped it, or was killed): when, and how soon it ended.
            self._log(
                f"{job.directory.path}: compile stopped ({self.stopper.why}) "
                f"{max(0.0, stopped - began):.1f} s in; "
                f"ended {time.monotonic() - stopped:.2f} s after the stop"
            )
        return ran

    # -- the two kinds of request ----------------------------------------------------------

    def _shim(self, request: ShimRequest) -> Final:
        err = io.StringIO()
        code, signum = shim.answer(
            request.argv, request.env, request.cwd, self.broker.settings, self.ids,
            lambda job: self._run(self.broker.settings, job, True),
            lambda line: print(line, file=err),
        )  # fmt: skip
        return Final(code, stderr=err.getvalue(), signal=signum)

    def _command(self, request: CommandRequest) -> Final:
        options = argparse.Namespace(
            directory=Path(request.directory), main=request.main, engine=request.engine,
            image=request.image, timeout=request.timeout, project=request.project,
            json=request.json,
        )  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        code, signum = command.answer(
            options, request.env, lambda: (self.broker.settings, self.ids),
            lambda settings, job: self._run(settings, job, False), out, err,
        )  # fmt: skip
        return Final(code, out.getvalue(), err.getvalue(), signum)


def stop_all(stoppers: set[Stopper]) -> None:
    """The broker is stopping: every compile stopped."""
    for stopper in list(stoppers):
        stopper.trip(SHUTDOWN)
