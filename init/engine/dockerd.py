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
# OVERLEAF_INIT_DOCKERD_ARGS. dockerd on TCP without verified TLS also sleeps ~16 s at start.
_REFUSED_FLAGS = ("-H", "--host", "--data-root", "--exec-root", "--pidfile", "-p", "-g", "--graph")
# No bridge unless the operator's arguments ask for one: compiles run with no network and the
# installer's builds on the host network where there is none (init.texlive.build), so docker0
# serves nothing. And it can cut the site off: dockerd keeps docker0's subnet in its data root
# (the engine volume) from the start that chose it, and takes it again even when the
# container's own network has it by then (seen: a site at 172.17.0.2 on a volume whose earlier
# start, with no network, chose 172.17.0.0/16: two routes to the site's own network, and the
# host's requests to it went unanswered).
NO_BRIDGE = "--bridge=none"
_BRIDGE_FLAGS = ("-b", "--bridge", "--bip", "--fixed-cidr", "--default-gateway")


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
    def containerd_dir(self) -> Path:
        """Where dockerd runs its containerd: its pidfile, config and sockets."""
        return self.exec_root / "containerd"

    @property
    def containerd_pidfile(self) -> Path:
        return self.containerd_dir / "containerd.pid"

    @property
    def containerd_socket(self) -> Path:
        """The longest of containerd's socket paths (the limit of a unix socket applies)."""
        return self.containerd_dir / "containerd.sock.ttrpc"

    @property
    def containerd_sockets(self) -> tuple[Path, ...]:
        d = self.containerd_dir
        return (d / "containerd.sock", d / "containerd.sock.ttrpc", d / "containerd-debug.sock")

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
    """dockerd's argv: our paths, the unix socket only, the storage choice, no bridge (unless
    OVERLEAF_INIT_DOCKERD_ARGS chooses one: see NO_BRIDGE)."""
    chosen = any(arg.split("=", 1)[0] in _BRIDGE_FLAGS for arg in layout.extra_args)
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
        *(() if chosen else (NO_BRIDGE,)),
        *layout.extra_args,
    )


def socket_group_args(layout: EngineLayout, service_user: str) -> tuple[str, ...]:
    """`--group GID`: the socket in the services' user's primary group (mode 0660), so the
    compile service (www-data) can run compile containers; dockerd's own default group,
    `docker`, does not exist in the ShareLaTeX image and leaves the socket root's only. Nothing
    when the operator chose a group in OVERLEAF_INIT_DOCKERD_ARGS or the user is unknown."""
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
    """Files an unclean stop (or the last boot, on the container's own layer) left behind that
    would stop the engine from starting again. Empty: nothing to clear."""

    pidfile: Path | None = None  # dockerd's
    socket: Path | None = None  # dockerd's API socket
    containerd_pidfile: Path | None = None
    containerd_sockets: tuple[Path, ...] = ()

    def paths(self) -> list[Path]:
        owned = (self.pidfile, self.socket, self.containerd_pidfile, *self.containerd_sockets)
        return [p for p in owned if p is not None]


def find_leftovers(layout: EngineLayout, proc: Path = Path("/proc")) -> Leftovers:
    """What to clear before dockerd starts: each pidfile no live process of this boot owns,
    each socket nobody listens on.

    A pidfile is kept only while it names a live (not zombie) process of the right name that
    started no earlier than the init itself (`proc/self`): a pid from the last boot can name an
    unrelated process in the new namespace (pid 21: a service). Else dockerd 20.10 refuses to
    start ("pid file found"), and for containerd's both 20.10 and 26 log "containerd is still
    running", wait 15 s for a socket that never comes and exit 1, over and over; 26 also sends
    SIGTERM to the process the pidfile names. containerd's sockets go only with its pidfile: a
    containerd of this boot that outlived dockerd (`kill -9` of dockerd) is taken up again.
    """
    boot_began = _start_time(proc / "self")
    stale_pidfile = _stale_pidfile(layout.pidfile, "dockerd", proc, boot_began)
    stale_socket = layout.socket if _is_dead_socket(layout.socket) else None
    stale_containerd = _stale_pidfile(layout.containerd_pidfile, "containerd", proc, boot_began)
    if stale_containerd is None and layout.containerd_pidfile.exists():
        return Leftovers(stale_pidfile, stale_socket)  # a containerd of this boot runs
    dead_sockets = tuple(p for p in layout.containerd_sockets if _is_dead_socket(p))
    return Leftovers(stale_pidfile, stale_socket, stale_containerd, dead_sockets)


def clear(leftovers: Leftovers) -> None:
    for path in leftovers.paths():
        path.unlink(missing_ok=True)


def _stale_pidfile(path: Path, comm: str, proc: Path, boot_began: int | None) -> Path | None:
    """`path` if it names no live `comm` of this boot; None when it does, or is not there."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return path  # unreadable: the engine cannot read it either
    return None if _is_ours(text, comm, proc, boot_began) else path


def _is_ours(pid_text: str, comm: str, proc: Path, boot_began: int | None) -> bool:
    """A live process `comm` with that pid, started since the init began (when known)."""
    if not pid_text.isdigit():
        return False
    base = proc / pid_text
    try:
        name = (base / "comm").read_text().strip()
    except OSError:
        return False
    fields = _stat_fields(base)
    if name != comm or fields is None or fields[0] in ("Z", "X"):
        return False
    started = _start_time(base)
    return boot_began is None or (started is not None and started >= boot_began)


def _stat_fields(base: Path) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces): state first."""
    try:
        text = (base / "stat").read_text()
    except OSError:
        return None
    if ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_time(base: Path) -> int | None:
    """When the process started, in clock ticks since the machine booted (stat field 22)."""
    fields = _stat_fields(base)
    if fields is None or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


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
