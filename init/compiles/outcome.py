"""How a compile ended: what the engine saw of it (Ran), and what the `compile` command makes
of that (Outcome): the PDF, a LaTeX error with its first lines, the limit it hit, or the full
disk it could not write to.

The compile dir is the project's to write, so its files are read as an attacker's: never
through a link, only regular files, and only their head.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from init.compiles.budget import Settled
from init.compiles.contract import Limit, Status
from init.compiles.profile import JOBNAME, Job
from init.compiles.settings import Limits
from init.errors import SandboxError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

ERROR_LINES = 8


class NotReady(SandboxError):
    """The TeX Live image is not in the engine (yet)."""

    exit_status = int(Status.NOT_READY)


@dataclass(frozen=True)
class Outcome:
    """The result of one compile, as `compile --json` prints it."""

    status: Status
    reason: str
    seconds: float = 0.0
    pdf: Path | None = None
    log: Path | None = None
    errors: tuple[str, ...] = ()
    limit: Limit | None = None
    exit_code: int | None = None  # the command's own exit status (the shim passes it back)
    written: Settled | None = None  # limit disk: what it had written, when it was seen and stopped

    def document(self) -> dict[str, Any]:
        return {
            "status": self.status.word,
            "exit_status": int(self.status),
            "reason": self.reason,
            "limit": self.limit.value if self.limit is not None else None,
            "pdf": str(self.pdf) if self.pdf is not None else None,
            "log": str(self.log) if self.log is not None else None,
            "seconds": round(self.seconds, 3),
            "errors": list(self.errors),
            "written": self._written(),
        }

    def _written(self) -> dict[str, Any] | None:
        if self.written is None:
            return None
        spent = self.written
        return {
            "bytes": spent.bytes, "files": spent.files, "seen_after": round(spent.seen_after, 3),
            "stopped_after": round(spent.stopped_after, 3),
        }  # fmt: skip


def first_errors(log_text: str, lines: int = ERROR_LINES) -> tuple[str, ...]:
    """The first error of a TeX log: its `!` line and the lines after it up to the `l.N`
    context, or a `file:line: error` line (-file-line-error)."""
    found: list[str] = []
    all_lines = log_text.splitlines()
    for i, line in enumerate(all_lines):
        if line.startswith("! ") or re.match(r"^[^:\s]+:\d+: ", line):
            for follow in all_lines[i : i + lines]:
                found.append(follow)
                if re.match(r"^l\.\d+ ", follow):
                    break
            break
    return tuple(found[:lines])


_FORK_FAILED = re.compile(r"fork|Resource temporarily unavailable|Cannot allocate", re.IGNORECASE)


@dataclass(frozen=True)
class Ran:
    """What the engine saw of one compile."""

    exit_code: int | None  # None: no exit status (the container was removed)
    seconds: float
    timed_out: bool = False
    oom_killed: bool = False
    stopped_by: int | None = None  # the signal that made the runner stop it
    output: str = ""  # the command's output (its tail)
    budget: Settled | None = None  # past its budget of bytes or files: stopped, then cleaned


def largest_file(directory: Path) -> int:
    """Size of the largest regular file under `directory`, links not followed."""
    largest = 0
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                largest = max(largest, info.st_size)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return largest


def regular_file(directory: Path, name: str) -> Path | None:
    """`directory/name` if it is a regular file there (never through a symlink), else None."""
    path = directory / name
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISREG(info.st_mode) else None


def read_text_nofollow(path: Path, limit: int = 4 << 20) -> str:
    """A file's head, opened with O_NOFOLLOW so a planted link cannot redirect it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, limit).decode("latin-1")
    finally:
        os.close(fd)


