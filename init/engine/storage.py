"""The inner engine's storage: what its data root sits on, and which driver dockerd may use.

`plan` reads statfs of the data root and returns a frozen `StoragePlan`; `dockerd_args` and
`check` turn it into dockerd's flags and the operator's line. The known trap: the data root on
the container's own layered filesystem (auFS on kernel 3.16 then, overlay-on-overlay now),
where the inner engine breaks or silently falls back to `vfs`.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from init.checks import Check, Status
from init.config import STORAGE_DRIVER, STORAGE_DRIVERS
from init.errors import ConfigError, EngineError

NAME = "storage"
DEFAULT_DATA_ROOT = Path("/var/lib/docker")
HOST_DIR_EXAMPLE = "/var/sharelatex/docker-images"

# statfs(2) f_type magic numbers, from linux/magic.h.
FS_TYPES = {
    0xEF53: "ext4",  # ext2 and ext3 share ext4's magic
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
    0xCA451A4E: "bcachefs",
    0x52654973: "reiserfs",
    0x794C7630: "overlay",
    0x61756673: "aufs",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x01021997: "9p",
    0x00C36400: "ceph",
    0x65735546: "fuse",
    0xF15F: "ecryptfs",
    0x73717368: "squashfs",
    0x4D44: "vfat",
    0x2011BAB0: "exfat",
}
# The container's own root: layers on layers, where overlay2 cannot work.
LAYERED = frozenset({"overlay", "aufs"})
# Network and FUSE filesystems: overlay2 cannot use them for its upper layers.
NO_OVERLAY_UPPER = frozenset({"nfs", "cifs", "smb2", "9p", "ceph", "fuse", "ecryptfs"})
# A driver that is only a filesystem's own snapshots needs that filesystem under it.
NATIVE_DRIVERS = {"btrfs": "btrfs", "zfs": "zfs"}

Statfs = Callable[[Path], tuple[int, int, int]]  # path -> (f_type, f_bavail, f_frsize)


def volume_fix(data_root: Path = DEFAULT_DATA_ROOT) -> str:
    """The fix for a data root overlay2 cannot use: a host directory mounted over it."""
    return (
        f"-v {HOST_DIR_EXAMPLE}:{data_root} "
        "(the host path is a placeholder: choose any directory on a local ext4 or xfs disk)"
    )


VOLUME_FIX = volume_fix()


@dataclass(frozen=True)
class StoragePlan:
    data_root: Path
    fs_type: str  # the name of the filesystem under the data root (or its nearest parent)
    driver: str | None  # what to force on dockerd; None: dockerd's own choice
    free_bytes: int
    refused: str = ""  # why the inner dockerd must not start; "" when it may
    fix: str = ""
    warnings: tuple[str, ...] = ()


class _StatfsBuffer(ctypes.Structure):
    # glibc's struct statfs64 (the same as struct statfs on 64-bit machines).
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


def libc_statfs(path: Path) -> tuple[int, int, int]:
    """(f_type, f_bavail, f_frsize) of the filesystem holding path, from statfs(2).

    os.statvfs has no f_type, and f_type is the one field that tells overlay from ext4.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "statfs64", None) or libc.statfs
    buffer = _StatfsBuffer()
    if call(os.fsencode(path), ctypes.byref(buffer)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(path))
    # f_type is a signed long: on 32-bit machines magics above 2**31 come back negative.
    return buffer.f_type & 0xFFFFFFFF, buffer.f_bavail, buffer.f_frsize


def plan(
    data_root: Path = DEFAULT_DATA_ROOT,
    opt_in_driver: str | None = None,
    need_bytes: int = 0,
    statfs: Statfs = libc_statfs,
) -> StoragePlan:
    """The storage choice for the inner dockerd whose data root is data_root.

    opt_in_driver is SANDBOXED_COMPILES_STORAGE_DRIVER (ConfigError when not allowed);
    need_bytes what the configured TeX Live images take, to warn when they will not fit.
    """
    opt_in = (opt_in_driver or "").strip() or None
    if opt_in is not None and opt_in not in STORAGE_DRIVERS:
        raise ConfigError(
            [
                f"{STORAGE_DRIVER}={opt_in_driver!r} is not a storage driver sharelatex-init "
                f"allows; use one of {', '.join(STORAGE_DRIVERS)} "
                "(or unset it to let dockerd choose)"
            ]
        )
    measured = _nearest_existing(data_root)
    try:
        f_type, f_bavail, f_frsize = statfs(measured)
    except OSError as e:
        raise EngineError(
            f"storage: cannot statfs {measured}: {e.strerror}",
            f"make {data_root} (or its parent) a readable directory",
        ) from e
    fs_type = FS_TYPES.get(f_type, f"an unknown filesystem (0x{f_type:08x})")
    free = f_bavail * f_frsize
    refusal = _refusal(data_root, fs_type, opt_in)
    if refusal is not None:
        reason, fix = refusal
        return StoragePlan(data_root, fs_type, None, free, refused=reason, fix=fix)
    warnings = _warnings(data_root, fs_type, opt_in, free, need_bytes)
    return StoragePlan(data_root, fs_type, opt_in, free, warnings=warnings)


