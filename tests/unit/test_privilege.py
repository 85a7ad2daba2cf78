from __future__ import annotations

from pathlib import Path

import pytest

from init.checks import Status
from init.engine import privilege

FULL = "000001ffffffffff"
# This VM's: no CAP_SYS_RESOURCE in the bounding set, yet `--privileged` works under dockerd 26.
REDUCED_BOUNDING_SET = "000001fffeffffff"
NO_SYS_ADMIN = f"{0x1FFFFFFFFFF & ~(1 << 21):016x}"
NO_NET_ADMIN = f"{0x1FFFFFFFFFF & ~(1 << 12):016x}"
NO_MKNOD = f"{0x1FFFFFFFFFF & ~(1 << 27):016x}"
# What `docker run` without --privileged gives.
DOCKER_DEFAULT = "00000000a80425fb"

V1_MOUNTS = [
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
    "23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw",
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
    "36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices",
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd",
]
V2_MOUNTS = [
    "22 1 0:50 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w",
    "23 22 0:51 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw",
    "24 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw",
]


def fake_root(
    tmp_path: Path,
    cap_eff: str = REDUCED_BOUNDING_SET,
    mounts: list[str] = V1_MOUNTS,
    devices: str | None = "a *:* rwm\n",
) -> Path:
    """A /proc/self and /sys/fs/cgroup tree as a container would see it."""
    proc = tmp_path / "proc/self"
    proc.mkdir(parents=True)
    (proc / "status").write_text(
        f"Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t{cap_eff}\nCapEff:\t{cap_eff}\n"
        f"CapBnd:\t{cap_eff}\nCapAmb:\t0000000000000000\n"
    )
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    if devices is not None:
        devices_dir = tmp_path / "sys/fs/cgroup/devices"
        devices_dir.mkdir(parents=True)
        (devices_dir / "devices.list").write_text(devices)
    return tmp_path


@pytest.mark.parametrize("cap_eff", [FULL, REDUCED_BOUNDING_SET])
def test_privileged_with_a_full_or_reduced_bounding_set(tmp_path: Path, cap_eff: str) -> None:
    verdict = privilege.check(fake_root(tmp_path, cap_eff))
    assert verdict.status is Status.OK
    assert verdict.name == "privileges"
    assert verdict.fix == ""


def test_privileged_on_cgroup_v2_without_a_devices_list(tmp_path: Path) -> None:
    root = fake_root(tmp_path, mounts=V2_MOUNTS, devices=None)
    assert privilege.check(root).status is Status.OK


@pytest.mark.parametrize(
    ("cap_eff", "missing"),
    [
        (NO_SYS_ADMIN, "CAP_SYS_ADMIN missing from the effective set"),
        (NO_NET_ADMIN, "CAP_NET_ADMIN missing from the effective set"),
        (NO_MKNOD, "CAP_MKNOD missing from the effective set"),
    ],
)
def test_each_missing_capability_is_named(tmp_path: Path, cap_eff: str, missing: str) -> None:
    verdict = privilege.check(fake_root(tmp_path, cap_eff))
    assert verdict.status is Status.FAIL
    assert verdict.message == f"docker-in-docker needs `--privileged` ({missing})"
    assert verdict.fix == (
        "run the container with `--privileged`; or use sibling containers: "
        "`--env SANDBOXED_COMPILES_SIBLING_CONTAINERS=true "
        "-v /var/run/docker.sock:/var/run/docker.sock`"
    )


def test_a_plain_container_lacks_sys_admin_and_net_admin(tmp_path: Path) -> None:
    # docker's default set keeps CAP_MKNOD but not SYS_ADMIN or NET_ADMIN.
    assert privilege.missing_needs(fake_root(tmp_path, DOCKER_DEFAULT)) == [
        "CAP_SYS_ADMIN missing from the effective set",
        "CAP_NET_ADMIN missing from the effective set",
    ]


