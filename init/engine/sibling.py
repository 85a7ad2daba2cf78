"""Sibling-containers mode: the host's socket, which container we are, the host dirs behind ours.

Compile containers are created by the *host* engine, so their bind sources must be host paths.
This module holds the judgement, as pure functions over what was read: the socket's stat and
who may use it, this container's id from `/proc/self/mountinfo` or `/proc/self/cgroup`, the host
path behind the compiles and output dirs from our own inspect data, and how that compares with
`SANDBOXED_COMPILES_HOST_DIR*`. Standard library only: PID 1 may import it. The engine is asked
by `init.engine.sibling_check`, a child process.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from init.checks import Check, Status
from init.config import DEFAULT_SERVICE_USER as DEFAULT_SERVICE_USER  # sibling.DEFAULT_...
from init.config import DOCKER_HOST, HOST_DIR, HOST_DIR_COMPILES, HOST_DIR_OUTPUT, PREFIXES
from init.engine import mountinfo
from init.errors import EngineError

DEFAULT_SOCKET = Path("/var/run/docker.sock")
SOCKET_VOLUME = "-v /var/run/docker.sock:/var/run/docker.sock"
# The ShareLaTeX image runs its services as www-data.
# Docker 20.10's API: the oldest engine the compile runner is written and tested against.
MIN_API_VERSION = "1.41"
# The product's own example of the data volume.
DATA_VOLUME_EXAMPLE = "/data/sharelatex_data"
DATA_ROOTS = (PurePosixPath("/var/lib/sharelatex"), PurePosixPath("/var/lib/overleaf"))
SECURITY_WARNING = (
    "the Docker socket {path} is root on the host: whoever can write to it controls the host; "
    "sharelatex-init uses it only to start compile containers and never passes it into one"
)

# Docker bind-mounts these three files from /var/lib/docker/containers/<id>/ into every
# container; other mounts may name other containers' dirs (a log shipper's, say).
_ID_MOUNTPOINTS = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
_MOUNTINFO_ID = re.compile(r"containers/([0-9a-f]{64})/")
# cgroupfs driver: /docker/<id>; systemd driver: /system.slice/docker-<id>.scope.
_CGROUP_ID = re.compile(r"(?:/docker/|/docker-)([0-9a-f]{64})(?:\.scope)?(?=/|$)")
_SHORT_ID = re.compile(r"^[0-9a-f]{12}$")


# -- the socket ------------------------------------------------------------------------------


def socket_path(environ: Mapping[str, str]) -> Path:
    """The host socket's path inside this container: DOCKER_HOST (unix:// only) or the default.

    EngineError for any other scheme: sibling mode needs the host's unix socket mounted.
    """
    value = environ.get(DOCKER_HOST, "").strip()
    if not value:
        return DEFAULT_SOCKET
    if value.startswith("unix://"):
        path = value[len("unix://") :]
        if path.startswith("/"):
            return Path(path)
    raise EngineError(
        f"DOCKER_HOST={value} is not a unix socket: sibling containers need the host's unix "
        "socket mounted, so that compile dirs are bind-mounted from this host",
        f"unset DOCKER_HOST and add `{SOCKET_VOLUME}` to docker run",
    )


@dataclass(frozen=True)
class SocketFacts:
    """What lstat says about the socket path; `kind` is socket, directory, missing or other."""

    path: Path
    kind: str
    uid: int = -1
    gid: int = -1
    mode: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "uid": self.uid,
            "gid": self.gid,
            "mode": f"{self.mode:04o}",
        }


def read_socket(path: Path) -> SocketFacts:
    """lstat of `path`, as a value."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return SocketFacts(path, "missing")
    if stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    else:
        kind = "other"
    return SocketFacts(path, kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))


