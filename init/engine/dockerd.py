"""The inner dockerd of docker-in-docker mode: its command line, its leftovers, its service spec.

PID 1 runs dockerd as one of its services (first to start, last to stop) and learns that it is
ready from a child process (`init.engine.ready`), since talking to the Docker API is a
library's job and no library runs inside PID 1.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from init.config import (
    DOCKER_DATA_ROOT,
    DOCKER_EXEC_ROOT,
    DOCKER_SOCKET,
    DOCKERD_ARGS,
    DOCKERD_BINARY,
    DOCKERD_READY_TIMEOUT,
)
from init.core.services import ServiceSpec
from init.errors import ConfigError

SERVICE_NAME = "dockerd"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL
# Flags that would open the engine to the network or move what we manage: refused in
# SHARELATEX_INIT_DOCKERD_ARGS. dockerd on TCP without verified TLS also sleeps ~16 s at start.
_REFUSED_FLAGS = ("-H", "--host", "--data-root", "--exec-root", "--pidfile", "-p", "-g", "--graph")


@dataclass(frozen=True)
class EngineLayout:
    """Where the inner engine keeps its state and listens."""

    data_root: Path = Path("/var/lib/docker")
    exec_root: Path = Path("/var/run/docker")
    socket: Path = Path("/var/run/docker.sock")
    binary: str = "dockerd"
    extra_args: tuple[str, ...] = ()
    ready_timeout: float = 60.0  # seconds for the API to answer after each start

    @property
    def pidfile(self) -> Path:
        return self.exec_root.with_name(self.exec_root.name + ".pid")

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock.ttrpc"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"


def layout_from_env(environ: Mapping[str, str]) -> EngineLayout:
    """The layout, with the paths the tests (and unusual images) move elsewhere."""
    problems: list[str] = []
    default = EngineLayout()

    def path(name: str, fallback: Path) -> Path:
        value = environ.get(name, "")
        if not value:
            return fallback
        if not value.startswith("/"):
            problems.append(f"{name}={value!r} is not an absolute path; give a full path")
        return Path(value)

    try:
        extra = tuple(shlex.split(environ.get(DOCKERD_ARGS, "")))
    except ValueError as e:
        problems.append(f"{DOCKERD_ARGS}: cannot split it ({e}); quote it as a shell would")
        extra = ()
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in _REFUSED_FLAGS:
            problems.append(
                f"{DOCKERD_ARGS}: {arg!r} is managed by sharelatex-init (unix socket only, "
                f"never TCP); remove it, or set {DOCKER_DATA_ROOT} / {DOCKER_EXEC_ROOT} / "
                f"{DOCKER_SOCKET}"
            )
    timeout_text = environ.get(DOCKERD_READY_TIMEOUT, "")
    try:
        ready_timeout = float(timeout_text) if timeout_text else default.ready_timeout
    except ValueError:
        ready_timeout = -1.0
    if ready_timeout <= 0:
        problems.append(
            f"{DOCKERD_READY_TIMEOUT}={timeout_text!r} is not a number of seconds; e.g. 60"
        )
        ready_timeout = default.ready_timeout
    layout = EngineLayout(
        data_root=path(DOCKER_DATA_ROOT, default.data_root),
        exec_root=path(DOCKER_EXEC_ROOT, default.exec_root),
        socket=path(DOCKER_SOCKET, default.socket),
        binary=environ.get(DOCKERD_BINARY) or default.binary,
        extra_args=extra,
        ready_timeout=ready_timeout,
    )
    for name, sock in (
        (DOCKER_SOCKET, layout.socket),
        (DOCKER_EXEC_ROOT, layout.containerd_socket),
    ):
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            # containerd, started by dockerd under the exec root, cannot listen on a longer
            # path and dockerd only retries its connection forever.
            problems.append(
                f"{name}: the socket {sock} is longer than {MAX_SOCKET_PATH} bytes, the limit "
                "of a unix socket path; choose a shorter directory"
            )
    if problems:
        raise ConfigError(problems)
    return layout


def command(layout: EngineLayout, storage_args: tuple[str, ...] = ()) -> tuple[str, ...]:
    """dockerd's argv: our paths, the unix socket only, and the storage choice."""
    return (
        layout.binary,
        "--data-root",
        str(layout.data_root),
        "--exec-root",
        str(layout.exec_root),
        "--pidfile",
        str(layout.pidfile),
        "--host",
        layout.docker_host,
        *storage_args,
        *layout.extra_args,
    )


def socket_group_args(layout: EngineLayout, service_user: str) -> tuple[str, ...]:
    """`--group GID`: the socket in the services' user's primary group (mode 0660), so the
    compile service (www-data) can run compile containers; dockerd's own default group,
    `docker`, does not exist in the ShareLaTeX image and leaves the socket root's only. Nothing
    when the operator chose a group in SHARELATEX_INIT_DOCKERD_ARGS or the user is unknown."""
    import pwd

    if any(a in ("-G", "--group") or a.startswith("--group=") for a in layout.extra_args):
        return ()
    try:
        return ("--group", str(pwd.getpwnam(service_user).pw_gid))
    except KeyError:
        return ()


def service_spec(layout: EngineLayout, storage_args: tuple[str, ...] = ()) -> ServiceSpec:
    return ServiceSpec(
        name=SERVICE_NAME,
        directory=Path("/"),
        argv=command(layout, storage_args),
        stop_signal=signal.SIGTERM,
    )


@dataclass(frozen=True)
class Leftovers:
    """Files an unclean stop left behind that would stop dockerd from starting again."""

    pidfile: Path | None = None
    socket: Path | None = None

    def paths(self) -> list[Path]:
        return [p for p in (self.pidfile, self.socket) if p is not None]


def find_leftovers(layout: EngineLayout, proc: Path = Path("/proc")) -> Leftovers:
    """The pidfile if no live dockerd has its pid; the socket if nothing accepts on it.

    After `kill -9`, dockerd 20.10 refuses to start while its pidfile names a process that
    still exists (a zombie counts), saying only "pid file found".
    """
    stale_pidfile: Path | None = None
    try:
        text = layout.pidfile.read_text().strip()
    except FileNotFoundError:
        text = None
    except OSError:
        text = ""
    if text is not None and not _is_live_dockerd(text, proc):
        stale_pidfile = layout.pidfile
    stale_socket = layout.socket if _is_dead_socket(layout.socket) else None
    return Leftovers(stale_pidfile, stale_socket)


def clear(leftovers: Leftovers) -> None:
    for path in leftovers.paths():
        path.unlink(missing_ok=True)


def _is_live_dockerd(pid_text: str, proc: Path) -> bool:
    if not pid_text.isdigit():
        return False
    base = proc / pid_text
    try:
        fields = (base / "stat").read_text()
        comm = (base / "comm").read_text().strip()
    except OSError:
        return False
    state = fields.rsplit(")", 1)[-1].split()[0] if ")" in fields else "?"
    return comm == "dockerd" and state not in ("Z", "X")


def _is_dead_socket(path: Path) -> bool:
    """True for a unix socket file nobody listens on (never for anything that is not one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    from init.engine.client import connect_error

    return connect_error(path, 0.5) == errno.ECONNREFUSED
