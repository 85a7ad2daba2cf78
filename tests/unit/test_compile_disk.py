"""A compile that failed for want of room on its disk says so (exit 73, no_space), naming the
dir and the room left, instead of passing for a LaTeX error (init.compiles.outcome)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from init.compiles import api
from init.compiles.contract import Limit, Status
from init.compiles.outcome import (
    DiskSpace,
    Ran,
    classify,
    disk_space,
    out_of_space,
    written_dirs,
)
from init.compiles.paths import CompileDir
from init.compiles.profile import Job, latexmk_command
from init.compiles.settings import Limits

MiB = 1 << 20
LOG = "! I can't write on file `output.pdf'.\nl.12 \\end{document}\n"


def full(path: Path, free: int = 0, inodes: int | None = 900) -> DiskSpace:
    return DiskSpace(path, free, 4 * MiB, inodes, 1024 if inodes is not None else None)


def roomy(path: Path) -> DiskSpace:
    return DiskSpace(path, 800 * MiB, 1000 * MiB, 50_000, 60_000)


def a_job(tmp_path: Path, outdir: Path | None = None) -> Job:
    directory = tmp_path / "p1"
    directory.mkdir(parents=True)
    (directory / "output.log").write_text(LOG)
    command = latexmk_command(directory, "main.tex", "pdflatex")
    if outdir is not None:
        command = tuple(f"-outdir={outdir}" if a.startswith("-outdir=") else a for a in command)
    return Job(CompileDir(directory, directory, "p1", 33, 33), command, "img:1", {})


def measured(spaces: dict[Path, DiskSpace]) -> Callable[[Path], DiskSpace | None]:
    """statvfs as a test has it: `spaces` full, every other dir roomy."""
    return lambda path: spaces.get(path, roomy(path))


# -- the pure judgement ---------------------------------------------------------------------


def test_a_disk_with_next_to_no_bytes_or_inodes_left_is_full() -> None:
    a, b = Path("/a"), Path("/b")
    assert out_of_space((roomy(a), full(b)), "") == full(b)
    assert out_of_space((full(a, free=3 * MiB, inodes=2),), "") is not None  # inodes ran out
    assert out_of_space((roomy(a), roomy(b)), "") is None


def test_the_output_saying_so_counts_when_statvfs_shows_room_a_quota() -> None:
    a = Path("/a")
    for said in ("No space left on device", "Disk quota exceeded", "write: ENOSPC"):
        assert out_of_space((roomy(a),), f"x\n{said}\n") == roomy(a)
    assert out_of_space((), "No space left on device") is None  # no dir to name


def test_a_filesystem_counting_no_inodes_is_judged_by_bytes_only() -> None:
    btrfs = DiskSpace(Path("/a"), 500 * MiB, 1000 * MiB, None, None)
    assert not btrfs.out_of_inodes and out_of_space((btrfs,), "") is None


def test_the_room_is_said_in_units_and_the_inodes_when_they_ran_out() -> None:
    assert full(Path("/a")).describe() == "0 B free of 4.0 MiB"
    assert full(Path("/a"), free=3 * MiB, inodes=0).describe() == (
        "3.0 MiB free of 4.0 MiB, but 0 of 1024 inodes free"
    )


def test_the_dirs_written_are_the_compile_dir_and_an_outdir_elsewhere(tmp_path: Path) -> None:
    plain = a_job(tmp_path / "x")
    assert written_dirs(plain) == (plain.directory.path,)
    elsewhere = a_job(tmp_path / "y", outdir=Path("/output/p1"))
    assert written_dirs(elsewhere) == (elsewhere.directory.path, Path("/output/p1"))


def test_statvfs_of_a_real_dir(tmp_path: Path) -> None:
    space = disk_space(tmp_path)
    assert space is not None and 0 <= space.free_bytes <= space.total_bytes
    assert disk_space(tmp_path / "gone") is None


# -- in the classification ------------------------------------------------------------------


def test_a_failed_compile_on_a_full_compile_dir_is_no_space_not_a_latex_error(
    tmp_path: Path,
) -> None:
    job = a_job(tmp_path)
    d = job.directory.path
    outcome = classify(Ran(12, 1.0), job, Limits(), measured({d: full(d)}))
    assert outcome.status is Status.NO_SPACE and int(outcome.status) == 73
    assert outcome.reason == (
        f"no space: the compile dir {d} is on a full disk (0 B free of 4.0 MiB); the operator "
        "must free space there or give it a larger volume, then compile again"
    )
    assert outcome.errors[0] == "! I can't write on file `output.pdf'."  # still shown
    document = outcome.document()
    assert document["status"] == "no_space" and document["exit_status"] == 73
    assert document["limit"] is None


def test_a_full_output_dir_is_named_as_such(tmp_path: Path) -> None:
    out = Path("/output/p1")
    job = a_job(tmp_path, outdir=out)
    outcome = classify(Ran(12, 1.0), job, Limits(), measured({out: full(out)}))
    assert outcome.status is Status.NO_SPACE
    assert outcome.reason.startswith(f"no space: the output dir {out} is on a full disk")


def test_a_compile_that_says_no_space_left_is_no_space(tmp_path: Path) -> None:
    job = a_job(tmp_path)
    ran = Ran(12, 1.0, output="Latexmk: cannot write: No space left on device\n")
    assert classify(ran, job, Limits(), measured({})).status is Status.NO_SPACE


@pytest.mark.parametrize(
    ("ran", "status"),
    [
        (Ran(0, 1.0), Status.LATEX_ERROR),  # exit 0 (no pdf here): the disk is not judged
        (Ran(None, 60.0, timed_out=True), Status.LIMIT),  # the limit came first
        (Ran(153, 1.0), Status.LIMIT),  # SIGXFSZ: the document's file limit, not the disk
    ],
)
def test_a_full_disk_does_not_mask_success_or_a_limit(
    tmp_path: Path, ran: Ran, status: Status
) -> None:
    job = a_job(tmp_path)
    d = job.directory.path
    assert classify(ran, job, Limits(), measured({d: full(d)})).status is status


def test_a_latex_error_with_room_on_the_disk_stays_a_latex_error(tmp_path: Path) -> None:
    job = a_job(tmp_path)
    outcome = classify(Ran(12, 1.0), job, Limits(), measured({}))
    assert outcome.status is Status.LATEX_ERROR


def test_the_compile_service_answers_507_for_a_full_disk() -> None:
    answer = api.status_for(api.Outcome(int(Status.NO_SPACE), {"status": "no_space"}))
    assert answer == (507, None)
    assert api.status_for(api.Outcome(int(Status.LIMIT), {"limit": Limit.TIMEOUT.value})) == (
        413,
        None,
    )