def socket_check(facts: SocketFacts) -> Check:
    """Whether the path holds a socket at all; missing and directory each with their fix."""
    name = "docker socket"
    if facts.kind == "socket":
        return Check(name, Status.OK, f"{facts.path} is a socket")
    if facts.kind == "missing":
        return Check(
            name,
            Status.FAIL,
            f"no Docker socket at {facts.path}: sibling containers use the host's engine",
            f"add `{SOCKET_VOLUME}` to docker run (compose: "
            "`volumes: [/var/run/docker.sock:/var/run/docker.sock]`)",
        )
    if facts.kind == "directory":
        # `-v` makes the source as an empty directory when it is absent on the host.
        return Check(
            name,
            Status.FAIL,
            f"{facts.path} is a directory, not a socket: Docker created it because the host "
            "path did not exist when this container started (Docker not running on the host, "
            "or its socket elsewhere)",
            "on the host, remove that directory (`rmdir /var/run/docker.sock`), make sure "
            f"Docker runs, then recreate this container with `{SOCKET_VOLUME}`",
        )
    return Check(
        name,
        Status.FAIL,
        f"{facts.path} is not a socket (mode {facts.mode:04o}, a file of some other kind)",
        f"mount the host's socket there: `{SOCKET_VOLUME}`",
    )


def probe_socket(path: Path, timeout: float = 2.0) -> Check:
    """Whether something accepts a connection on `path`; if not, why, for an operator."""
    from init.engine.client import connect_error

    error = connect_error(path, timeout)
    if error is not None:
        return connect_check(path, error)
    return Check("engine", Status.OK, f"something accepts connections on {path}")


def connect_check(path: Path, error: int | None) -> Check:
    """The verdict on a failed connect(2) to the socket, by its errno."""
    name = "engine"
    if error == errno.ECONNREFUSED:
        return Check(
            name,
            Status.FAIL,
            f"nothing answers on {path} (connection refused): Docker is not running on the "
            "host, or it restarted and made a new socket after this container started (a bind "
            "mount keeps the old one)",
            "start Docker on the host, then restart this container",
        )
    if error in (errno.EACCES, errno.EPERM):
        return Check(
            name,
            Status.FAIL,
            f"permission denied on {path} although its mode allows it: a security module "
            "(SELinux, AppArmor) refuses it",
            "on SELinux hosts mount it as `-v /var/run/docker.sock:/var/run/docker.sock:z`, "
            "or allow this container to use it",
        )
    reason = os.strerror(error) if error else "no answer"
    return Check(
        name,
        Status.FAIL,
        f"cannot connect to {path} ({reason})",
        "check that Docker runs on the host and that this is its socket",
    )


@dataclass(frozen=True)
class ServiceUser:
    """The user the services run as, with every group it is in."""

    name: str
    uid: int
    gids: frozenset[int]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "uid": self.uid, "gids": sorted(self.gids)}


