"""The compiles root on a bounded filesystem of its own (docker-in-docker): a loop-mounted ext4.

Every compile writes under the compiles root, on the disk Mongo and Redis use. The per-compile
budget (init.compiles.budget) stops a compile some hundred MiB past its bytes, and many compiles
at once add up; this bounds them all together, in the kernel: the compiles root is an ext4 of
OVERLEAF_INIT_COMPILES_SIZE (and an inode count in proportion) mounted from a sparse image
beside it, `<data>/compiles.img`. Beside it: on the data volume, so it lasts as long as the
data (a container made again reuses it), takes its space from the disk it bounds (at most its
size), and is never under the mount it makes. This kernel has no usable project quotas, so a
filesystem of its own is the bound.

`plan` (in PID 1: mountinfo, statvfs, stat) decides; the work (mkfs, fsck, mount) runs in a
child, `python -m init.engine.compiles_fs`, which reports a `Result`; `unmount` at shutdown is
PID 1's, after dockerd has stopped. Sibling mode cannot mount (the host's engine binds the
host's path): `check` says when the compiles root shares the data dir's filesystem, with the fix.
"""

from __future__ import annotations

import enum
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from init.checks import Check, Status
from init.config import COMPILES_SIZE

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: PID 1 imports this
if TYPE_CHECKING:
    from typing import Any

MODULE = "init.engine.compiles_fs"
NAME = "compiles fs"
DEFAULT_SIZE = 10 << 30
# ext4's own default ratio for a filesystem of this size: 655,360 inodes in 10 GiB, 64 per MiB;
# the per-compile budget allows 20,000 files.
BYTES_PER_INODE = 16 << 10
MIN_SIZE = 256 << 20  # below this, auto makes none (config.COMPILES_SIZE_MIN for a given size)
LABEL = "overleaf-compiles"
# nodev, nosuid: a device node or a setuid/setgid file a compile plants means nothing here.
MOUNT_OPTIONS = "loop,nodev,nosuid,noatime"
DEADLINE = 300.0  # seconds for the child: mkfs and mount take well under one; fsck scales
# e2fsck's exit status: 0 clean, 1 errors fixed, 2 fixed (reboot advised: not for a loop image).
FSCK_FIXED = 2


class Action(enum.Enum):
    OFF = "off"  # COMPILES_SIZE=0
    SKIP = "skip"  # nothing to bound on (no data volume, too little free space)
    MOUNTED = "mounted"  # the compiles root is a mount of its own already: left as it is
    REUSE = "reuse"  # fsck and mount the image of an earlier boot
    MAKE = "make"  # a new image: mkfs and mount


@dataclass(frozen=True)
class Plan:
    action: Action
    compiles_dir: Path
    image: Path
    size: int = 0  # bytes of the image (asked, or what it is)
    inodes: int = 0
    owner: tuple[int, int] | None = None  # (uid, gid) of the filesystem's root
    explicit: bool = False  # the size was asked (a failure refuses compiles) or auto
    notes: tuple[str, ...] = ()  # the operator's lines, in order

    @property
    def works(self) -> bool:
        return self.action in (Action.REUSE, Action.MAKE)

    def argv(self, result: Path) -> tuple[str, ...]:
        owner = ("--owner", f"{self.owner[0]}:{self.owner[1]}") if self.owner else ()
        make = ("--make",) if self.action is Action.MAKE else ()
        return (
            "--compiles-dir", str(self.compiles_dir), "--image", str(self.image),
            "--size", str(self.size), "--inodes", str(self.inodes),
            "--result", str(result), *owner, *make,
        )  # fmt: skip


@dataclass(frozen=True)
class Result:
    ok: bool
    notes: tuple[str, ...] = ()
    error: str = ""
    fix: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "notes": list(self.notes)}

    @classmethod
    def from_json(cls, document: object) -> Result:
        if not isinstance(document, dict):
            return cls(False, error="no result")
        seconds = document.get("seconds")
        return cls(
            ok=document.get("ok") is True,
            notes=tuple(str(n) for n in document.get("notes") or ()),
            error=str(document.get("error") or ""),
            fix=str(document.get("fix") or ""),
            seconds={str(k): float(v) for k, v in seconds.items()}
            if isinstance(seconds, dict)
            else {},
        )


def image_path(compiles_dir: Path) -> Path:
    """`<data>/compiles.img` for `<data>/compiles`: beside the dir, never under its mount."""
    return compiles_dir.with_name(compiles_dir.name + ".img")


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> frozenset[str]:
    from init.engine import mountinfo as parser

    try:
        return frozenset(m.point for m in parser.parse(mountinfo.read_text()))
    except OSError:
        return frozenset()


