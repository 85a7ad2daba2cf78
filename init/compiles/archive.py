"""Project archives: a tar (plain, gzip or bzip2) checked member by member and extracted into a
project dir, with memory bounded whatever the archive's headers claim.

tarfile reads a pax header or a GNU long name whole into memory before anyone can look at it
(a 509 KiB gzip holding a 512 MiB pax header took the compile API from 23 to 546 MiB), and a
chain of extended headers recurses. So tarfile parses with a TarInfo of our own that refuses,
before the read: an extended header over `max_header`, all of them over `max_headers`, more
than MAX_CHAIN in a row, a negative size, and any sparse member (counted by its stored size, a
127 KiB sparse upload made 128 MiB on disk; no LaTeX project needs one). xz is refused: its
decoder's memory is the archive's to choose.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

# tarfile's own steps that the bounded TarInfo takes over (tests/unit check that they exist).
HOOKS = ("_proc_member", "_proc_gnusparse_00", "_proc_gnusparse_01", "_proc_gnusparse_10")
EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
MAX_CHAIN = 8  # extended headers in a row before a member (GNU tar and bsdtar write up to 3)
XZ_MAGIC = b"\xfd7zXZ\x00"


class Refusal(Exception):
    """An upload this service will not compile, as the HTTP status and reason to answer. (Not
    a frozen dataclass: raising through a `with` sets its __traceback__.)"""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ArchiveLimits:
    max_extracted: int = 200 * 1024 * 1024  # bytes of the files, by their size in the archive
    max_members: int = 5000
    max_header: int = 64 * 1024  # one pax header or GNU long name/link, in bytes
    max_headers: int = 4 * 1024 * 1024  # all of them together


def member_problem(member: tarfile.TarInfo) -> str:
    """Why this archive member may not be extracted into a project, or "" when it may.

    Links may only point down from their own dir (relative, no `..`): then no chain of links
    can leave the project, whatever order the members come in."""
    name = member.name
    if not name or "\0" in name:
        return "a member with an empty or NUL name"
    if name.startswith("/"):
        return f"{name!r} is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return f"{name!r} goes up with '..'"
    if member.size < 0:
        return f"{name!r} has a negative size"
    if member.issparse():
        return f"{name!r} is a sparse file; make the archive without --sparse"
    if member.issym() or member.islnk():
        target = member.linkname
        kind = "symlink" if member.issym() else "hard link"
        if not target or target.startswith("/") or ".." in PurePosixPath(target).parts:
            return f"{kind} {name!r} -> {target!r} points out of the project"
        return ""
    if member.isreg() or member.isdir():
        return ""
    return f"{name!r} is a device, fifo or other special file"


def check_archive(members: Any, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    """The members of an archive, each checked, as they are read (so a bomb stops at the first
    member past a limit, before tarfile skips over its data); Refusal otherwise."""
    accepted: list[tarfile.TarInfo] = []
    total = 0
    for member in members:
        if len(accepted) >= limits.max_members:
            raise Refusal(413, "members", f"more than {limits.max_members} files in the archive")
        problem = member_problem(member)
        if problem:
            raise Refusal(400, "unsafe_archive", problem)
        if member.isreg():
            total += member.size
        if total > limits.max_extracted:
            raise Refusal(
                413,
                "extracted_size",
                f"the archive's files add up to more than {megabytes(limits.max_extracted)}",
            )
        accepted.append(member)
    return accepted


def extract(archive: IO[bytes], dest: Path, limits: ArchiveLimits) -> int:
    """Extract a tar (plain, gzip, bzip2) into `dest` after `check_archive`; the number of
    members. Where the stdlib has it (3.11.4 on), its "data" filter checks again as it writes."""
    filter_error = getattr(tarfile, "FilterError", None)
    mode = open_mode(archive)
    try:
        with tarfile.open(fileobj=archive, mode=mode, tarinfo=bounded_tarinfo(limits)) as tar:
            members = [plain(m) for m in check_archive(tar, limits)]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # Debian bookworm's 3.11.2: the checks above are the whole guard
                tar.extractall(dest, members=members)
    except Refusal:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # ValueError: a number field that is not one (tarfile's nti); zlib's errors are OSError.
        if filter_error is not None and isinstance(e, filter_error):
            raise Refusal(400, "unsafe_archive", str(e)) from e
        raise Refusal(400, "bad_archive", f"not a readable tar archive: {e}") from e
    return len(members)


def open_mode(archive: IO[bytes]) -> Literal["r:gz", "r:bz2", "r:"]:
    """tarfile's mode for the archive's compression, by its first bytes; Refusal for xz."""
    start = archive.tell()
    magic = archive.read(6)
    archive.seek(start)
    if magic.startswith(b"\x1f\x8b"):
        return "r:gz"
    if magic.startswith(b"BZh"):
        return "r:bz2"
    if magic.startswith(XZ_MAGIC):
        raise Refusal(
            400, "bad_archive", "xz archives are not accepted; send a tar, or a tar gzipped"
        )
    return "r:"


def bounded_tarinfo(limits: ArchiveLimits) -> type[tarfile.TarInfo]:
    """A TarInfo class for one archive: its extended headers are checked against `limits`
    before tarfile reads them, and sparse members are refused."""
    spent = [0, 0]  # bytes of extended headers so far; extended headers in a row now

    def refuse_sparse(*_: object) -> None:
        raise Refusal(400, "unsafe_archive", "a sparse file; make the archive without --sparse")

    class BoundedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            if self.size < 0:
                raise Refusal(400, "bad_archive", f"{self.name!r} has a negative size")
            if self.type == tarfile.GNUTYPE_SPARSE:
                refuse_sparse()
            if self.type not in EXTENDED:
                return tarfile.TarInfo._proc_member(self, tar)  # type: ignore[attr-defined, no-any-return]
            if self.size > limits.max_header:
                raise Refusal(
                    413,
                    "archive_header",
                    f"an archive header (pax or GNU long name) of {megabytes(self.size)}, over "
                    f"{megabytes(limits.max_header)}",
                )
            spent[0] += self.size
            if spent[0] > limits.max_headers:
                raise Refusal(
                    413,
                    "archive_header",
                    f"the archive's pax headers and long names add up to more than "
                    f"{megabytes(limits.max_headers)}",
                )
            if spent[1] >= MAX_CHAIN:
                raise Refusal(
                    400, "bad_archive", f"more than {MAX_CHAIN} extended headers in a row"
                )
            spent[1] += 1
            try:
                return tarfile.TarInfo._proc_member(self, tar)  # type: ignore[attr-defined, no-any-return]
            finally:
                spent[1] -= 1

        _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = refuse_sparse

    return BoundedTarInfo


def plain(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """The member as this service's own file: no set-id bits, no owner from the archive (which
    extracting as root would apply)."""
    copy = tarfile.TarInfo(member.name)
    for name in ("size", "mtime", "type", "linkname", "offset", "offset_data", "sparse"):
        setattr(copy, name, getattr(member, name))
    copy.mode = 0o755 if member.isdir() or member.mode & 0o100 else 0o644
    copy.uid, copy.gid, copy.uname, copy.gname = os.geteuid(), os.getegid(), "", ""
    return copy


def megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB" if size >= 1 << 20 else f"{size} bytes"
