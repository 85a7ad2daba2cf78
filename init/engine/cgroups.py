"""The cgroup tree the inner dockerd needs: every v1 hierarchy mounted once, or v2 delegated.

Plan, then apply: `plan(root)` reads /proc/self/mountinfo, /proc/cgroups and /sys/fs/cgroup and
returns the actions as values; `apply(plan)` performs them with mount(2). Every mount and link
is checked first: wrapdocker's blind `mount` and `ln -s` printed "cgroup already mounted or cpu
busy" and "failed to create symbolic link '/sys/fs/cgroup/systemd/name=systemd'" on a second run
or under a runtime that had mounted the tree already.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from init.engine import mountinfo
from init.errors import EngineError

CGROUP_ROOT = Path("/sys/fs/cgroup")
INIT_CHILD = "init"  # where the root cgroup's processes go on v2 (moby's hack/dind uses it too)
# moby's hack/dind retries without end; a process racing in (docker exec) between the move and the
# write is rare, but a loop without end in PID 1 is worse than a clear error.
DELEGATE_ATTEMPTS = 10
SYSTEMD_OPTIONS = ("none", "name=systemd")
PRIVILEGED_FIX = "run the container with `--privileged`: docker-in-docker mounts and writes cgroups"
# mount(2) flags, as docker and systemd mount cgroup filesystems: no setuid, devices or programs.
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MOUNT_FLAGS = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC


class Version(Enum):
    V1 = "cgroup v1"
    HYBRID = "cgroup v1 hybrid (v1 hierarchies beside a cgroup2 mount)"
    V2 = "cgroup v2"


# -- what is read ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One visible line of /proc/self/mountinfo at or under /sys/fs/cgroup."""

    point: Path
    fs_type: str
    read_only: bool
    super_options: tuple[str, ...]


@dataclass(frozen=True)
class Controller:
    """One line of /proc/cgroups; hierarchy 0 means bound to no v1 hierarchy (so to v2)."""

    name: str
    hierarchy: int
    enabled: bool


class EntryKind(Enum):
    DIRECTORY = "directory"
    LINK = "link"
    OTHER = "file"


@dataclass(frozen=True)
class Entry:
    """A name directly under /sys/fs/cgroup (v1 only): a directory, a link and its text, other."""

    name: str
    kind: EntryKind
    link: str = ""


@dataclass(frozen=True)
class Unified:
    """The cgroup2 root at /sys/fs/cgroup: its controllers, what it delegates, its processes."""

    controllers: tuple[str, ...]
    subtree_control: tuple[str, ...]
    procs: tuple[int, ...]
    namespace_root: bool  # False for the host's own root cgroup, which has no cgroup.type


@dataclass(frozen=True)
class Layout:
    """Everything a plan is computed from."""

    mounts: tuple[Mount, ...]
    controllers: tuple[Controller, ...]
    entries: tuple[Entry, ...] = ()
    unified: Unified | None = None


# -- what is done ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountTmpfs:
    target: Path


@dataclass(frozen=True)
class MountHierarchy:
    options: tuple[str, ...]  # the hierarchy's controllers, or ("none", "name=systemd")
    target: Path


@dataclass(frozen=True)
class Symlink:
    name: Path
    target: str  # relative to the link's directory, as systemd and runc write them


@dataclass(frozen=True)
class MountUnified:
    target: Path


@dataclass(frozen=True)
class MoveProcs:
    cgroup: Path
    child: str


@dataclass(frozen=True)
class EnableControllers:
    cgroup: Path
    controllers: tuple[str, ...]


Action = MountTmpfs | MountHierarchy | Symlink | MountUnified | MoveProcs | EnableControllers
MountCall = Callable[[str, Path, str, str], None]  # source, target, fs type, options
WriteCall = Callable[[Path, bytes], None]


@dataclass(frozen=True)
class Plan:
    """The actions that make the tree right, in order; or the problem that stops them."""

    version: Version
    actions: tuple[Action, ...] = ()
    problem: EngineError | None = None

    @property
    def empty(self) -> bool:
        """Nothing to do and nothing wrong."""
        return not self.actions and self.problem is None


