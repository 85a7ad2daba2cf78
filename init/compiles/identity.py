"""Who a compile runs as: a uid of its own per project, the compile dir's group, and the dir
shared with that uid through the group.

Why a uid per project, and not the services' (www-data): the kernel keeps some limits per uid
(inotify instances and watches, queued signals, pipe buffer pages, RLIMIT_NPROC), so a compile
run as www-data could take all 128 inotify instances of the site's own processes. Why not
dockerd's userns-remap: it maps every container to one subordinate range, so the remapped uid
could not write the compile dir CLSI made (www-data's, mode 755), and a sibling engine is the
host's, whose daemon settings are not ours to change. A uid of the project's own, given by the
engine (`User`), works the same in both engine modes and under runc or runsc.

The uid: `base + crc32(project id) % size` (config.COMPILE_UID_BASE, config.COMPILE_UID_RANGE;
by default 2,000,000,000 + 0..99,999,999: far above ordinary uids and the usual subordinate
range 100000-165535, and below 2^31, for the tools that keep a uid in a signed int). It is
stable (the same project has the same uid on every compile and every restart, so what it left
is its own), and needs no state. Two projects of the same uid (a crc32 collision: for one
project, a chance of one in 100 million per other project) share per-user kernel limits, never
files: each container binds only its own project's dir.

The group: the compile dir's, never root's (init.compiles.paths refuses a dir of group 0). The
compile has that gid and no other group at all (a numeric uid the image's /etc/passwd does not
know gets no supplementary groups), so everything it makes belongs to the dir's group and it
can give a file to no other group; it runs with umask 002. So that it can write where CLSI made
the dir (www-data's, mode 755, files 644), the runner, as the dir's owner, makes the owner's
dirs group-writable and setgid and its files group-writable before each compile
(`share_with_compile`: one stat per entry, a chmod only for what CLSI made since the last
compile). What the compile makes is handed back to the group inside the container, as the
project's uid, before and after each compile (init.compiles.profile): CLSI can then read,
replace and delete all of it, whatever modes the compile gave it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from init import config
from init.config import UidRange
from init.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from init.compiles.paths import CompileDir

UID_MAP = Path("/proc/self/uid_map")
# What a dir of the owner's needs for the compile (a member of its group) to make, replace and
# remove entries in it: group rwx, and setgid so that what CLSI makes in it later is of the
# dir's group too (CLSI's own primary group may be another).
DIR_SHARED = stat.S_ISGID | stat.S_IRWXG
FILE_SHARED = stat.S_IRGRP | stat.S_IWGRP


def compile_uids(environ: Mapping[str, str], uid_map: str | None = None) -> UidRange:
    """The compile uids (config.compile_uid_range); with `uid_map` (this process's
    /proc/self/uid_map), a range the user namespace we run in cannot hold is refused too: the
    engine that starts our compiles (an inner dockerd; or a host engine with userns-remap or
    rootless, whose containers we are one of) maps the same ids, and an unmapped uid would fail
    every compile as an engine error."""
    ids = config.compile_uid_range(environ)
    if uid_map is not None and not mapped(ids, uid_map):
        raise ConfigError(
            [
                f"compile uids {ids.describe()} ({config.COMPILE_UID_BASE}, "
                f"{config.COMPILE_UID_RANGE}) are not all in this container's user namespace "
                f"(uid_map: {' '.join(uid_map.split())}); set them inside it, e.g. "
                f"{config.COMPILE_UID_BASE}=40000 {config.COMPILE_UID_RANGE}=20000"
            ]
        )
    return ids


def read_uid_map(path: Path = UID_MAP) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None  # not Linux, or no /proc: nothing to check against


def mapped(ids: UidRange, uid_map: str) -> bool:
    """Whether every uid of `ids` is inside one of `uid_map`'s ranges (`inside outside count`
    lines; the kernel merges no adjacent lines, so they are joined here)."""
    spans = []
    for line in uid_map.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            spans.append((int(fields[0]), int(fields[0]) + int(fields[2])))
    start, end = ids.base, ids.base + ids.size
    for low, high in sorted(spans):
        if low <= start < high:
            start = high
        if start >= end:
            return True
    return False


# -- the compile dir shared with the project's uid --------------------------------------------


def shared_mode(mode: int) -> int | None:
    """The mode an entry of the dir's owner needs so that the compile, a member of its group,
    can write there; None when it has it (or is not to be touched: links, devices, and
    setuid/setgid files, which are never made group-writable)."""
    if stat.S_ISDIR(mode):
        wanted = mode | DIR_SHARED
    elif stat.S_ISREG(mode) and not mode & (stat.S_ISUID | stat.S_ISGID):
        wanted = mode | FILE_SHARED
    else:
        return None
    return stat.S_IMODE(wanted) if wanted != mode else None


@dataclass(frozen=True)
class Shared:
    """What `share_with_compile` changed."""

    dirs: int = 0
    files: int = 0


def share_with_compile(directory: CompileDir) -> Shared:
    """Make the dirs and files of the compile dir's owner (its own too) writable by their
    group, as `shared_mode` says; ConfigError when the dir itself needs it and this process
    cannot (it is neither the owner nor root), naming the fix.

    Every entry is reached through its parent's fd and opened with O_NOFOLLOW (os.fwalk, and
    O_PATH for files): a link a compile planted is never followed, whatever it points at."""
    top, owner = directory.path, directory.uid
    dirs = files = 0
    try:
        os.stat(top, follow_symlinks=False)  # os.fwalk raises for its top alone
    except OSError as e:
        raise ConfigError(
            [f"compile dir {top}: {e.strerror} (uid {os.geteuid()}); run as the dir's owner"]
        ) from e
    walk = os.fwalk(top, follow_symlinks=False)  # a dir below we cannot read is passed over
    for n, (_, _, names, dir_fd) in enumerate(walk):
        info = os.fstat(dir_fd)
        wanted = shared_mode(info.st_mode) if info.st_uid == owner else None
        if wanted is not None:
            try:
                os.fchmod(dir_fd, wanted)
                dirs += 1
            except PermissionError as e:
                if n == 0:  # the compile dir itself: nothing could be written
                    raise ConfigError([_cannot_share(directory, info)]) from e
        for name in names:
            files += _share_file(name, dir_fd, owner)
    return Shared(dirs, files)


def _share_file(name: str, dir_fd: int, owner: int) -> int:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0  # gone since the listing
    if info.st_uid != owner or shared_mode(info.st_mode) is None:
        return 0
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return 0
    try:
        now = os.fstat(fd)  # the entry itself, not whatever may have replaced it since
        wanted = shared_mode(now.st_mode) if now.st_uid == owner else None
        if wanted is None:
            return 0
        # chmod through /proc/self/fd: an O_PATH fd has no fchmod; it names this very file.
        os.chmod(f"/proc/self/fd/{fd}", wanted)
        return 1
    except OSError:
        return 0  # not ours to change (we are not its owner): the compile may not write it
    finally:
        os.close(fd)


def _cannot_share(directory: CompileDir, info: os.stat_result) -> str:
    top = directory.path
    return (
        f"compile dir {top} (owner {info.st_uid}:{info.st_gid}, mode "
        f"{stat.S_IMODE(info.st_mode):04o}) cannot be made writable by its group here (uid "
        f"{os.geteuid()}), so the compile (uid {directory.compile_uid}, group "
        f"{directory.gid}) could not write its output there; run the compile as the dir's "
        f"owner, or `chmod g+rwxs {top}`"
    )