def service_user(name: str) -> ServiceUser | None:
    """`name` resolved through pwd and grp (primary and supplementary groups); None if unknown."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {entry.pw_gid}
    gids.update(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
    return ServiceUser(name, entry.pw_uid, frozenset(gids))


def can_use(facts: SocketFacts, user: ServiceUser) -> bool:
    """Whether `user` may connect: connect(2) on a unix socket needs write permission."""
    if user.uid == 0:
        return True
    if facts.uid == user.uid:
        return bool(facts.mode & stat.S_IWUSR)
    if facts.gid in user.gids:
        return bool(facts.mode & stat.S_IWGRP)
    return bool(facts.mode & stat.S_IWOTH)


GRANT_GROUP_NAME = "docker-host"  # the group the init makes for the socket's gid if none has it


@dataclass(frozen=True)
class GroupGrant:
    """Adding the services' user to the socket's group: the new /etc/group text, and why."""

    text: str
    description: str


def plan_group_grant(
    facts: SocketFacts, user: ServiceUser, container_gids: frozenset[int], group_text: str
) -> GroupGrant | None:
    """What makes the socket usable by `user` when the container was given the socket's group
    (`docker run --group-add GID`: PID 1 has it) but the user is not in it: runit's `setuser`
    and the like set a user's groups from /etc/group, so the gid of `--group-add` alone never
    reaches the services. None when there is nothing to do or nothing that would help."""
    if can_use(facts, user) or not facts.mode & stat.S_IWGRP or facts.gid not in container_gids:
        return None
    lines = group_text.splitlines()
    for index, line in enumerate(lines):
        fields = line.split(":")
        if len(fields) == 4 and fields[2] == str(facts.gid):
            members = [m for m in fields[3].split(",") if m]
            lines[index] = ":".join([*fields[:3], ",".join([*members, user.name])])
            return GroupGrant(
                "\n".join(lines) + "\n",
                f"added {user.name} to group {fields[0]} (gid {facts.gid}, the socket's group)",
            )
    names = {line.split(":")[0] for line in lines}
    name = GRANT_GROUP_NAME if GRANT_GROUP_NAME not in names else f"{GRANT_GROUP_NAME}-{facts.gid}"
    lines.append(f"{name}:x:{facts.gid}:{user.name}")
    return GroupGrant(
        "\n".join(lines) + "\n",
        f"made group {name} with gid {facts.gid} (the socket's group) and added {user.name}",
    )


def apply_group_grant(grant: GroupGrant, group_file: Path = Path("/etc/group")) -> None:
    """Replace the group file in one step, keeping its mode."""
    tmp = group_file.with_name(f".{group_file.name}.sharelatex-init")
    tmp.write_text(grant.text)
    tmp.chmod(group_file.stat().st_mode & 0o7777)
    os.replace(tmp, group_file)


def access_check(facts: SocketFacts, user: ServiceUser | None, user_name: str) -> Check:
    """Whether the services' user may use the socket; if not, exactly what would let it."""
    name = "socket access"
    if user is None:
        return Check(
            name,
            Status.WARN,
            f"no user {user_name!r} in this container: cannot tell whether the services may "
            f"use {facts.path}",
            "name the user the services run as",
        )
    who = f"{user.name} (uid {user.uid}, groups {','.join(map(str, sorted(user.gids)))})"
    owner = f"owner {facts.uid}:{facts.gid}, mode {facts.mode:04o}"
    if can_use(facts, user):
        return Check(name, Status.OK, f"{who} may use {facts.path} ({owner})")
    if facts.mode & stat.S_IWGRP:
        root_note = " (gid 0 is root's group on the host)" if facts.gid == 0 else ""
        return Check(
            name,
            Status.FAIL,
            f"{who} cannot use {facts.path} ({owner}): it is not in the socket's group "
            f"{facts.gid}{root_note}",
            f"add `--group-add {facts.gid}` to docker run (compose: `group_add: "
            f'["{facts.gid}"]`); the init then adds {user.name} to that group',
        )
    return Check(
        name,
        Status.FAIL,
        f"{who} cannot use {facts.path} ({owner}): only its owner may, and no group can be granted",
        "on the host, give the socket to a group and let it write (dockerd does this at each "
        "start with `--group docker`; or `chgrp docker /var/run/docker.sock && chmod 0660 "
        "/var/run/docker.sock`), then add `--group-add <that gid>` to docker run",
    )


def api_version_check(version: str, minimum: str = MIN_API_VERSION) -> Check:
    """The engine's API version against the oldest the compile runner supports."""
    name = "engine"
    try:
        have = _version_tuple(version)
    except ValueError:
        return Check(name, Status.WARN, f"the engine reports API version {version!r}, unparsed")
    if have < _version_tuple(minimum):
        return Check(
            name,
            Status.FAIL,
            f"the host's engine speaks API {version}, older than {minimum} (Docker 20.10), "
            "the oldest the compile runner supports",
            "upgrade Docker on the host to 20.10 or newer",
        )
    return Check(name, Status.OK, f"the host's engine speaks API {version} (>= {minimum})")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.strip().split("."))


# -- which container we are ------------------------------------------------------------------