@dataclass(frozen=True)
class _Hierarchy:
    """A v1 hierarchy as it should appear: one mount, and a path (mount or link) for each name."""

    options: tuple[str, ...]
    directory: str
    names: tuple[str, ...]

    def is_mounted_by(self, mount: Mount, known: frozenset[str]) -> bool:
        if mount.fs_type != "cgroup":
            return False
        controllers = {option for option in mount.super_options if option in known}
        if self.options == SYSTEMD_OPTIONS:
            return not controllers and "name=systemd" in mount.super_options
        return controllers == set(self.options)


# -- reading -----------------------------------------------------------------------------------


def read_layout(root: Path = Path("/")) -> Layout:
    """The cgroup mounts, controllers and /sys/fs/cgroup entries as seen under root."""
    mountinfo = root / "proc/self/mountinfo"
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError as e:
        raise EngineError(f"cannot read {mountinfo}: {e.strerror}", "mount /proc") from e
    mounts = _visible_cgroup_mounts(lines)
    controllers = _read_controllers(root / "proc/cgroups")
    if _base_type(mounts) == "cgroup2":
        return Layout(mounts, controllers, unified=_read_unified(root / _inside(CGROUP_ROOT)))
    return Layout(mounts, controllers, entries=_read_entries(root / _inside(CGROUP_ROOT)))


def _visible_cgroup_mounts(lines: Iterable[str]) -> tuple[Mount, ...]:
    # mountinfo lists mounts in the order they were made and keeps the ones a later mount hides
    # (a tmpfs mounted over /sys/fs/cgroup hides the hierarchies below it): a later mount at or
    # above a point drops the earlier ones there.
    visible: dict[Path, Mount] = {}
    for line in lines:
        mount = _parse_mountinfo_line(line)
        if mount is None:
            continue
        visible = {p: m for p, m in visible.items() if not p.is_relative_to(mount.point)}
        visible[mount.point] = mount
    return tuple(m for p, m in visible.items() if p.is_relative_to(CGROUP_ROOT))


def _parse_mountinfo_line(line: str) -> Mount | None:
    found = mountinfo.parse_line(line)
    if found is None:
        return None
    return Mount(Path(found.point), found.fs_type, found.read_only, found.super_options)


def _read_controllers(path: Path) -> tuple[Controller, ...]:
    # Absent on kernels built without cgroup v1: then there is no v1 hierarchy to mount.
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise EngineError(f"cannot read {path}: {e.strerror}", "mount /proc") from e
    controllers = []
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) < 4 or not fields[1].isdigit():
            continue
        controllers.append(Controller(fields[0], int(fields[1]), fields[3] == "1"))
    return tuple(controllers)


def _read_entries(directory: Path) -> tuple[Entry, ...]:
    try:
        children = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return ()  # no /sys/fs/cgroup yet: a tmpfs will be mounted there
    entries = []
    for child in children:
        if child.is_symlink():
            entries.append(Entry(child.name, EntryKind.LINK, os.readlink(child.path)))
        elif child.is_dir():
            entries.append(Entry(child.name, EntryKind.DIRECTORY))
        else:
            entries.append(Entry(child.name, EntryKind.OTHER))
    return tuple(entries)


def _read_unified(directory: Path) -> Unified:
    try:
        return Unified(
            controllers=tuple((directory / "cgroup.controllers").read_text().split()),
            subtree_control=tuple((directory / "cgroup.subtree_control").read_text().split()),
            procs=_read_pids(directory / "cgroup.procs"),
            namespace_root=(directory / "cgroup.type").exists(),
        )
    except OSError as e:
        raise EngineError(f"cannot read the cgroup2 root {directory}: {e}", PRIVILEGED_FIX) from e


def _read_pids(path: Path) -> tuple[int, ...]:
    return tuple(int(word) for word in path.read_text().split())


# -- planning ----------------------------------------------------------------------------------


def plan(source: Layout | Path = Path("/")) -> Plan:
    """What to do to the cgroup tree, from a Layout or from the files under a root path."""
    return _plan_layout(source if isinstance(source, Layout) else read_layout(source))


