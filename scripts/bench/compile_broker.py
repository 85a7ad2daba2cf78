"""The compile broker for a bench: every compile goes through it (init/broker), so a bench that
runs `compile` or the shim starts one before its first compile and stops it after its last.

Shared by the compile benches in this directory (imported from the script's own dir). The
broker gets exactly the environment the bench's compiles get: its settings (engine, limits,
runtime, compiles dir) are read from its own environment once, and its clients find it by the
socket variable in theirs (`with_socket` puts it in one dict for both). It is stopped by pid at
the end of the block, also on an error, ^C or SIGTERM: SIGTERM (it stops its compiles and
retires its containers), SIGKILL if it has not exited after STOP_WAIT seconds.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from init.config import COMPILE_BROKER_SOCKET  # noqa: E402  (the repo's own spelling)

SERVICE = ("-m", "init.broker.service")
START_WAIT = 60.0  # seconds until its socket answers
STOP_WAIT = 30.0  # seconds after SIGTERM before SIGKILL


@dataclass(frozen=True)
class Broker:
    """A broker this process started: its process (pid), its socket and its log."""

    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def with_socket(env: Mapping[str, str], path: Path) -> dict[str, str]:
    """`env` with the broker's socket at `path`: the broker's and its clients' environment."""
    return {**env, COMPILE_BROKER_SOCKET: str(path)}


def socket_of(env: Mapping[str, str]) -> Path:
    given = env.get(COMPILE_BROKER_SOCKET, "")
    if not given:
        raise ValueError(f"bench: the compiles' environment names no {COMPILE_BROKER_SOCKET}")
    return Path(given)


def _listening(log: Path, since: int) -> bool:
    """The broker's log says it listens (it says so once its socket accepts: no probe
    connection, which it would answer as a bad request)."""
    with log.open("rb") as f:
        f.seek(since)
        return b"listening on " in f.read()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def start(
    env: Mapping[str, str],
    python: str,
    argv: Sequence[str] = SERVICE,
    cwd: Path | None = None,
) -> Broker:
    """`PYTHON ARGV` (the broker service) with `env`, once it listens on its socket (the one
    `env` names); SystemExit with its log's tail when it does not."""
    path = socket_of(env)
    log = path.with_suffix(".log")
    with log.open("ab") as stderr:
        since = stderr.tell()
        process = subprocess.Popen(
            [python, *argv], env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    broker = Broker(process, path, log)
    try:
        deadline = time.monotonic() + START_WAIT
        while not _listening(log, since):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: the compile broker did not start ({log}):\n{_tail(log)}")
            time.sleep(0.05)
    except BaseException:
        stop(broker)
        raise
    return broker


def stop(broker: Broker) -> None:
    """SIGTERM to the broker's pid, SIGKILL if it is still there STOP_WAIT s later; reaped."""
    process = broker.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the blocks: every broker stopped by its pid


@contextlib.contextmanager
def running(
    env: Mapping[str, str],
    python: str,
    argv: Sequence[str] = SERVICE,
    cwd: Path | None = None,
) -> Iterator[Broker]:
    """A broker for the block (see `start`), stopped by pid at its end, whatever ends it. A
    SIGTERM to the bench meanwhile ends the bench as an error does (its cleanups run)."""
    previous = None
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        broker = start(env, python, argv, cwd)
        try:
            yield broker
        finally:
            stop(broker)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