def test_read_only_cgroup_tree_fails(tmp_path: Path) -> None:
    mounts = [
        *V1_MOUNTS[:2],
        "31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755",
        "32 31 0:29 /docker/x /sys/fs/cgroup/cpu ro,relatime - cgroup cgroup rw,cpu",
        "36 31 0:33 /docker/x /sys/fs/cgroup/devices ro,relatime - cgroup cgroup rw,devices",
    ]
    verdict = privilege.check(fake_root(tmp_path, mounts=mounts))
    assert verdict.status is Status.FAIL
    assert "/sys/fs/cgroup mounted read-only and 2 more cgroup mounts" in verdict.message


def test_read_only_cgroup2_fails(tmp_path: Path) -> None:
    mounts = [*V2_MOUNTS[:2], "24 23 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup ro"]
    missing = privilege.missing_needs(fake_root(tmp_path, mounts=mounts, devices=None))
    assert missing == ["/sys/fs/cgroup mounted read-only"]


def test_one_read_only_controller_fails(tmp_path: Path) -> None:
    mounts = [*V1_MOUNTS, "41 31 0:38 / /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw"]
    missing = privilege.missing_needs(fake_root(tmp_path, mounts=mounts))
    assert missing == ["/sys/fs/cgroup/memory mounted read-only"]


def test_read_only_sys_without_a_cgroup_mount_fails(tmp_path: Path) -> None:
    mounts = [V1_MOUNTS[0], "23 22 0:21 / /sys ro,nosuid,nodev,noexec - sysfs sysfs ro"]
    missing = privilege.missing_needs(fake_root(tmp_path, mounts=mounts, devices=None))
    assert missing == ["/sys/fs/cgroup on a read-only mount (/sys)"]


def test_a_later_read_write_mount_over_a_read_only_one_wins(tmp_path: Path) -> None:
    mounts = [
        *V1_MOUNTS[:2],
        "30 23 0:27 / /sys/fs/cgroup ro,relatime - tmpfs tmpfs ro",
        *V1_MOUNTS[2:],
    ]
    assert privilege.missing_needs(fake_root(tmp_path, mounts=mounts)) == []


def test_escaped_mount_points_are_decoded(tmp_path: Path) -> None:
    mounts = [*V1_MOUNTS, r"50 22 0:40 / /mnt/with\040space ro,relatime - tmpfs tmpfs ro"]
    # A read-only mount elsewhere is none of dind's business.
    assert privilege.missing_needs(fake_root(tmp_path, mounts=mounts)) == []


def test_restricted_devices_whitelist_fails(tmp_path: Path) -> None:
    plain_container = "c 1:5 rwm\nc 1:3 rwm\nc 1:9 rwm\nc 5:0 rwm\nc 136:* rwm\nc 10:200 rwm\n"
    verdict = privilege.check(fake_root(tmp_path, devices=plain_container))
    assert verdict.status is Status.FAIL
    assert "the devices cgroup allows only 6 device rules, not `a *:* rwm`" in verdict.message


def test_every_missing_need_is_named_at_once(tmp_path: Path) -> None:
    mounts = [*V1_MOUNTS[:2], "31 23 0:28 / /sys/fs/cgroup ro - tmpfs tmpfs ro"]
    root = fake_root(tmp_path, DOCKER_DEFAULT, mounts=mounts, devices="c 1:3 rwm\n")
    assert len(privilege.missing_needs(root)) == 4


def test_unreadable_proc_is_a_failure_not_a_traceback(tmp_path: Path) -> None:
    verdict = privilege.check(tmp_path)
    assert verdict.status is Status.FAIL
    assert f"cannot read CapEff from {tmp_path}/proc/self/status" in verdict.message
    assert f"cannot read {tmp_path}/proc/self/mountinfo" in verdict.message


def test_line_names_the_check_and_the_fix(tmp_path: Path) -> None:
    line = privilege.check(fake_root(tmp_path, NO_SYS_ADMIN)).line()
    assert line.startswith("FAIL privileges: docker-in-docker needs `--privileged` (CAP_SYS_ADMIN")
    assert "; fix: run the container with `--privileged`" in line