def plan(
    compiles_dir: Path,
    size: int | None,
    owner: tuple[int, int] | None = None,
    mounts: Iterable[str] | None = None,
    free: Callable[[Path], int] = free_bytes,
) -> Plan:
    """What the boot does for `compiles_dir` with COMPILES_SIZE `size` (None: auto, 0: off)."""
    compiles_dir = Path(os.path.realpath(compiles_dir))
    image = image_path(compiles_dir)
    data = compiles_dir.parent
    if size == 0:
        unused = f"; {image} of an earlier boot is not used: remove it" if image.is_file() else ""
        return Plan(Action.OFF, compiles_dir, image, notes=(
            f"{COMPILES_SIZE}=0: {compiles_dir} stays on the data dir's filesystem; compiles "
            f"are bounded only each by its budget{unused}",
        ))  # fmt: skip
    points = mount_points() if mounts is None else frozenset(mounts)
    if str(compiles_dir) in points:
        return Plan(Action.MOUNTED, compiles_dir, image, notes=(
            f"{compiles_dir} is a mount of its own already: left as it is (its size bounds the "
            "compiles)",
        ))  # fmt: skip
    if not data.parent.is_dir():
        # Not the image's data layout (the volume's mount point itself is missing): making
        # dirs and a disk image out of nowhere is no one's wish.
        return Plan(Action.SKIP, compiles_dir, image, notes=(
            f"{data.parent} does not exist: no data volume, so no filesystem for {compiles_dir}",
        ))  # fmt: skip
    if image.is_file():
        actual = image.stat().st_size
        notes: tuple[str, ...] = ()
        if size is not None and size != actual:
            notes = (
                f"{image} is {_size(actual)}, {COMPILES_SIZE} asks {_size(size)}: the image "
                f"keeps its size; to change it, remove {image} while the container is stopped "
                "(it holds only CLSI's cache of compiles)",
            )
        return Plan(Action.REUSE, compiles_dir, image, actual, inodes(actual), owner,
                    explicit=size is not None, notes=notes)  # fmt: skip
    explicit = size is not None
    if size is None:
        available = free(_nearest_existing(data))
        size = min(DEFAULT_SIZE, available // 2) // (1 << 20) * (1 << 20)
        if size < MIN_SIZE:
            return Plan(Action.SKIP, compiles_dir, image, notes=(
                f"only {_size(available)} free on the data dir's filesystem: no filesystem of "
                f"its own for {compiles_dir} (it needs {_size(2 * MIN_SIZE)} free); free some "
                f"space, or set {COMPILES_SIZE}=SIZE",
            ))  # fmt: skip
    return Plan(Action.MAKE, compiles_dir, image, size, inodes(size), owner, explicit)


def inodes(size: int) -> int:
    return max(size // BYTES_PER_INODE, 1024)


def check(compiles_dir: Path) -> Check:
    """`doctor`'s line (and sibling mode's at boot): whether the compiles root has a filesystem
    of its own, or shares the data dir's (the disk Mongo and Redis use, in Overleaf's setup)."""
    try:
        own, parent = os.stat(compiles_dir), os.stat(compiles_dir.parent)
        stats = os.statvfs(compiles_dir)
    except OSError as e:
        return Check(NAME, Status.OK, f"{compiles_dir}: not there yet ({e.strerror})")
    if own.st_dev == parent.st_dev:
        return Check(
            NAME,
            Status.WARN,
            f"{compiles_dir} shares a filesystem with {compiles_dir.parent}: compiles together "
            "can fill the disk the data (and Mongo and Redis, when beside it) use",
            f"mount a sized volume or filesystem of its own at {compiles_dir} (on the host: the "
            "compiles dir the containers bind), e.g. a loop-mounted ext4 image",
        )
    size = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    image = image_path(compiles_dir)
    how = f" (from {image})" if image.is_file() else ""
    return Check(
        NAME,
        Status.OK,
        f"{compiles_dir} is a filesystem of its own{how}: {_size(size)}, {_size(free)} free, "
        f"{stats.f_ffree} of {stats.f_files} inodes free",
    )


def unmount(path: Path) -> str:
    """Unmount `path` (once dockerd has stopped: nothing holds it); lazily when busy. The line
    that says which."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    target = os.fsencode(path)
    if libc.umount2(target, 0) == 0:
        return f"{path} unmounted"
    errno = ctypes.get_errno()
    mnt_detach = 2
    if libc.umount2(target, mnt_detach) == 0:
        return f"{path} busy ({os.strerror(errno)}): detached, the kernel unmounts it when freed"
    return f"cannot unmount {path}: {os.strerror(ctypes.get_errno())}; the kernel does at exit"


# -- the child: mkfs, fsck, mount --------------------------------------------------------------


class _Failed(Exception):
    def __init__(self, error: str, fix: str) -> None:
        super().__init__(error)
        self.error, self.fix = error, fix


def apply(
    compiles_dir: Path, image: Path, size: int, inodes: int, owner: tuple[int, int] | None,
    make: bool,
) -> Result:  # fmt: skip
    notes: list[str] = []
    seconds: dict[str, float] = {}
    try:
        # On a first boot the data dir is not there yet (the image's startup script makes it,
        # and chowns it to the services' user, after this step).
        compiles_dir.parent.mkdir(parents=True, exist_ok=True)
        if not make:
            started = time.monotonic()
            if not _fsck(image, notes):
                aside = image.with_name(f"{image.name}.broken-{int(time.time())}")
                os.rename(image, aside)
                notes.append(f"{image} could not be repaired: moved to {aside} (CLSI's cache; "
                             "remove it once looked at) and made again")  # fmt: skip
                make = True
            seconds["fsck"] = round(time.monotonic() - started, 3)
        if make:
            started = time.monotonic()
            _make(image, size, inodes, owner)
            seconds["mkfs"] = round(time.monotonic() - started, 3)
            notes.append(f"made {image}: ext4 of {_size(size)}, {inodes} inodes, sparse")
        compiles_dir.mkdir(parents=True, exist_ok=True)
        hidden = _entries(compiles_dir)
        started = time.monotonic()
        _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(compiles_dir)],
             "install util-linux's mount")  # fmt: skip
        seconds["mount"] = round(time.monotonic() - started, 3)
        _settle_root(compiles_dir, owner)
        if hidden:
            notes.append(
                f"{_count(hidden, 'entry', 'entries')} already in {compiles_dir} (CLSI's cache "
                "of earlier compiles) are hidden under the mount, not deleted: "
                f"{COMPILES_SIZE}=0 shows them again"
            )
        stats = os.statvfs(compiles_dir)
        notes.append(
            f"{compiles_dir}: a filesystem of its own from {image}, "
            f"{_size(stats.f_blocks * stats.f_frsize)}, {stats.f_files} inodes "
            f"({', '.join(f'{step} {took:.2f} s' for step, took in seconds.items())})"
        )
    except _Failed as e:
        return Result(False, tuple(notes), e.error, e.fix, seconds)
    except OSError as e:
        return Result(False, tuple(notes), f"{e.filename or image}: {e.strerror}",
                      f"make {compiles_dir.parent} writable by root", seconds)  # fmt: skip
    return Result(True, tuple(notes), seconds=seconds)


def _fsck(image: Path, notes: list[str]) -> bool:
    """e2fsck -p: quick on a clean filesystem (the superblock says so), repairs what is safe."""
    done = _run(["e2fsck", "-p", str(image)], "install e2fsprogs", ok=range(0, 256))
    if done.returncode == 0:
        return True
    if done.returncode <= FSCK_FIXED:
        notes.append(f"e2fsck repaired {image}: {_last_line(done.stdout + done.stderr)}")
        return True
    notes.append(f"e2fsck {image}: {_last_line(done.stdout + done.stderr)}")
    return False


def _make(image: Path, size: int, inodes: int, owner: tuple[int, int] | None) -> None:
    partial = image.with_name(image.name + ".new")  # never a half-made image under the name
    partial.unlink(missing_ok=True)
    with open(partial, "xb") as file:
        file.truncate(size)  # sparse: the disk gives only what compiles write, up to `size`
    os.chmod(partial, 0o600)
    extended = "lazy_itable_init=1,lazy_journal_init=1"
    if owner is not None:
        extended += f",root_owner={owner[0]}:{owner[1]}"
    # -m 0: no blocks kept for root (root never writes there); -N: inodes in proportion.
    try:
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes), "-L", LABEL, "-E", extended,
              str(partial)], "install e2fsprogs in the image")  # fmt: skip
    except _Failed:
        partial.unlink(missing_ok=True)  # ours, just made, never a filesystem
        raise
    os.rename(partial, image)


def _settle_root(compiles_dir: Path, owner: tuple[int, int] | None) -> None:
    """The root owned by the services' user; no lost+found (CLSI's expiry would try to remove
    it as a project's dir): e2fsck makes one again when it needs one."""
    if owner is not None:
        os.chown(compiles_dir, *owner)
    os.chmod(compiles_dir, 0o755)
    try:
        (compiles_dir / "lost+found").rmdir()
    except OSError:
        pass  # absent, or holding what e2fsck found: left for the operator


def _entries(path: Path) -> int:
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


def _run(argv: Sequence[str], fix: str, ok: Iterable[int] = (0,)) -> Any:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
    except FileNotFoundError:
        raise _Failed(f"no {argv[0]} in this image", f"{fix} (or set {COMPILES_SIZE}=0)") from None
    except subprocess.TimeoutExpired:
        took = f"{argv[0]} took more than {DEADLINE:g} s"
        raise _Failed(took, f"set {COMPILES_SIZE}=0") from None
    if done.returncode not in ok:
        raise _Failed(
            f"{' '.join(argv[:1])} exited {done.returncode}: "
            f"{_last_line(done.stderr + done.stdout)}",
            f"see the log; set {COMPILES_SIZE}=0 to keep the compiles on the data dir's disk",
        )
    return done


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--compiles-dir", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--inodes", type=int, required=True)
    parser.add_argument("--owner", default="")
    parser.add_argument("--make", action="store_true")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    owner = None
    if args.owner:
        uid, gid = args.owner.split(":")
        owner = (int(uid), int(gid))
    result = apply(args.compiles_dir, args.image, args.size, args.inodes, owner, args.make)
    args.result.write_text(json.dumps(result.to_json()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