def limit_hit(ran: Ran, limits: Limits, largest: int, log_text: str) -> Limit | None:
    """Which limit ended the compile, if one did."""
    if ran.stopped_by is not None:
        return Limit.STOPPED
    if ran.budget is not None:
        return Limit.DISK
    if ran.timed_out:
        return Limit.TIMEOUT
    if ran.oom_killed:
        return Limit.MEMORY
    if ran.exit_code == 0:
        return None
    if largest >= limits.output:
        return Limit.OUTPUT_SIZE
    if ran.exit_code == 128 + signal.SIGXFSZ:
        return Limit.OUTPUT_SIZE
    if _FORK_FAILED.search(ran.output) or "Cannot fork" in log_text:
        return Limit.PROCESSES
    return None


# What a write to a full disk or an exhausted quota makes a program say (strerror, errno names).
_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded|\bENOSPC\b|\bEDQUOT\b")
NEAR_FULL_BYTES = 1 << 20  # less free than this after a failed compile: the disk is full
NEAR_FULL_INODES = 64


@dataclass(frozen=True)
class DiskSpace:
    """The room left on the filesystem of a dir a compile writes to, as statvfs saw it."""

    path: Path
    free_bytes: int  # what an unprivileged writer may still use (f_bavail: ext4 keeps 5 % back)
    total_bytes: int
    free_inodes: int | None = None  # None: the filesystem counts none (btrfs reports 0 of 0)
    total_inodes: int | None = None

    @property
    def out_of_bytes(self) -> bool:
        return self.free_bytes < NEAR_FULL_BYTES

    @property
    def out_of_inodes(self) -> bool:
        return self.free_inodes is not None and self.free_inodes < NEAR_FULL_INODES

    def describe(self) -> str:
        """`0 B free of 4.0 MiB`, with the inodes when they are what ran out."""
        text = f"{_size(self.free_bytes)} free of {_size(self.total_bytes)}"
        if self.out_of_inodes and not self.out_of_bytes:
            text += f", but {self.free_inodes} of {self.total_inodes} inodes free"
        return text


def disk_space(path: Path) -> DiskSpace | None:
    """statvfs of `path`; None when it cannot be read (the dir is gone)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    counts_inodes = st.f_files > 0
    return DiskSpace(
        path,
        free_bytes=st.f_bavail * st.f_frsize,
        total_bytes=st.f_blocks * st.f_frsize,
        free_inodes=st.f_favail if counts_inodes else None,
        total_inodes=st.f_files if counts_inodes else None,
    )


def out_of_space(spaces: tuple[DiskSpace, ...], text: str) -> DiskSpace | None:
    """The full disk that failed a compile, judged after it failed: a dir's filesystem with
    next to no bytes or inodes left, or, when the output or log says so (a quota is not seen
    by statvfs), the first dir's; None when neither."""
    for space in spaces:
        if space.out_of_bytes or space.out_of_inodes:
            return space
    if spaces and _NO_SPACE.search(text):
        return spaces[0]
    return None


def no_space_message(space: DiskSpace, compile_dir: Path) -> str:
    where = "compile dir" if space.path == compile_dir else "output dir"
    return (
        f"no space: the {where} {space.path} is on a full disk ({space.describe()}); the "
        "operator must free space there or give it a larger volume, then compile again"
    )


def written_dirs(job: Job) -> tuple[Path, ...]:
    """The compile dir, then each other dir the command writes to (latexmk's -outdir and
    -auxdir, TeX's -output-directory), once each."""
    found = [job.directory.path]
    for arg in job.command:
        for flag in ("-outdir=", "-auxdir=", "-output-directory="):
            if arg.startswith(flag) and (d := Path(arg.removeprefix(flag))) not in found:
                found.append(d)
    return tuple(found)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def limit_message(limit: Limit, limits: Limits, ran: Ran) -> str:
    if limit is Limit.TIMEOUT:
        return f"timeout: the compile ran longer than {limits.timeout:g} s and was stopped"
    if limit is Limit.MEMORY:
        return f"memory: the compile needed more than {limits.memory >> 20} MiB and was killed"
    if limit is Limit.OUTPUT_SIZE:
        return f"output size: the compile wrote a file of {limits.output >> 20} MiB, the limit"
    if limit is Limit.PROCESSES:
        return f"processes: the compile hit the limit of {limits.pids} processes"
    if limit is Limit.DISK and ran.budget is not None:
        return disk_message(ran.budget, limits)
    name = signal.Signals(ran.stopped_by).name if ran.stopped_by else "a signal"
    return f"stopped: the runner got {name} and removed the compile's container"