def container_id_from_mountinfo(text: str) -> str | None:
    """The id in the source of the /etc/hostname, /etc/hosts or /etc/resolv.conf bind mount."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or _unescape(fields[4]) not in _ID_MOUNTPOINTS:
            continue
        found = _MOUNTINFO_ID.search(_unescape(fields[3]))
        if found:
            return found.group(1)
    return None


def container_id_from_cgroup(text: str) -> str | None:
    """The innermost docker id in a cgroup path (none under a private cgroup namespace)."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        found = _CGROUP_ID.findall(path)
        if found:
            return str(found[-1])
    return None


def find_container_id(root: Path = Path("/"), hostname: str = "") -> tuple[str, str] | None:
    """(id, where it was found): mountinfo, then cgroup, then a 12-hex hostname (a short id)."""
    readers: tuple[tuple[str, Callable[[str], str | None]], ...] = (
        ("proc/self/mountinfo", container_id_from_mountinfo),
        ("proc/self/cgroup", container_id_from_cgroup),
    )
    for name, parse in readers:
        try:
            text = (root / name).read_text()
        except OSError:
            continue
        found = parse(text)
        if found:
            return found, f"/{name}"
    if _SHORT_ID.match(hostname):
        return hostname, "the hostname"
    return None


_unescape = mountinfo.unescape


# -- the host dirs behind ours ---------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One entry of a container's inspect `Mounts`: bind, volume, tmpfs, ..."""

    type: str
    source: str  # the host path ('' for tmpfs)
    destination: PurePosixPath
    name: str = ""  # a volume's name

    def describe(self) -> str:
        if self.type == "volume":
            return f"volume {self.name} ({self.source}) on {self.destination}"
        if self.type == "bind":
            return f"-v {self.source}:{self.destination}"
        return f"{self.type} mount on {self.destination}"


def mounts_from_inspect(inspect: Mapping[str, Any]) -> tuple[Mount, ...]:
    """The Mounts of a container's inspect data, as values."""
    mounts = []
    for entry in inspect.get("Mounts") or ():
        destination = str(entry.get("Destination") or "")
        if not destination.startswith("/"):
            continue
        mounts.append(
            Mount(
                type=str(entry.get("Type") or ""),
                source=str(entry.get("Source") or ""),
                destination=PurePosixPath(destination),
                name=str(entry.get("Name") or ""),
            )
        )
    return tuple(mounts)


@dataclass(frozen=True)
class HostPath:
    """A dir of ours and what it is on the host; `host` is None when no host dir backs it."""

    container_dir: PurePosixPath
    mount: Mount | None
    host: PurePosixPath | None


def host_path(
    container_dir: PurePosixPath,
    mounts: Sequence[Mount],
    resolve: Callable[[str], str] = lambda p: p,
) -> HostPath:
    """The host path behind `container_dir`: the deepest mount of it or of a parent, plus the rest.

    `resolve` canonicalises paths as this container sees them (os.path.realpath in the child),
    so a data dir reached through a symlink (/var/lib/sharelatex -> /var/lib/overleaf) matches.
    """
    wanted = {container_dir, PurePosixPath(resolve(str(container_dir)))}
    best: tuple[int, Mount, PurePosixPath] | None = None
    for mount in mounts:
        for destination in {mount.destination, PurePosixPath(resolve(str(mount.destination)))}:
            for path in wanted:
                if path != destination and destination not in path.parents:
                    continue
                depth = len(destination.parts)
                if best is None or depth > best[0]:
                    best = (depth, mount, path.relative_to(destination))
    if best is None:
        return HostPath(container_dir, None, None)
    _, mount, rest = best
    if mount.type not in ("bind", "volume") or not mount.source.startswith("/"):
        return HostPath(container_dir, mount, None)
    return HostPath(container_dir, mount, PurePosixPath(mount.source) / rest)


def data_mount_fix(container_dir: PurePosixPath) -> str:
    """The `-v` that puts `container_dir` on a host dir: the data root it lives under, if any."""
    target = next((r for r in DATA_ROOTS if r in container_dir.parents), container_dir)
    return (
        f"add `-v {DATA_VOLUME_EXAMPLE}:{target}` to docker run (any host dir; the product's "
        "example), so the host engine can bind it into compile containers"
    )