def _plan_layout(layout: Layout) -> Plan:
    version = _version(layout)
    problem = _read_only_problem(layout)
    if problem is not None:
        return Plan(version, problem=problem)
    if version is Version.V2:
        return Plan(version, _plan_v2(layout))
    if _base_type(layout.mounts) == "cgroup":
        return Plan(version, problem=_in_the_way(f"{CGROUP_ROOT} is itself a cgroup v1 hierarchy"))
    actions, in_the_way = _plan_v1(layout)
    if in_the_way:
        return Plan(version, problem=_in_the_way("; ".join(in_the_way)))
    return Plan(version, tuple(actions))


def _base_type(mounts: tuple[Mount, ...]) -> str | None:
    """The fs type mounted at /sys/fs/cgroup itself; None when nothing is."""
    return next((m.fs_type for m in mounts if m.point == CGROUP_ROOT), None)


def _version(layout: Layout) -> Version:
    base = _base_type(layout.mounts)
    if base == "cgroup2":
        return Version.V2
    has_v1 = any(c.enabled and c.hierarchy > 0 for c in layout.controllers) or any(
        m.fs_type == "cgroup" for m in layout.mounts
    )
    if not has_v1 and base is None:
        return Version.V2  # no v1 hierarchy exists at all: the kernel's own default, unmounted
    return Version.HYBRID if any(m.fs_type == "cgroup2" for m in layout.mounts) else Version.V1


def _read_only_problem(layout: Layout) -> EngineError | None:
    # A container without --privileged gets /sys/fs/cgroup read-only: the inner dockerd could
    # not create a cgroup for any container, and every mount or link here would fail.
    read_only = sorted(
        str(m.point)
        for m in layout.mounts
        if m.read_only and (m.point == CGROUP_ROOT or m.fs_type in ("cgroup", "cgroup2"))
    )
    if not read_only:
        return None
    more = f" and {len(read_only) - 1} more cgroup mounts" if len(read_only) > 1 else ""
    return EngineError(f"{read_only[0]}{more} mounted read-only", PRIVILEGED_FIX)


def _in_the_way(what: str) -> EngineError:
    return EngineError(
        f"cannot set up the cgroup tree: {what}",
        f"run the container with `--privileged` and leave {CGROUP_ROOT} to the container runtime",
    )


def _plan_v1(layout: Layout) -> tuple[list[Action], list[str]]:
    """The mounts and links that give every enabled hierarchy its paths; what is in the way."""
    actions: list[Action] = []
    in_the_way: list[str] = []
    # Nothing mounted at or under /sys/fs/cgroup: on sysfs no directory can be made there, so a
    # tmpfs goes first, and whatever the plain directory held is hidden by it.
    fresh = not layout.mounts
    if fresh:
        actions.append(MountTmpfs(CGROUP_ROOT))
    children = (
        {} if fresh else {m.point.name: m for m in layout.mounts if m.point.parent == CGROUP_ROOT}
    )
    entries = {} if fresh else {e.name: e for e in layout.entries}
    known = frozenset(c.name for c in layout.controllers)
    for hierarchy in _hierarchies(layout.controllers):
        more, blocked = _plan_hierarchy(hierarchy, children, entries, known)
        actions += more
        in_the_way += blocked
    return actions, in_the_way


def _hierarchies(controllers: tuple[Controller, ...]) -> list[_Hierarchy]:
    # Controllers sharing a hierarchy id are co-mounted (cpu,cpuacct; net_cls,net_prio): mounting
    # one alone fails with "already mounted or cpu busy", so each hierarchy is mounted whole, at
    # the name systemd gives it (controllers in /proc/cgroups order), with a link per controller.
    # Hierarchy 0 is no v1 hierarchy: those controllers sit on the unified one, and mounting them
    # as v1 would take them from it (or fail with EBUSY when in use there).
    groups: dict[int, list[str]] = {}
    for controller in controllers:
        if controller.enabled and controller.hierarchy > 0:
            groups.setdefault(controller.hierarchy, []).append(controller.name)
    hierarchies = []
    for _, names in sorted(groups.items()):
        directory = ",".join(names)
        aliases = (*names, directory) if len(names) > 1 else (directory,)
        hierarchies.append(_Hierarchy(tuple(names), directory, aliases))
    hierarchies.append(_Hierarchy(SYSTEMD_OPTIONS, "systemd", ("systemd",)))
    return hierarchies


