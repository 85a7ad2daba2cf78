"""A compile on a full disk, for real: the project dir is a small ext4 on a loop device, full
(of bytes, or of inodes), and `sharelatex-init compile` says so (exit 73, no_space, the dir and
the room left), where it used to say `latex_error: latexmk exited with status 12`.

The test engine runs in a mount namespace of its own, so the filesystem is mounted twice, in the
host's (where the compile command judges it) and in the engine's (what the container binds):
the same block device, the same filesystem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.integration import texlive_engine
from tests.integration.conftest import require, wait_for
from tests.integration.texlive_engine import WWW_DATA, Compiles, chown_tree

texlive = texlive_engine.texlive
compiles = texlive_engine.compiles

pytestmark = pytest.mark.root
HELLO = r"""\documentclass{article}
\begin{document}
Hello, full disk.
\end{document}
"""

SmallDisk = Callable[..., Path]


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture
def small_disk(compiles: Compiles, tmp_path: Path) -> Iterator[SmallDisk]:
    """small_disk(name, size_kib, inodes=None) -> a project dir on an ext4 of its own."""
    require(shutil.which("losetup") is not None, "needs losetup (util-linux)")
    require(shutil.which("mkfs.ext4") is not None, "needs mkfs.ext4 (e2fsprogs)")
    engine_pid = str(compiles.engine.proc.pid)  # unshare exec'd dockerd: its mount namespace
    made: list[tuple[Path, str]] = []

    def make(name: str, size_kib: int, inodes: int | None = None) -> Path:
        image = tmp_path / f"{name}.img"
        with image.open("wb") as f:
            f.truncate(size_kib << 10)
        _run("mkfs.ext4", "-q", "-F", *(("-N", str(inodes)) if inodes else ()), str(image))
        device = _run("losetup", "--find", "--show", str(image))
        project = compiles.root / name
        project.mkdir()
        made.append((project, device))
        _run("mount", device, str(project))
        _run("nsenter", "-t", engine_pid, "-m", "mount", device, str(project))
        shutil.rmtree(project / "lost+found")
        return project

    yield make
    for project, device in made:
        subprocess.run(["nsenter", "-t", engine_pid, "-m", "umount", str(project)], check=False)
        # Refused (busy) while the broker holds the dir its warm container binds (an O_PATH
        # fd, init.broker.pool.hold_dir): it lets go once the container retires (IDLE).
        wait_for(partial(_unmounted, project), 30, f"{project} to be unmounted")
        subprocess.run(["losetup", "-d", device], check=False)


def _unmounted(point: Path) -> bool:
    return subprocess.run(["umount", str(point)], capture_output=True).returncode == 0


def _fill_bytes(project: Path) -> None:
    """Fill the disk to its last block, as another project or a runaway log would."""
    with (project / "filler").open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for _ in range(1000):  # the last partial blocks
        try:
            (project / "filler").open("ab").write(b"\0" * 1024)
        except OSError:
            break


def _fill_inodes(project: Path) -> None:
    for i in range(100_000):
        try:
            (project / f"f{i}").touch()
        except OSError:
            return


def _compile_in(compiles: Compiles, project: Path) -> tuple[int, dict[str, object], str]:
    (project / "main.tex").write_text(HELLO)
    chown_tree(project, WWW_DATA)
    return compiles.compile(project)


def test_a_full_compile_dir_is_no_space_naming_the_disk(
    compiles: Compiles, small_disk: SmallDisk
) -> None:
    project = small_disk("fullbytes", 2048)
    (project / "main.tex").write_text(HELLO)  # the project is there, then the disk fills up
    _fill_bytes(project)
    code, result, stderr = _compile_in(compiles, project)
    assert code == 73, (result, stderr)
    assert result["status"] == "no_space" and result["exit_status"] == 73
    reason = str(result["reason"])
    assert reason.startswith(f"no space: the compile dir {project} is on a full disk ("), reason
    assert "free of" in reason and "larger volume" in reason
    compiles.wait_no_containers()


def test_a_compile_dir_out_of_inodes_is_no_space_naming_the_inodes(
    compiles: Compiles, small_disk: SmallDisk
) -> None:
    project = small_disk("fullinodes", 4096, inodes=64)
    (project / "main.tex").write_text(HELLO)
    _fill_inodes(project)
    code, result, stderr = _compile_in(compiles, project)
    assert code == 73, (result, stderr)
    assert "inodes free" in str(result["reason"]), result
    compiles.wait_no_containers()


def test_the_same_project_compiles_once_there_is_room(
    compiles: Compiles, small_disk: SmallDisk
) -> None:
    project = small_disk("roomagain", 4096)
    (project / "main.tex").write_text(HELLO)
    _fill_bytes(project)
    assert _compile_in(compiles, project)[0] == 73
    os.unlink(project / "filler")
    code, result, stderr = _compile_in(compiles, project)
    assert code == 0, (result, stderr)
