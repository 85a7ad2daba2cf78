from __future__ import annotations

from pathlib import Path

import pytest

from init.checks import Status
from init.engine import storage
from init.errors import ConfigError, EngineError

GB = 10**9
EXT4, XFS, BTRFS, ZFS = 0xEF53, 0x58465342, 0x9123683E, 0x2FC12FC1
OVERLAY, AUFS, TMPFS, NFS, FUSE = 0x794C7630, 0x61756673, 0x01021994, 0x6969, 0x65735546
VOLUME = "-v /var/sharelatex/docker-images:/var/lib/docker"


class FakeStatfs:
    """statfs for any filesystem: remembers the paths asked about."""

    def __init__(self, f_type: int, free: int = 100 * GB) -> None:
        self.f_type = f_type
        self.free = free
        self.asked: list[Path] = []

    def __call__(self, path: Path) -> tuple[int, int, int]:
        self.asked.append(path)
        return self.f_type, self.free // 4096, 4096


def plan_on(
    f_type: int,
    opt_in: str | None = None,
    need: int = 0,
    free: int = 100 * GB,
    data_root: Path = Path("/var/lib/docker"),
) -> storage.StoragePlan:
    return storage.plan(data_root, opt_in, need, statfs=FakeStatfs(f_type, free))


@pytest.mark.parametrize(("f_type", "name"), [(EXT4, "ext4"), (XFS, "xfs"), (BTRFS, "btrfs")])
def test_a_real_filesystem_lets_dockerd_choose(f_type: int, name: str) -> None:
    plan = plan_on(f_type)
    assert (plan.fs_type, plan.driver, plan.refused, plan.warnings) == (name, None, "", ())
    assert plan.free_bytes == 100 * GB // 4096 * 4096
    assert storage.dockerd_args(plan) == []
    assert storage.check(plan).status is Status.OK


def test_the_ok_line_says_what_dockerd_will_use() -> None:
    line = storage.check(plan_on(EXT4)).line()
    assert line == "ok   storage: /var/lib/docker is ext4; dockerd will use overlay2"
    assert "dockerd will choose" in storage.check(plan_on(ZFS)).message


@pytest.mark.parametrize(("f_type", "name"), [(OVERLAY, "overlay"), (AUFS, "aufs")])
def test_a_layered_root_is_refused_with_the_volume_fix(f_type: int, name: str) -> None:
    plan = plan_on(f_type)
    assert plan.fs_type == name
    assert plan.driver is None
    assert "the container's own layered filesystem" in plan.refused
    assert plan.fix.startswith(VOLUME + " ")
    assert "placeholder" in plan.fix
    verdict = storage.check(plan)
    assert verdict.status is Status.FAIL
    assert verdict.fix == plan.fix
    assert plan.fix == storage.VOLUME_FIX


def test_the_volume_fix_names_the_data_root_in_use() -> None:
    plan = plan_on(OVERLAY, data_root=Path("/srv/engine"))
    assert plan.fix.startswith("-v /var/sharelatex/docker-images:/srv/engine ")


def test_a_layered_root_with_vfs_opted_in_uses_vfs_with_a_warning() -> None:
    plan = plan_on(OVERLAY, opt_in="vfs")
    assert (plan.driver, plan.refused) == ("vfs", "")
    assert storage.dockerd_args(plan) == ["--storage-driver", "vfs"]
    verdict = storage.check(plan)
    assert verdict.status is Status.WARN
    assert "full" in verdict.message and "on disk" in verdict.message


@pytest.mark.parametrize("opt_in", ["overlay2", "fuse-overlayfs", "btrfs", "zfs"])
def test_a_layered_root_refuses_every_other_opt_in(opt_in: str) -> None:
    plan = plan_on(OVERLAY, opt_in=opt_in)
    assert plan.refused and plan.fix.startswith(VOLUME)
    assert storage.dockerd_args(plan) == []


