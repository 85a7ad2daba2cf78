"""Why the sandbox stopped (or never ran) a compile, written where the user reads it: a line at
the end of the compile's TeX log, which the compile service returns to the editor.

Overleaf's log parser (services/web/frontend/js/ide/log-parser/latex-log-parser.ts at
overleaf/overleaf 28ad3b03b71c) shows a line that starts with `!` as an error, its message the
rest of the line, its detail the lines after it; it never reads the log's first line, and it
joins a line of exactly 79 characters (TeX's wrap) with the next unless that one starts with
`!`. So the note starts on a line of its own, after an empty one, and no line of it is 79 long.

The compile dir is the project's to write: the log is opened beside its dir's fd with
O_NOFOLLOW (a planted link is refused, even a dangling one), only a regular file is written
(a FIFO fails to open with O_NONBLOCK, anything else is refused after fstat), and the note is
capped in size.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from init.compiles.contract import Limit
from init.compiles.settings import Limits

PREFIX = "! sharelatex-init: "
NOTE_CAP = 2048  # bytes of one note, whatever a reason says
_WRAP = 79  # the log parser's LOG_WRAP_LIMIT
_OPTIONS_WITH_VALUE = ("-jobname", "--jobname", "-auxdir", "-aux-directory", "--aux-directory",
                       "-outdir", "-output-directory", "--output-directory")  # fmt: skip


def _option(argv: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The value of the last `-name=value` or `-name value` among `names`."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in names:
            if eq:
                found = value
            elif i + 1 < len(argv):
                found = argv[i + 1]
    return found


def log_place(argv: Sequence[str], cwd: Path) -> tuple[Path, str] | None:
    """(dir, jobname) of the TeX log a latexmk or engine command line writes: the aux dir, else
    the out dir, else `cwd`; the jobname, else the main file's stem. None when it cannot tell
    (then no note is written)."""
    args = argv[1:]
    jobname = _option(args, ("-jobname", "--jobname"))
    if jobname is None:
        values = {i + 1 for i, a in enumerate(args) if a in _OPTIONS_WITH_VALUE}
        files = [a for i, a in enumerate(args) if not a.startswith("-") and i not in values]
        if not files:
            return None
        jobname = Path(files[-1]).name.removesuffix(".tex")
    if not jobname or "/" in jobname or jobname in (".", ".."):
        return None
    where = _option(args, ("-auxdir", "-aux-directory", "--aux-directory"))
    where = where or _option(args, ("-outdir", "-output-directory", "--output-directory"))
    return (cwd / where if where else cwd), jobname


def stop_reason(limit: Limit, limits: Limits) -> tuple[str, str]:
    """The note's error line (after the prefix) and its detail, for a user, by limit."""
    ask = "If the project needs more, ask the site's administrator."
    if limit is Limit.TIMEOUT:
        return (
            f"the compile was stopped after {limits.timeout:g} s (the site's compile time limit).",
            "Make it faster (e.g. draft mode, smaller images, fewer TikZ figures). " + ask,
        )
    if limit is Limit.MEMORY:
        return (
            f"the compile was stopped: it needed more than {limits.memory >> 20} MiB of memory "
            "(the site's compile memory limit).",
            ask,
        )
    if limit is Limit.PROCESSES:
        return (
            f"the compile was stopped: it started more than {limits.pids} processes "
            "(the site's limit).",
            ask,
        )
    if limit is Limit.OUTPUT_SIZE:
        return (
            f"the compile was stopped: it wrote a file of {limits.output >> 20} MiB, the "
            "largest a compile may write.",
            ask,
        )
    if limit is Limit.DISK:
        return (
            f"the compile was stopped: it wrote more than {_bound(limits.disk, limits.files)} in "
            "its dir (the site's budget per compile).",
            "What it wrote was removed; the project's own files are as they were. " + ask,
        )
    return "the compile was stopped.", ""


def _bound(disk: int, files: int) -> str:
    """`1024 MiB or 100000 files`, leaving out a bound that is off."""
    parts = ([f"{disk >> 20} MiB"] if disk else []) + ([f"{files} files"] if files else [])
    return " or made more than ".join(parts) if len(parts) == 2 else parts[0]


def render(line: str, detail: str = "") -> bytes:
    """The note as bytes: an empty line, the `!` line, the detail; capped."""
    lines = [f"{PREFIX}{line}", *([detail] if detail else [])]
    # A line of exactly the wrap length would swallow the next one in the parser.
    lines = [f"{text} " if len(text) == _WRAP else text for text in lines]
    data = ("\n" + "\n".join(lines) + "\n").encode("utf-8", errors="replace")
    return data[:NOTE_CAP]


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def append(directory: Path, name: str, note: bytes, owner: tuple[int, int] | None = None) -> bool:
    """Append `note` to `directory/name` (made if missing, given to `owner` when we are root);
    False, writing nothing, when it is a link or not a regular file, or cannot be opened."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    flags |= os.O_CLOEXEC | os.O_NOCTTY
    try:
        dir_fd = _open_dir(directory)
    except OSError:
        return False
    try:
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        if owner is not None and os.geteuid() == 0 and info.st_uid == 0:
            os.fchown(fd, *owner)
        os.write(fd, note[:NOTE_CAP])
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove(directory: Path, name: str) -> bool:
    """Unlink `directory/name` (the entry itself, never what a link points to); True if it was
    there."""
    try:
        dir_fd = _open_dir(directory)
    except OSError:
        return False
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)
