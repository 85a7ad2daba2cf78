"""Whether docker-in-docker can work here, judged by what an inner dockerd really needs.

Never by comparing CapEff with a full mask: a host or VM with a reduced bounding set (this
kind of VM lacks CAP_SYS_RESOURCE) is still privileged, and dockerd >= 23 runs `--privileged`
containers there. So: the capabilities dind uses, a writable cgroup tree, and device access.
"""

from __future__ import annotations

from pathlib import Path

from init.checks import Check, Status
from init.engine import mountinfo

NAME = "privileges"
FIX = (
    "run the container with `--privileged`; or use sibling containers: "
    "`--env SANDBOXED_COMPILES_SIBLING_CONTAINERS=true "
    "-v /var/run/docker.sock:/var/run/docker.sock`"
)
# Capability numbers from linux/capability.h, each with why the inner engine needs it.
NEEDED_CAPABILITIES = {
    21: "CAP_SYS_ADMIN",  # namespaces, and every mount: layers, cgroups, each container's /proc
    12: "CAP_NET_ADMIN",  # each container's network namespace, its loopback, the bridge
    27: "CAP_MKNOD",  # the device nodes of each container's /dev
}
ALL_THERE = (
    "CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_MKNOD effective; cgroups writable; all devices allowed"
)
CGROUP_ROOT = "/sys/fs/cgroup"
ALL_DEVICES = "a *:* rwm"  # the v1 devices whitelist of a `--privileged` container


def check(root: Path = Path("/")) -> Check:
    """The `privileges` check: OK, or FAIL naming each missing need and the fix."""
    missing = missing_needs(root)
    if missing:
        message = f"docker-in-docker needs `--privileged` ({', '.join(missing)})"
        return Check(NAME, Status.FAIL, message, FIX)
    return Check(NAME, Status.OK, ALL_THERE)


def missing_needs(root: Path = Path("/")) -> list[str]:
    """What docker-in-docker needs and lacks here, one short phrase each; empty when all set."""
    return [
        *_missing_capabilities(root / "proc/self/status"),
        *_read_only_cgroups(root / "proc/self/mountinfo"),
        *_restricted_devices(root / "sys/fs/cgroup/devices/devices.list"),
    ]


def effective_capabilities(status_file: Path) -> int | None:
    """The CapEff mask from a `/proc/<pid>/status` file; None when it cannot be read."""
    try:
        text = status_file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                return None
    return None


def _missing_capabilities(status_file: Path) -> list[str]:
    effective = effective_capabilities(status_file)
    if effective is None:
        return [f"cannot read CapEff from {status_file}"]
    return [
        f"{name} missing from the effective set"
        for number, name in NEEDED_CAPABILITIES.items()
        if not effective & (1 << number)
    ]


def _read_only_cgroups(mountinfo: Path) -> list[str]:
    # The mount /sys/fs/cgroup lives on (a plain container mounts it, or /sys, read-only) and
    # every cgroup hierarchy under it: the inner dockerd makes a cgroup per container in each.
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return [f"cannot read {mountinfo}"]
    mounts: dict[str, tuple[str, bool]] = {}  # mount point: (fs type, read-only); last wins
    for line in lines:
        parsed = _parse_mountinfo_line(line)
        if parsed is not None:
            point, fs_type, ro = parsed
            mounts[point] = (fs_type, ro)
    # The mount /sys/fs/cgroup itself lives on: its own, or /sys or / when nothing is there.
    holder = max((p for p in mounts if _is_within(CGROUP_ROOT, p)), key=len, default=None)
    read_only = [holder] if holder is not None and mounts[holder][1] else []
    read_only += sorted(
        point
        for point, (fs_type, ro) in mounts.items()
        if ro and _is_within(point, CGROUP_ROOT + "/") and fs_type in ("cgroup", "cgroup2")
    )
    if not read_only:
        return []
    first = read_only[0]
    where = (
        f"{first} mounted read-only"
        if first.startswith(CGROUP_ROOT)
        else f"{CGROUP_ROOT} on a read-only mount ({first})"
    )
    more = len(read_only) - 1
    return [f"{where} and {more} more cgroup mounts" if more else where]


def _is_within(path: str, mount_point: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def _parse_mountinfo_line(line: str) -> tuple[str, str, bool] | None:
    """(mount point, fs type, read-only) from one mountinfo line; None for a malformed one."""
    found = mountinfo.parse_line(line)
    return None if found is None else (found.point, found.fs_type, found.read_only)


def _restricted_devices(devices_list: Path) -> list[str]:
    # cgroup v1 only (v2 controls devices with eBPF and has no such file): the inner dockerd's
    # containers get a subset of this whitelist, and their /dev needs more than a plain
    # container's few devices.
    if not devices_list.exists():
        return []
    try:
        entries = [entry.strip() for entry in devices_list.read_text().splitlines()]
    except OSError:
        return [f"cannot read {devices_list}"]
    if ALL_DEVICES in entries:
        return []
    return [f"the devices cgroup allows only {len(entries)} device rules, not `{ALL_DEVICES}`"]
