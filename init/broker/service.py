"""`python -m init.broker.service`: the compile broker, one long-lived child of PID 1 that owns
the compile path (issue 14).

It reads the compile settings once (init.compiles.settings, from its environment), owns the
engine client and the pool of warm containers, sweeps the broker's containers left by an
earlier run, and listens on a unix socket (config.COMPILE_BROKER_SOCKET, else beside the init's
status file; mode 0660, group the services' own) for its thin clients (init.compiles.client: the
shim, `sharelatex-init compile`, and through it the HTTP compile service). Each connection is
served by a thread of its own (init.broker.session); the main thread waits in one poll on the
socket, its signals and the next idle container's retirement: an idle broker never wakes up.
Near its open-files limit (less room than SESSION_FDS for each session and one more) it stops
taking connections until a session ends or ACCEPT_PAUSE has passed, one line when that begins
and one when it ends: they wait in the socket's backlog, where a session taken without the fds
to serve it would have been dropped.

SIGTERM or SIGINT: no new connection, every compile stopped (its client is told to try again),
every container retired, exit 0, within about a second.

Exit status: 0 stopped; 78 configuration (one line a problem); 69 the socket cannot be made.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import resource
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from init import config
from init.broker.execute import Broker, Stopper
from init.broker.pool import Pool, PoolLimits
from init.broker.readable import readable
from init.broker.session import Session, stop_all
from init.compiles.identity import compile_uids, read_uid_map
from init.compiles.profile import load_seccomp
from init.compiles.settings import KILL_GRACE, CompileSettings, broker_socket, settings_from_env
from init.config import UidRange
from init.core.wakeup import SignalWakeup
from init.engine.client import DockerBackend
from init.errors import EX_CONFIG, EX_UNAVAILABLE, ConfigError, EngineError

SOCKET_MODE = 0o660
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# At its stop, the broker gives its compiles this long to answer their cancel (the agent kills
# the group and tidies: tens of ms) before it retires every container regardless.
STOP_GRACE = 0.8
FD_CEILING = 1 << 20  # the most open fds the broker asks for (the kernel's usual nr_open)
# The most fds a session opens: its connection, its stop pipe, its caller's pidfd, and a
# compile's four (a warm container's stream and dir among them, which outlive it).
SESSION_FDS = 8
# At the open-files limit, the seconds between looks for room: the listener stays readable, so
# trying at once again would spin the loop and flood the log.
ACCEPT_PAUSE = 0.5
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def engine_backend(
    settings: CompileSettings, environ: Mapping[str, str] | None = None
) -> DockerBackend:
    """The engine the services' compiles run on (DOCKER_HOST), with the compiles' deadlines."""
    return DockerBackend(
        settings.engine_url, settings.limits.deadlines.engine_call, KILL_GRACE, environ
    )


def raise_fd_limit() -> int:
    """The soft limit on open fds raised to the hard one (at most FD_CEILING); the soft limit
    now. A site's warm containers hold two fds each in the broker, and an engine may start the
    site's container with a soft limit of 1024 (systemd's default, which Docker 25's unit files
    no longer raise): past it, accept() fails and no compile can start. Its waits use poll, so
    fds past 1023 are fine (init.broker.readable)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_CEILING)
    if wanted <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        return soft
    return wanted


def log(line: str) -> None:
    print(f"compile broker: {line}", file=sys.stderr, flush=True)


def services_gid(environ: Mapping[str, str]) -> int | None:
    """The group of the services' user (config.SERVICE_USER): the socket's group."""
    user = environ.get(config.SERVICE_USER) or config.DEFAULT_SERVICE_USER
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        return None


