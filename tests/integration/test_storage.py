"""The storage plan on real filesystems: the ctypes statfs, and real overlay and tmpfs mounts.

The mounts are made in a private mount namespace (`unshare --mount --propagation private`), so
they vanish with the snippet that made them and the host never sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from init.checks import Status
from init.engine import storage
from tests.integration.conftest import require

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]

# Runs inside the private mount namespace: mounts an overlay and a tmpfs under argv[1] and
# prints the plans for them as JSON.
SNIPPET = """
import json, subprocess, sys
from dataclasses import asdict
from pathlib import Path
from init.engine import storage

base = Path(sys.argv[1])
for name in ("lower", "upper", "work", "merged", "memory"):
    (base / name).mkdir()
layers = f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work"
subprocess.run(["mount", "-t", "overlay", "-o", layers, "overlay", base / "merged"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", base / "memory"], check=True)
plans = {
    "overlay": storage.plan(base / "merged/var/lib/docker", None, 0),
    "overlay+vfs": storage.plan(base / "merged/var/lib/docker", "vfs", 0),
    "tmpfs": storage.plan(base / "memory", None, 64 * 2**20),
}
print(json.dumps({k: asdict(p) | {"line": storage.check(p).line()} for k, p in plans.items()},
                 default=str))
"""


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    require(os.geteuid() == 0, "needs root")


def kernel_says(path: Path) -> int:
    """f_type as coreutils' stat reads it: a second opinion on the ctypes structure."""
    out = subprocess.run(
        ["stat", "--file-system", "--format=%t", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout, 16)


def test_ctypes_statfs_agrees_with_stat_and_statvfs(tmp_path: Path) -> None:
    f_type, f_bavail, f_frsize = storage.libc_statfs(tmp_path)
    assert f_type == kernel_says(tmp_path)
    vfs = os.statvfs(tmp_path)
    assert f_frsize == vfs.f_frsize
    # Free space moves while the suite writes; the field offsets being right is what counts.
    assert abs(f_bavail - vfs.f_bavail) * f_frsize < 256 * 2**20


def test_plan_on_this_machines_tmp_dir(tmp_path: Path) -> None:
    plan = storage.plan(tmp_path / "var/lib/docker", None, 0)
    assert plan.fs_type == storage.FS_TYPES[kernel_says(tmp_path)]
    if kernel_says(tmp_path) == 0xEF53:  # this VM's root
        assert plan.fs_type == "ext4"
        assert storage.check(plan).status is Status.OK
        assert storage.dockerd_args(plan) == []
    assert plan.free_bytes > 0


def test_statfs_of_a_missing_path_raises_its_errno(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        storage.libc_statfs(tmp_path / "missing")


@pytest.fixture
def mounted_plans(tmp_path: Path) -> dict[str, dict[str, Any]]:
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    require("overlay" in Path("/proc/filesystems").read_text(), "needs overlayfs in the kernel")
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            SNIPPET,
            str(tmp_path),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    plans: dict[str, dict[str, Any]] = json.loads(done.stdout)
    return plans


def test_a_real_overlay_mount_is_refused_with_the_volume_fix(
    mounted_plans: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    plan = mounted_plans["overlay"]
    assert plan["fs_type"] == "overlay"
    assert plan["driver"] is None
    assert "layered filesystem" in plan["refused"]
    assert plan["fix"].startswith(
        f"-v /var/sharelatex/docker-images:{tmp_path}/merged/var/lib/docker "
    )
    assert plan["line"].startswith("FAIL storage: ")


def test_a_real_overlay_mount_with_vfs_opted_in_uses_vfs(
    mounted_plans: dict[str, dict[str, Any]],
) -> None:
    plan = mounted_plans["overlay+vfs"]
    assert (plan["fs_type"], plan["driver"], plan["refused"]) == ("overlay", "vfs", "")
    assert plan["line"].startswith("WARN storage: ")


def test_a_real_tmpfs_mount_warns_of_memory_and_space(
    mounted_plans: dict[str, dict[str, Any]],
) -> None:
    plan = mounted_plans["tmpfs"]
    assert (plan["fs_type"], plan["driver"], plan["refused"]) == ("tmpfs", None, "")
    assert plan["free_bytes"] == 16 * 2**20
    assert any("in memory" in w for w in plan["warnings"])
    assert any("only 0.0 GB free" in w for w in plan["warnings"])


def test_the_mounts_stayed_in_their_namespace(
    mounted_plans: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    assert not os.path.ismount(tmp_path / "merged")
    assert not os.path.ismount(tmp_path / "memory")