def disk_message(settled: Settled, limits: Limits) -> str:
    """`disk: ...`: which bound, what was seen written, what became of it."""
    over = settled.overrun
    if over.kind == "hidden":
        what = f"made a dir it cannot be counted in ({over.hidden})"
    elif over.kind == "files":
        what = f"made more than {limits.files} files and dirs in its dir"
    else:
        what = f"wrote more than {_size(limits.disk)} in its dir"
    text = (
        f"disk: the compile {what} (the budget of a compile) and was stopped; it had written "
        f"{_size(settled.bytes)} in {settled.files} files, "
    )
    if settled.left:
        return text + f"removed but for {len(settled.left)} (e.g. {settled.left[0]})"
    return text + "all removed"


def classify(
    ran: Ran, job: Job, limits: Limits, measure: Callable[[Path], DiskSpace | None] = disk_space
) -> Outcome:
    """The outcome of a latexmk run of `sharelatex-init compile` (jobname `output`); `measure`
    reads the room left on a dir's disk (statvfs; a test gives its own)."""
    directory = job.directory.path
    pdf = regular_file(directory, f"{JOBNAME}.pdf") or regular_file(directory, f"{JOBNAME}.dvi")
    log = regular_file(directory, f"{JOBNAME}.log")
    log_text = read_text_nofollow(log) if log is not None else ""
    limit = limit_hit(ran, limits, largest_file(directory), log_text + ran.output)
    errors = first_errors(log_text)
    common = {"seconds": ran.seconds, "log": log, "errors": errors, "exit_code": ran.exit_code}
    if limit is not None:
        return Outcome(
            Status.LIMIT, limit_message(limit, limits, ran), limit=limit, written=ran.budget,
            **common,  # type: ignore[arg-type]
        )  # fmt: skip
    if ran.exit_code != 0:
        spaces = tuple(filter(None, map(measure, written_dirs(job))))
        full = out_of_space(spaces, ran.output + log_text)
        if full is not None:
            return Outcome(Status.NO_SPACE, no_space_message(full, directory), **common)  # type: ignore[arg-type]
    if ran.exit_code == 0 and pdf is not None:
        return Outcome(Status.OK, "the PDF is ready", pdf=pdf, **common)  # type: ignore[arg-type]
    if errors:
        reason = f"LaTeX error: {errors[0].removeprefix('! ')}"
    elif ran.exit_code == 0:
        reason = f"latexmk made no {JOBNAME}.pdf (a link or another file type is never taken)"
    else:
        tail = [line for line in ran.output.splitlines() if line.strip()][-3:]
        reason = f"latexmk exited with status {ran.exit_code}: {' / '.join(tail)}"
    return Outcome(Status.LATEX_ERROR, reason, pdf=pdf if ran.exit_code == 0 else None, **common)  # type: ignore[arg-type]


def not_ready_message(image: str, status_file: Path) -> str:
    """Why `image` cannot be used yet: the TeX Live installer's status, or how to get it."""
    from init.core.status_file import texlive_status_path
    from init.texlive.contract import InstallerStatus
    from init.texlive.progress import still_installing

    installer = InstallerStatus.read(texlive_status_path(status_file))
    entry = installer.entry(image) if installer is not None else None
    if entry is not None:
        return still_installing(image, entry)
    return (
        f"TeX Live image {image} is not in the engine; the init installs it in the background "
        f"(see `sharelatex-init status`), or build it with `scripts/build-images --only texlive`"
        f" / `docker pull {image}`"
    )