def _refusal(data_root: Path, fs_type: str, opt_in: str | None) -> tuple[str, str] | None:
    """(why, fix) when the inner dockerd must not start on this filesystem; None when it may."""
    if fs_type in LAYERED and opt_in != "vfs":
        return (
            f"{data_root} is on {fs_type}, the container's own layered filesystem: the inner "
            "dockerd cannot use overlay2 there and would silently fall back to vfs (every "
            f"layer a full copy); only {STORAGE_DRIVER}=vfs is accepted on it",
            volume_fix(data_root),
        )
    if opt_in in NATIVE_DRIVERS and fs_type != NATIVE_DRIVERS[opt_in]:
        return (
            f"{STORAGE_DRIVER}={opt_in} needs {data_root} on {NATIVE_DRIVERS[opt_in]}, "
            f"but it is on {fs_type}",
            f"unset {STORAGE_DRIVER} to let dockerd choose, or mount a {opt_in} "
            f"filesystem at {data_root}",
        )
    return None


def _warnings(
    data_root: Path, fs_type: str, opt_in: str | None, free: int, need_bytes: int
) -> tuple[str, ...]:
    warnings: list[str] = []
    if opt_in == "vfs":
        warnings.append(
            "vfs copies every image layer in full: the TeX Live images take several times "
            "their size on disk"
        )
    elif opt_in is None and fs_type in NO_OVERLAY_UPPER:
        warnings.append(
            f"overlay2 cannot work on {fs_type}: dockerd will likely fall back to vfs and "
            f"compiles stay off; mount a local disk there: {volume_fix(data_root)}"
        )
    if fs_type in ("tmpfs", "ramfs"):
        warnings.append(
            f"{data_root} is in memory ({fs_type}): images take RAM and are lost when the "
            "container stops, so TeX Live installs again on every start"
        )
    if free < need_bytes:
        warnings.append(
            f"only {_gigabytes(free)} free under {data_root}; the TeX Live images need about "
            f"{_gigabytes(need_bytes)}: free some space or mount a larger disk there"
        )
    return tuple(warnings)


# What one TeX Live image takes unpacked, as a rough guide for the free-space warning: Debian's
# latex-base set built here is ~0.6 GB; TeX Live's full scheme (`texlive-full`, the images
# named *full*) is ~6 GB. Doubled on the way in (the pulled layers and the unpacked ones).
SMALL_IMAGE_BYTES = 2 * 10**9
FULL_IMAGE_BYTES = 12 * 10**9


@dataclass(frozen=True)
class Claim:
    """The data root claimed for this engine alone (`claim`)."""

    fd: int | None  # held for PID 1's life; None: the data root is not there, or takes no lock
    refused: str = ""  # why this engine must not start: another holds the data root
    fix: str = ""


def claim(data_root: Path) -> Claim:
    """An exclusive lock on the data root, held by PID 1 for its life (close-on-exec: no child
    keeps it; the kernel lets go when PID 1 ends). A second container on the same volume would
    start a second dockerd there, whose containerd waits forever for the first's metadata
    database, and dockerd restarts it every 15 s, saying nothing useful: refused at once
    instead, with the fix. flock(2) holds across containers: one kernel, one inode."""
    try:
        fd = os.open(data_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Claim(None)  # dockerd makes it: no volume there, so nobody shares it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return Claim(
            None,
            f"another engine is using {data_root} (a second container on the same volume: "
            "its engine would wait for the first's forever)",
            f"stop the other container first, or give this one a volume of its own for {data_root}",
        )
    except OSError:  # a filesystem without locks (some network filesystems): not checked
        os.close(fd)
        return Claim(None)
    return Claim(fd)


def bytes_needed(images: tuple[str, ...]) -> int:
    """About what installing `images` takes under the data root."""
    return sum(FULL_IMAGE_BYTES if "full" in i else SMALL_IMAGE_BYTES for i in images)


def dockerd_args(plan: StoragePlan) -> list[str]:
    """dockerd's flags for the plan: the forced driver, or none to let dockerd choose."""
    return ["--storage-driver", plan.driver] if plan.driver else []


def check(plan: StoragePlan) -> Check:
    """The `storage` check: FAIL with the fix when refused, WARN with each warning, else OK."""
    if plan.refused:
        return Check(NAME, Status.FAIL, plan.refused, plan.fix)
    if plan.driver is not None:
        will = f"dockerd will use {plan.driver} ({STORAGE_DRIVER}={plan.driver})"
    elif plan.fs_type in ("ext4", "xfs"):
        will = "dockerd will use overlay2"
    else:
        will = "dockerd will choose its storage driver"
    message = f"{plan.data_root} is {plan.fs_type}; {will}"
    if plan.warnings:
        return Check(NAME, Status.WARN, "; ".join((message, *plan.warnings)))
    return Check(NAME, Status.OK, message)


def _nearest_existing(path: Path) -> Path:
    # Before the first start the data root does not exist yet; its parent is where it will be.
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB"