def _plan_hierarchy(
    hierarchy: _Hierarchy,
    children: dict[str, Mount],
    entries: dict[str, Entry],
    known: frozenset[str],
) -> tuple[list[Action], list[str]]:
    actions: list[Action] = []
    in_the_way: list[str] = []
    mounted = sorted(name for name, m in children.items() if hierarchy.is_mounted_by(m, known))
    if mounted:
        main = hierarchy.directory if hierarchy.directory in mounted else mounted[0]
        reaching = {CGROUP_ROOT / name for name in mounted}
    else:
        main = hierarchy.directory
        reaching = {CGROUP_ROOT / main}
        entry = entries.get(main)
        if entry is not None and entry.kind is not EntryKind.DIRECTORY:
            in_the_way.append(f"{CGROUP_ROOT / main} is a {entry.kind.value} in the way")
        else:
            actions.append(MountHierarchy(hierarchy.options, CGROUP_ROOT / main))
    for name in hierarchy.names:
        path = CGROUP_ROOT / name
        entry = entries.get(name)
        if path in reaching:
            continue
        if entry is None:
            actions.append(Symlink(path, main))
        elif entry.kind is EntryKind.LINK:
            # A link that already reaches the hierarchy is left alone; a stale one is replaced.
            if _link_destination(entry.link) not in reaching:
                actions.append(Symlink(path, main))
        elif entry.kind is EntryKind.DIRECTORY:
            # A directory where the link would go: `ln -s` would put the link inside it (the
            # "failed to create symbolic link" trap), so the hierarchy is mounted on it instead.
            actions.append(MountHierarchy(hierarchy.options, path))
        else:
            in_the_way.append(f"{path} is a file in the way")
    return actions, in_the_way


def _link_destination(link: str) -> Path:
    return Path(os.path.normpath(CGROUP_ROOT / link))


def _plan_v2(layout: Layout) -> tuple[Action, ...]:
    unified = layout.unified
    if unified is None:
        return (MountUnified(CGROUP_ROOT),)
    missing = tuple(c for c in unified.controllers if c not in unified.subtree_control)
    if not missing:
        return ()
    # A cgroup with processes cannot delegate controllers to its children (EBUSY): they move to
    # a child first. The host's own root cgroup is exempt, and its kernel threads cannot move.
    if unified.procs and unified.namespace_root:
        return (MoveProcs(CGROUP_ROOT, INIT_CHILD), EnableControllers(CGROUP_ROOT, missing))
    return (EnableControllers(CGROUP_ROOT, missing),)


# -- telling -----------------------------------------------------------------------------------


def describe(plan: Plan) -> list[str]:
    """One line per action for the operator; one line for the problem or for nothing to do."""
    if plan.problem is not None:
        return [f"{plan.version.value}: {plan.problem}"]
    if not plan.actions:
        return [f"{plan.version.value}: already set up, nothing to do"]
    return [_describe_action(action) for action in plan.actions]


def _describe_action(action: Action) -> str:
    match action:
        case MountTmpfs(target):
            return f"mounting a tmpfs at {target} (nothing mounted there)"
        case MountHierarchy(options, target):
            return f"mounting the cgroup hierarchy {','.join(options)} at {target}"
        case Symlink(name, target):
            return f"linking {name} -> {target}"
        case MountUnified(target):
            return f"mounting cgroup2 at {target} (nothing mounted there), then delegating"
        case MoveProcs(cgroup, child):
            return f"moving the processes of {cgroup} into {cgroup / child} to delegate controllers"
        case EnableControllers(cgroup, controllers):
            enabling = " ".join(controllers) or "no controller"
            return f"enabling {enabling} in {cgroup / 'cgroup.subtree_control'}"


# -- applying ----------------------------------------------------------------------------------