@dataclass(frozen=True)
class HostDir:
    """One of our compile dirs, its variable, what was set, what inspection found, and the use."""

    kind: str  # "compiles" or "output"
    variable: str
    configured: PurePosixPath | None
    found: HostPath | None  # None: inspection was not possible
    use: PurePosixPath | None
    derived: bool

    @property
    def check_name(self) -> str:
        return f"host {self.kind} dir"


def resolve_host_dir(
    kind: str,
    variable: str,
    configured: PurePosixPath | None,
    found: HostPath | None,
    no_inspection: str = "",
) -> tuple[HostDir, Check]:
    """Compare what the operator set with what our mounts say; the path to use and the verdict.

    `found` is None when this container could not be inspected (`no_inspection` says why):
    then a set value is used unchecked (the proof checks it) and an unset one is a failure.
    """
    name = f"host {kind} dir"
    if found is None:
        if configured is not None:
            return HostDir(kind, variable, configured, None, configured, False), Check(
                name,
                Status.WARN,
                f"{variable}={configured} cannot be checked against this container's mounts "
                f"({no_inspection}); the marker proof checks it once a compile image is present",
            )
        return HostDir(kind, variable, None, None, None, False), Check(
            name,
            Status.FAIL,
            f"{variable} is unset and cannot be derived ({no_inspection})",
            f"`--env {variable}=<the host path of this container's {kind} dir>`, e.g. "
            f"{DATA_VOLUME_EXAMPLE}/data/{kind} with "
            f"`-v {DATA_VOLUME_EXAMPLE}:/var/lib/overleaf`",
        )
    container_dir = found.container_dir
    if found.host is None:
        where = (
            f"on a {found.mount.type} mount ({found.mount.describe()})"
            if found.mount is not None
            else "on this container's own layer (no mount covers it; its files go with the "
            "container)"
        )
        return HostDir(kind, variable, configured, found, None, False), Check(
            name,
            Status.FAIL,
            f"{container_dir} is {where}: the host engine cannot bind it into compile "
            "containers, which would see an empty directory",
            data_mount_fix(container_dir),
        )
    derived = found.host
    via = found.mount.describe() if found.mount is not None else ""
    if configured is None:
        return HostDir(kind, variable, None, found, derived, True), Check(
            name,
            Status.OK,
            f"{variable} unset: using {derived}, derived from this container's {container_dir} "
            f"({via})",
        )
    if configured == derived:
        return HostDir(kind, variable, configured, found, derived, False), Check(
            name, Status.OK, f"{variable}={configured} is this container's {container_dir} ({via})"
        )
    return HostDir(kind, variable, configured, found, derived, False), Check(
        name,
        Status.FAIL,
        f"{variable}={configured} is not this container's {container_dir}: that is {derived} on "
        f"the host ({via}); compile containers would see an empty directory",
        f"`--env {variable}={derived}` (or unset {variable}: the init derives it)",
    )


def configured_variable(environ: Mapping[str, str], kind: str) -> str:
    """The variable (with its OVERLEAF_/SHARELATEX_ prefix, if any) that sets the `kind` dir.

    The fix must name the variable that wins: for compiles the split `..._HOST_DIR_COMPILES`
    when set, else `..._HOST_DIR`.
    """
    names = (HOST_DIR_COMPILES, HOST_DIR) if kind == "compiles" else (HOST_DIR_OUTPUT,)
    for name in names:
        for prefix in PREFIXES:
            if environ.get(prefix + name):
                return prefix + name
    return HOST_DIR if kind == "compiles" else HOST_DIR_OUTPUT


# -- the verdict -----------------------------------------------------------------------------


def problems(checks: Sequence[Check]) -> list[str]:
    """Each failure as one operator line, its fix last."""
    return [_line(c) for c in checks if c.status is Status.FAIL]


def warnings(checks: Sequence[Check]) -> list[str]:
    return [_line(c) for c in checks if c.status is Status.WARN]


def _line(check: Check) -> str:
    text = f"{check.name}: {check.message}"
    return f"{text}; fix: {check.fix}" if check.fix else text
