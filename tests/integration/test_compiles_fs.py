"""The compiles root on a filesystem of its own, for real: a loop device, mkfs.ext4, mount.

The data volume is itself a small loop-mounted ext4 made by the test (the disk Mongo and Redis
use, in Overleaf's setup): the step makes its image there, and a compile filling the compiles
root gets ENOSPC while the data dir still takes writes. Every mount and loop device made here
is under the test's own tmp dir and removed by its paths.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from init.engine import compiles_fs, mountinfo
from init.engine.compiles_fs import Action
from tests.integration import test_dind
from tests.integration.conftest import require
from tests.integration.test_dind import RunningInit

pytestmark = pytest.mark.root
MIB = 1 << 20
OWNER = (4242, 4242)  # the services' user stands in as a uid of the test's own


CLONE_NEWNS = 0x00020000
# test_dind's fixtures: PID 1 in namespaces of its own with a real inner dockerd.
short_tmp = test_dind.short_tmp
start_init = test_dind.start_init


@pytest.fixture(autouse=True, scope="module")
def _own_mount_namespace() -> None:
    """The tests' mounts in a mount namespace of the test process's own: one another process
    makes meanwhile (`unshare --mount`, as every dind test does) copies the host's mounts, and
    would keep ours, and their loop devices, for its whole life."""
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("mkfs.ext4") is not None, "needs e2fsprogs")
    require(Path("/dev/loop-control").exists(), "needs loop devices")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        pytest.fail(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)


def mounts_under(base: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [m.point for m in mountinfo.parse(text) if m.point.startswith(f"{base}/")]


def release(base: Path) -> None:
    """Unmount what is mounted under `base` (deepest first) and free loop devices whose backing
    file is under it: only the test's own."""
    for point in sorted(mounts_under(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    listed = subprocess.run(["losetup", "-ln", "-O", "NAME,BACK-FILE"], capture_output=True,
                            text=True, check=False).stdout  # fmt: skip
    for line in listed.splitlines():
        name, _, backing = line.strip().partition(" ")
        if backing.strip().startswith(f"{base}/"):
            subprocess.run(["losetup", "-d", name], check=False)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 600 MiB data volume of its own: `<volume>/data` is the data dir."""
    image, point = tmp_path / "volume.img", tmp_path / "volume"
    with open(image, "wb") as file:
        file.truncate(600 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    point.mkdir()
    try:
        subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
        (point / "data").mkdir()
        yield point
    finally:
        release(tmp_path)


def boot(compiles: Path, size: int | None, tmp: Path) -> tuple[compiles_fs.Plan, float]:
    """The boot's step as PID 1 runs it: the plan, then its child; the child's seconds."""
    plan = compiles_fs.plan(compiles, size, OWNER)
    if not plan.works:
        return plan, 0.0
    result_path = tmp / "result.json"
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", compiles_fs.MODULE, *plan.argv(result_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    seconds = time.monotonic() - began
    result = compiles_fs.Result.from_json(json.loads(result_path.read_text()))
    assert done.returncode == 0 and result.ok, (result, done.stderr)
    return plan, seconds


def fill(directory: Path, chunk: bytes) -> tuple[int, int]:
    """Write files of `chunk` until the filesystem refuses: (bytes written, the errno)."""
    written = 0
    for n in range(1_000_000):
        try:
            with open(directory / f"f{n}", "wb") as file:
                file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            written += len(chunk)
        except OSError as e:
            return written, e.errno or 0
    raise AssertionError("never refused")


def test_the_compiles_root_is_its_own_bounded_filesystem_and_the_data_dir_keeps_writing(
    volume: Path, tmp_path: Path
) -> None:
    data = volume / "data"
    compiles = data / "compiles"
    compiles.mkdir()
    (compiles / "0123-old-project").mkdir()  # CLSI's cache of an earlier run: hidden, kept
    free_before = compiles_fs.free_bytes(data)
    plan, seconds = boot(compiles, None, tmp_path)
    print(f"boot step (auto, {plan.size >> 20} MiB): {seconds:.2f} s in the child")
    assert plan.action is Action.MAKE
    assert plan.size == free_before // 2 // MIB * MIB  # auto: half the free space (< 10 GiB)
    assert str(compiles) in mounts_under(volume)
    assert os.stat(compiles).st_dev != os.stat(data).st_dev
    stats = os.statvfs(compiles)
    assert 0.9 * plan.size <= stats.f_blocks * stats.f_frsize <= plan.size
    assert 0.95 * plan.inodes <= stats.f_files <= plan.inodes  # mkfs rounds to its groups
    assert (os.stat(compiles).st_uid, os.stat(compiles).st_gid) == OWNER
    assert not (compiles / "lost+found").exists()  # CLSI's expiry would take it for a project
    assert os.listdir(compiles) == []  # the old cache hidden
    sparse = (data / "compiles.img").stat().st_blocks * 512
    assert sparse < 32 * MIB, f"the new image takes {sparse >> 20} MiB"

    # A compile filling its dir: ENOSPC at the filesystem's size, whatever its own budget.
    project = compiles / "p1"
    project.mkdir()
    began = time.monotonic()
    written, code = fill(project, b"x" * MIB)
    print(f"filled {written >> 20} MiB in {time.monotonic() - began:.2f} s, then errno {code}")
    assert code == errno.ENOSPC
    assert written <= plan.size
    # The data dir beside it (Mongo's, in Overleaf's setup) still takes writes.
    assert compiles_fs.free_bytes(data) > 200 * MIB
    (data / "mongo.bin").write_bytes(b"m" * (64 * MIB))
    assert (data / "mongo.bin").stat().st_size == 64 * MIB

    # Inodes too: empty files end with ENOSPC at the inode count.
    shutil.rmtree(project)
    many = compiles / "p2"
    many.mkdir()
    made = 0
    with pytest.raises(OSError) as refused:
        for made in range(plan.inodes + 1):
            (many / str(made)).touch()
    assert refused.value.errno == errno.ENOSPC
    assert made < plan.inodes
    assert len(os.listdir(data)) >= 3  # the data dir still makes files


def test_a_second_boot_reuses_the_image_with_its_files(volume: Path, tmp_path: Path) -> None:
    compiles = volume / "data" / "compiles"
    first, _ = boot(compiles, 256 * MIB, tmp_path)
    assert first.action is Action.MAKE
    (compiles / "p1").mkdir()
    (compiles / "p1" / "main.tex").write_text("\\documentclass{article}")
    print(compiles_fs.unmount(compiles))  # the shutdown's step
    assert str(compiles) not in mounts_under(volume)
    image = volume / "data" / "compiles.img"
    identity = image.stat().st_ino

    second, seconds = boot(compiles, 256 * MIB, tmp_path)
    print(f"second boot's step (fsck + mount): {seconds:.2f} s")
    assert second.action is Action.REUSE
    assert image.stat().st_ino == identity
    assert (compiles / "p1" / "main.tex").read_text() == "\\documentclass{article}"
    assert os.stat(compiles).st_dev != os.stat(compiles.parent).st_dev


def test_a_compiles_dir_already_mounted_is_left_alone(volume: Path, tmp_path: Path) -> None:
    compiles = volume / "data" / "compiles"
    compiles.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(compiles)], check=True)
    (compiles / "kept").write_text("mine")
    plan, _ = boot(compiles, 256 * MIB, tmp_path)
    assert plan.action is Action.MOUNTED
    assert "left as it is" in plan.notes[0]
    assert not (volume / "data" / "compiles.img").exists()
    assert (compiles / "kept").read_text() == "mine"
    assert mounts_under(volume).count(str(compiles)) == 1


def test_pid1_mounts_it_before_dockerd_and_unmounts_it_at_the_stop(
    start_init: Callable[..., RunningInit], short_tmp: Path
) -> None:
    data = short_tmp / "vol" / "data"
    data.mkdir(parents=True)
    compiles = data / "compiles"
    try:
        init = start_init(
            OVERLEAF_INIT_COMPILES_DIR=str(compiles), OVERLEAF_INIT_COMPILES_SIZE="300m"
        )
        init.wait_engine("ready")
        log = init.log()
        assert f"{compiles}: a filesystem of its own from {data}/compiles.img" in log
        assert log.index("a filesystem of its own") < log.index("dockerd")
        # doctor as `docker exec` runs it: in the container's mount namespace.
        done = subprocess.run(
            ["nsenter", "-t", str(init.init_process.pid), "-m", sys.executable, "-m", "init",
             "doctor", "--json", "--status-file", str(init.status_file)],
            capture_output=True, text=True, env=init.environ, timeout=60,
        )  # fmt: skip
        checks = json.loads(done.stdout)
        line = next(c for c in checks if c["name"] == compiles_fs.NAME)
        assert line["status"] == "ok" and "a filesystem of its own" in line["message"]
        code, _ = init.stop()
        assert code == 0
        assert f"{compiles} unmounted" in init.log()
        print("".join(line for line in init.log().splitlines(True) if "compiles" in line))
        backing = subprocess.run(["losetup", "-j", str(data / "compiles.img")],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert backing == ""  # the loop device is freed
    finally:
        release(short_tmp)