def listen(path: Path, gid: int | None) -> socket.socket:
    """The broker's socket at `path`, mode 0660 in group `gid`; an old socket there (a broker
    that was killed) is replaced, anything else there is refused (ConfigError)."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError([f"{path} exists and is not a socket; remove it (the broker's)"])
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o117)  # never a moment with wider rights than 0660
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, SOCKET_MODE)
    listener.listen(128)
    return listener


class Service:
    """The broker's life: the socket, the sessions, the retirement timer, the stop."""

    def __init__(self, broker: Broker, ids: UidRange, listener: socket.socket) -> None:
        self.broker = broker
        self.ids = ids
        self.listener = listener
        self.stoppers: set[Stopper] = set()
        self.threads: set[threading.Thread] = set()
        self._mutex = threading.Lock()
        # A session's end may bring the next retirement forward: it wakes the loop.
        self._changed_r, self._changed_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._full_since: float | None = None  # when it stopped taking connections for want of fds
        self._accept_at = 0.0  # time.monotonic() from which it looks for room again

    def _register(self, stopper: Stopper | None, held: list[Stopper]) -> None:
        with self._mutex:
            if stopper is not None:
                self.stoppers.add(stopper)
                held.append(stopper)
            else:
                for s in held:
                    self.stoppers.discard(s)
                self.threads.discard(threading.current_thread())
        if stopper is None:
            with contextlib.suppress(OSError):
                os.write(self._changed_w, b"x")

    def _serve(self, conn: socket.socket) -> None:
        held: list[Stopper] = []
        try:
            Session(self.broker, self.ids, conn, lambda s: self._register(s, held), log).serve()
        except Exception as e:  # a bug must not end the broker nor reach the client as a trace
            log(f"a connection failed: {type(e).__name__}: {e}")
            conn.close()

    def _room(self) -> bool:
        """Whether the connection waiting may be taken: its session has the fds it may need,
        every session under way its own too (counted as if none had opened any yet: a burst of
        connections is taken faster than their sessions open theirs). When not: one line, and
        no look again for ACCEPT_PAUSE or until a session ends."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        with self._mutex:
            sessions = len(self.threads)
        try:
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError as e:  # not even the fd to count them with
            self._full(f"{e.strerror}, {sessions} sessions, open files limit {limit}")
            return False
        if open_fds + SESSION_FDS * (sessions + 1) <= limit:
            return True
        self._full(f"{open_fds} fds open, {sessions} sessions, open files limit {limit}")
        return False

    def _full(self, why: str) -> None:
        now = time.monotonic()
        self._accept_at = now + ACCEPT_PAUSE
        if self._full_since is None:
            self._full_since = now
            log(f"at the open-files limit ({why}): new connections wait until compiles end")

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as e:
            if e.errno in OUT_OF_FDS:  # another process's share (ENFILE), or memory
                self._full(f"accept: {e.strerror}")
            else:
                log(f"accept: {e}")
            return
        if self._full_since is not None:
            log(f"taking connections again after {time.monotonic() - self._full_since:.1f} s")
            self._full_since = None
        thread = threading.Thread(target=self._serve, args=(conn,), name="broker-session")
        with self._mutex:
            self.threads.add(thread)
        thread.start()

    def run(self, wakeup: SignalWakeup) -> None:
        """Until SIGTERM or SIGINT."""
        pool = self.broker.pool
        listener = self.listener.fileno()
        while True:
            due = pool.next_retirement()
            now = time.monotonic()
            accepting = now >= self._accept_at
            again = None if accepting else self._accept_at
            wakes = [t for t in (due, again) if t is not None]
            timeout = max(0.0, min(wakes) - now) if wakes else None
            watched = [wakeup.fd, self._changed_r, *([listener] if accepting else [])]
            try:
                ready = readable(watched, timeout)
            except InterruptedError:
                continue
            if wakeup.fd in ready and any(s in STOP_SIGNALS for s in wakeup.drain()):
                return
            if self._changed_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._changed_r, 4096)
                self._accept_at = 0.0  # a session ended: its fds are free to take the next
            if listener in ready and self._room():
                self._accept()
            if due is not None and due <= time.monotonic():
                try:
                    pool.retire_idle()
                except EngineError as e:
                    log(f"retiring an idle container: {e}")

    def stop(self) -> None:
        """No new connection, every compile stopped, every container retired."""
        self.listener.close()
        with self._mutex:
            stop_all(self.stoppers)
            threads = list(self.threads)
        deadline = time.monotonic() + STOP_GRACE
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.broker.pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    environ = os.environ
    raise_fd_limit()
    try:
        settings = settings_from_env(environ)
        ids = compile_uids(environ, read_uid_map())
    except ConfigError as e:
        for problem in e.problems:
            log(problem)
        return EX_CONFIG
    path = broker_socket(environ)
    backend = engine_backend(settings, environ)
    limits = settings.limits
    pool = Pool(
        backend,
        PoolLimits(
            slots=limits.slots,
            idle=limits.idle,
            lifetime=limits.deadlines.lifetime,
            reuse=limits.deadlines.reuse,
        ),
        # Whose containers these are, for the sweep: on a host engine (sibling mode) other
        # sites' brokers share the engine, and the socket's path alone is every site's.
        owner=f"{socket.gethostname()}:{path}",
        log=log,
    )
    broker = Broker(settings, backend, pool, load_seccomp(lambda line: log(f"warning: {line}")))
    with SignalWakeup(STOP_SIGNALS) as wakeup:
        try:
            left = pool.sweep()
        except EngineError as e:
            log(f"no sweep at start, the engine does not answer yet: {e}")
        else:
            if left:
                log(f"removed {len(left)} container(s) of an earlier broker: {', '.join(left)}")
        try:
            listener = listen(path, services_gid(environ))
        except ConfigError as e:
            log(e.problems[0])
            return EX_CONFIG
        except OSError as e:
            log(f"cannot listen on {path}: {e.strerror}; check the dir and its rights")
            return EX_UNAVAILABLE
        log(f"listening on {path}")
        service = Service(broker, ids, listener)
        try:
            service.run(wakeup)
        finally:
            service.stop()
            with contextlib.suppress(OSError):
                path.unlink()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