def mount_fs(source: str, target: Path, fs_type: str, options: str) -> None:
    """mount(2) through libc: no mount(8) child for PID 1 to wait for."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    data = options.encode() if options else None
    if libc.mount(source.encode(), os.fsencode(target), fs_type.encode(), _MOUNT_FLAGS, data):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def write_file(path: Path, data: bytes) -> None:
    """One write(2) to an existing file: a cgroup interface file takes each write as one request."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def apply(
    plan: Plan,
    root: Path = Path("/"),
    *,
    mount: MountCall = mount_fs,
    write: WriteCall = write_file,
) -> None:
    """Perform the plan's actions in order; its problem, or any failure, as an EngineError."""
    if plan.problem is not None:
        raise plan.problem
    evacuate: MoveProcs | None = None
    for action in plan.actions:
        match action:
            case MountTmpfs(target):
                _mount(mount, "tmpfs", root, target, "tmpfs", "mode=755")
            case MountHierarchy(options, target):
                _mount(mount, "cgroup", root, target, "cgroup", ",".join(options))
            case Symlink(name, target):
                _link(root / _inside(name), target)
            case MountUnified(target):
                _mount(mount, "cgroup2", root, target, "cgroup2", "")
                # What to delegate can only be read once it is mounted.
                then = _plan_layout(read_layout(root))
                if action in then.actions:
                    raise EngineError(f"cgroup2 mounted at {target} does not show", PRIVILEGED_FIX)
                apply(then, root, mount=mount, write=write)
            case MoveProcs():
                evacuate = action
                _move_procs(root, action, write)
            case EnableControllers():
                _enable_controllers(root, action, evacuate, write)


def _inside(path: Path) -> Path:
    return path.relative_to("/")


def _mount(
    mount: MountCall, source: str, root: Path, target: Path, fs_type: str, opts: str
) -> None:
    where = root / _inside(target)
    try:
        where.mkdir(parents=True, exist_ok=True)
        mount(source, where, fs_type, opts)
    except OSError as e:
        what = f"{fs_type} ({opts})" if opts else fs_type
        raise EngineError(f"cannot mount {what} at {target}: {e.strerror}", _fix(e)) from e


def _link(path: Path, target: str) -> None:
    try:
        if path.is_symlink():
            # A stale link is replaced by a rename, so the name never goes missing meanwhile.
            fresh = path.with_name(f".{path.name}.new")
            fresh.unlink(missing_ok=True)
            os.symlink(target, fresh)
            os.replace(fresh, path)
        else:
            os.symlink(target, path)
    except OSError as e:
        raise EngineError(f"cannot link {path} -> {target}: {e.strerror}", _fix(e)) from e


def _move_procs(root: Path, action: MoveProcs, write: WriteCall) -> None:
    cgroup = root / _inside(action.cgroup)
    destination = cgroup / action.child / "cgroup.procs"
    try:
        (cgroup / action.child).mkdir(exist_ok=True)
        pids = _read_pids(cgroup / "cgroup.procs")
    except OSError as e:
        raise EngineError(f"cannot move the processes of {action.cgroup}: {e}", _fix(e)) from e
    for pid in pids:
        try:
            write(destination, f"{pid}\n".encode())  # one pid a write, as cgroup.procs wants
        except ProcessLookupError:
            pass  # ended since the list was read
        except OSError as e:
            raise EngineError(f"cannot move process {pid}: {e.strerror}", _fix(e)) from e


def _enable_controllers(
    root: Path, action: EnableControllers, evacuate: MoveProcs | None, write: WriteCall
) -> None:
    if not action.controllers:
        return
    control = root / _inside(action.cgroup) / "cgroup.subtree_control"
    words = " ".join(f"+{c}" for c in action.controllers)
    for _ in range(DELEGATE_ATTEMPTS):
        try:
            write(control, words.encode())
            return
        except OSError as e:
            if e.errno != errno.EBUSY or evacuate is None:
                message = f"cannot write {words!r} to {action.cgroup / 'cgroup.subtree_control'}"
                raise EngineError(f"{message}: {e.strerror}", _fix(e)) from e
        # EBUSY: a process joined the root cgroup after the move (a docker exec): move it too.
        _move_procs(root, evacuate, write)
    raise EngineError(
        f"cannot enable controllers in {action.cgroup}: processes kept joining it "
        f"({DELEGATE_ATTEMPTS} attempts to move them out)",
        "start the container again; keep `docker exec` out of it while it boots",
    )


def _fix(error: OSError) -> str:
    if error.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return PRIVILEGED_FIX
    return f"run the container with `--privileged` and leave {CGROUP_ROOT} to the container runtime"
