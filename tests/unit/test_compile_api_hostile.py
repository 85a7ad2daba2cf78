"""What a hostile client sends the compile API, taken apart piece by piece: archives whose
headers claim what they cannot have (a 512 MiB pax header, a chain of them, a negative size,
sparse files, xz), bodies that end early, lengths that are not one number, a compile that left
its dir unwritable or a link where the PDF should be. The sockets: tests/integration."""

from __future__ import annotations

import bz2
import http.client
import io
import lzma
import os
import resource
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from init.compiles import api as compile_api
from init.compiles import archive
from init.compiles.archive import ArchiveLimits, Refusal
from init.core.log import Log
from init.httpd.server import Body, BodyError, body_length
from tests.integration.conftest import require

# -- archives --------------------------------------------------------------------------------


def block(
    name: str, kind: bytes, size: int, raw_size: bytes | None = None, fmt: int = tarfile.GNU_FORMAT
) -> bytes:
    """One header block as a writer would make it; `raw_size` puts any 12 bytes in the size
    field (the checksum made right again)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    header = bytearray(info.tobuf(format=fmt))[:512]
    if raw_size is not None:
        header[124:136] = raw_size
        header[148:156] = b"        "
        header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_of(*parts: bytes) -> bytes:
    return b"".join(parts) + b"\0" * 1024


def extract(data: bytes, tmp_path: Path, limits: ArchiveLimits | None = None) -> Refusal:
    project = tmp_path / "p"
    project.mkdir(exist_ok=True)
    with pytest.raises(Refusal) as refused:
        archive.extract(io.BytesIO(data), project, limits or ArchiveLimits())
    assert list(project.iterdir()) == []
    return refused.value


def test_tarfile_still_has_the_steps_the_bounded_tarinfo_takes_over() -> None:
    assert all(callable(getattr(tarfile.TarInfo, name, None)) for name in archive.HOOKS)


def test_a_512_mib_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # The header claims 512 MiB; the blocks behind it are never asked for.
    data = tar_of(block("././@PaxHeader", tarfile.XHDTYPE, 512 << 20), b"\0" * 512)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.monotonic()
    refused = extract(data, tmp_path)
    assert (refused.status, refused.reason) == (413, "archive_header")
    assert "512 MiB" in refused.message
    assert time.monotonic() - began < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 16 * 1024  # KiB


def test_a_real_pax_bomb_gzipped_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """What the issue measured (a 509 KiB gzip holding a 512 MiB pax header), at 128 MiB."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(block("././@PaxHeader", tarfile.XHDTYPE, 128 << 20))]
    zeros = b"\0" * (1 << 20)
    parts += [compressor.compress(zeros) for _ in range(128)]
    parts.append(compressor.compress(b"\0" * 1024) + compressor.flush())
    upload = b"".join(parts)
    assert len(upload) < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = extract(upload, tmp_path)
    assert refused.reason == "archive_header"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 16 * 1024


def test_a_gnu_long_name_over_the_cap_is_refused(tmp_path: Path) -> None:
    data = tar_of(block("././@LongLink", tarfile.GNUTYPE_LONGNAME, 1 << 20))
    assert extract(data, tmp_path).reason == "archive_header"