@pytest.mark.parametrize("opt_in", ["overlay2", "fuse-overlayfs"])
def test_an_opt_in_on_a_real_filesystem_is_passed_to_dockerd(opt_in: str) -> None:
    plan = plan_on(EXT4, opt_in=opt_in)
    assert storage.dockerd_args(plan) == ["--storage-driver", opt_in]
    assert storage.check(plan).status is Status.OK
    assert f"SANDBOXED_COMPILES_STORAGE_DRIVER={opt_in}" in storage.check(plan).message


def test_a_native_driver_needs_its_own_filesystem() -> None:
    assert storage.dockerd_args(plan_on(BTRFS, opt_in="btrfs")) == ["--storage-driver", "btrfs"]
    plan = plan_on(EXT4, opt_in="zfs")
    assert plan.refused == (
        "SANDBOXED_COMPILES_STORAGE_DRIVER=zfs needs /var/lib/docker on zfs, but it is on ext4"
    )
    assert "unset SANDBOXED_COMPILES_STORAGE_DRIVER" in plan.fix


@pytest.mark.parametrize("value", ["aufs", "devicemapper", "Overlay2", "vfs,overlay2"])
def test_an_opt_in_outside_the_allowed_drivers_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        plan_on(EXT4, opt_in=value)
    [problem] = raised.value.problems
    assert problem.startswith(f"SANDBOXED_COMPILES_STORAGE_DRIVER={value!r} ")
    assert "overlay2, fuse-overlayfs, btrfs, zfs, vfs" in problem


@pytest.mark.parametrize("value", [None, "", "  "])
def test_an_empty_opt_in_means_none(value: str | None) -> None:
    assert plan_on(EXT4, opt_in=value).driver is None


def test_low_free_space_warns_with_both_sizes() -> None:
    plan = plan_on(EXT4, need=3 * GB, free=1 * GB)
    assert plan.driver is None and not plan.refused
    [warning] = plan.warnings
    assert "only 1.0 GB free under /var/lib/docker" in warning
    assert "need about 3.0 GB" in warning
    assert storage.check(plan).status is Status.WARN
    assert plan_on(EXT4, need=3 * GB, free=4 * GB).warnings == ()


def test_tmpfs_warns_that_images_live_in_memory() -> None:
    plan = plan_on(TMPFS)
    assert (plan.fs_type, plan.driver, plan.refused) == ("tmpfs", None, "")
    assert "in memory" in plan.warnings[0]


@pytest.mark.parametrize(("f_type", "name"), [(NFS, "nfs"), (FUSE, "fuse")])
def test_network_and_fuse_filesystems_warn_of_the_vfs_fallback(f_type: int, name: str) -> None:
    plan = plan_on(f_type)
    assert plan.fs_type == name and not plan.refused
    assert "fall back to vfs" in plan.warnings[0] and VOLUME in plan.warnings[0]
    # With vfs chosen on purpose there is nothing to fall back from.
    assert all("fall back" not in w for w in plan_on(f_type, opt_in="vfs").warnings)


def test_an_unknown_filesystem_is_named_by_its_magic() -> None:
    plan = plan_on(0x12345678)
    assert plan.fs_type == "an unknown filesystem (0x12345678)"
    assert storage.check(plan).status is Status.OK


def test_a_missing_data_root_is_measured_at_its_nearest_parent(tmp_path: Path) -> None:
    fake = FakeStatfs(EXT4)
    plan = storage.plan(tmp_path / "var/lib/docker", None, 0, statfs=fake)
    assert fake.asked == [tmp_path]
    assert plan.data_root == tmp_path / "var/lib/docker"


def test_a_statfs_failure_is_an_engine_error(tmp_path: Path) -> None:
    def failing(path: Path) -> tuple[int, int, int]:
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(EngineError, match="cannot statfs"):
        storage.plan(tmp_path, None, 0, statfs=failing)


def test_bytes_needed_counts_full_schemes_larger() -> None:
    assert storage.bytes_needed(("tl:small",)) == storage.SMALL_IMAGE_BYTES
    assert storage.bytes_needed(("texlive-full:2023", "tl:2022")) == (
        storage.FULL_IMAGE_BYTES + storage.SMALL_IMAGE_BYTES
    )