def test_all_the_extended_headers_together_are_capped(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_header=4096, max_headers=3 * 4096)
    entries = []
    for i in range(5):
        info = tarfile.TarInfo(f"f{i}-" + "x" * 3000 + ".tex")
        entries.append(info)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b""))
    refused = extract(buffer.getvalue(), tmp_path, limits)
    assert (refused.status, refused.reason) == (413, "archive_header")
    assert "add up to" in refused.message


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    record = b"9 a=123\n\0"[:9]
    pax = block("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record.ljust(512, b"\0")
    refused = extract(tar_of(*[pax] * 50, block("main.tex", tarfile.REGTYPE, 0)), tmp_path)
    assert refused.reason == "bad_archive" and "in a row" in refused.message


def test_a_negative_size_is_refused(tmp_path: Path) -> None:
    negative = b"\xff" * 11 + b"\x00"  # base-256, negative: tarfile would seek backwards
    refused = extract(tar_of(block("main.tex", tarfile.REGTYPE, 0, negative)), tmp_path)
    assert refused.reason in ("bad_archive", "unsafe_archive") and "negative" in refused.message
    pax_negative = block("././@PaxHeader", tarfile.XHDTYPE, 0, negative)
    assert "negative" in extract(tar_of(pax_negative), tmp_path).message


def test_an_old_gnu_sparse_member_is_refused(tmp_path: Path) -> None:
    data = tar_of(block("holes.tex", tarfile.GNUTYPE_SPARSE, 512), b"x" * 512)
    refused = extract(data, tmp_path)
    assert (refused.status, refused.reason) == (400, "unsafe_archive")
    assert "sparse" in refused.message


@pytest.mark.parametrize(
    "pax",
    [
        {"GNU.sparse.size": "134217728", "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "1"},
        {"GNU.sparse.map": "0,1", "GNU.sparse.size": "134217728"},
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "134217728"},
    ],
    ids=["0.0", "0.1", "1.0"],
)
def test_a_pax_sparse_member_is_refused(tmp_path: Path, pax: dict[str, str]) -> None:
    """A 127 KiB sparse upload once made 128 MiB on disk under a 16 MiB cap."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("holes.tex")
        info.size = 512
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(b"1\n0\n1\n".ljust(512, b"x")))
    refused = extract(buffer.getvalue(), tmp_path)
    assert refused.reason == "unsafe_archive" and "sparse" in refused.message


def test_xz_is_refused_and_bzip2_accepted(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("main.tex")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    refused = extract(lzma.compress(buffer.getvalue()), tmp_path)
    assert refused.reason == "bad_archive" and "xz" in refused.message
    project = tmp_path / "bz"
    project.mkdir()
    assert archive.extract(io.BytesIO(bz2.compress(buffer.getvalue())), project, ArchiveLimits())
    assert (project / "main.tex").read_text() == "hello"


def test_an_ordinary_pax_archive_with_long_names_extracts(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    name = "chapters/" + "long-" * 40 + "name.tex"
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        info.pax_headers = {"comment": "é" * 100}
        tar.addfile(info, io.BytesIO(b"hi"))
    project = tmp_path / "p"
    project.mkdir()
    assert archive.extract(io.BytesIO(buffer.getvalue()), project, ArchiveLimits()) == 1
    assert (project / name).read_text() == "hi"


# -- bodies and lengths ------------------------------------------------------------------------


def test_a_short_body_is_an_error_not_a_whole_body() -> None:
    """Content-Length 100000, 64 bytes sent, then close: once compiled, answered 200."""
    body = Body(io.BytesIO(b"x" * 64), 100000)
    with pytest.raises(BodyError, match="after 64 of its 100000 bytes"):
        while body.read(1 << 16):
            pass
    assert body.remaining


def test_a_body_that_stalls_is_an_error() -> None:
    class Stalled(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: object) -> int:
            raise TimeoutError("timed out")

    body = Body(io.BufferedReader(Stalled()), 10)
    with pytest.raises(BodyError, match="timed out"):
        body.read(10)


def test_done_is_called_once_the_body_is_in() -> None:
    calls: list[int] = []
    body = Body(io.BytesIO(b"abcdef"), 6, done=lambda: calls.append(1))
    body.read(4)
    assert calls == []
    body.read(4)
    assert calls == [1] and body.read(4) == b""


def headers(*lines: str) -> http.client.HTTPMessage:
    raw = "".join(f"{line}\r\n" for line in lines) + "\r\n"
    return http.client.parse_headers(io.BytesIO(raw.encode("latin-1")))


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (["Content-Length: ²"], 400),
        (["Content-Length: -5"], 400),
        (["Content-Length: +5"], 400),
        (["Content-Length: 5 5"], 400),
        (["Content-Length: 0x10"], 400),
        (["Content-Length: "], 400),
        (["Content-Length: 1" + "0" * 30], 400),
        (["Content-Length: 5", "Content-Length: 6"], 400),
        (["Content-Length: 5", "Transfer-Encoding: chunked"], 400),
        (["Transfer-Encoding: chunked"], 411),
    ],
)
def test_lengths_that_are_not_one_number_are_refused(lines: list[str], status: int) -> None:
    length, problem = body_length(headers(*lines))
    assert length is None and problem is not None and problem[0] == status


def test_one_length_said_twice_is_one_length() -> None:
    assert body_length(headers("Content-Length: 5", "Content-Length: 5")) == (5, None)
    assert body_length(headers()) == (None, None)


# -- what the compile leaves behind ------------------------------------------------------------


def run_as_nobody(action: object) -> int:
    """Run `action()` in a child as nobody (root ignores modes: the removal must work as the
    services' user does)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            action()  # type: ignore[operator]
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A tmp dir nobody can reach (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="hostile-"))
    path.chmod(0o755)
    yield path
    for directory in [path, *path.rglob("*")]:
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    shutil.rmtree(path)


def test_a_dir_the_compile_made_unwritable_is_still_removed(open_dir: Path) -> None:
    require(os.geteuid() == 0, "needs root to act as another user")
    tmp_path = open_dir
    root = tmp_path / "compiles"
    project = root / "p1"
    outside = tmp_path / "precious"
    for directory in (root, project / "sub" / "deeper", project / "locked", outside):
        directory.mkdir(parents=True, exist_ok=True)
    (project / "sub" / "deeper" / "f").write_text("x")
    (project / "locked" / "f").write_text("x")
    (outside / "keep").write_text("x")
    (project / "escape").symlink_to(outside)
    for path in [root, *project.rglob("*"), project, outside, outside / "keep"]:
        os.lchown(path, 65534, 65534)
    os.chmod(outside, 0o555)
    os.chmod(project / "sub" / "deeper", 0o555)
    os.chmod(project / "sub", 0o555)
    os.chmod(project / "locked", 0o000)
    os.chmod(project, 0o555)
    log = io.StringIO()
    code = run_as_nobody(lambda: compile_api.remove_project_dir(root, project, Log(log)))
    assert code == 0
    assert not project.exists()
    assert (outside / "keep").exists() and outside.stat().st_mode & 0o777 == 0o555


def test_the_pdf_is_never_read_through_a_link(tmp_path: Path) -> None:
    project = tmp_path / "p1"
    project.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("secret")
    (project / "output.pdf").symlink_to(secret)
    with pytest.raises(OSError):
        compile_api.open_output(project / "output.pdf", project)
    with pytest.raises(OSError):
        compile_api.open_output(secret, project)
    os.mkfifo(project / "fifo.pdf")
    began = time.monotonic()
    with pytest.raises(OSError):
        compile_api.open_output(project / "fifo.pdf", project)
    assert time.monotonic() - began < 1
    (project / "real.pdf").write_bytes(b"%PDF")
    with compile_api.open_output(project / "real.pdf", project) as f:
        assert f.read() == b"%PDF"
