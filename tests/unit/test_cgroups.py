"""cgroups plans against fake /proc and /sys/fs/cgroup trees under tmp_path; apply with fakes."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from init.engine import cgroups
from init.engine.cgroups import (
    EnableControllers,
    MountHierarchy,
    MountTmpfs,
    MountUnified,
    MoveProcs,
    Symlink,
    Version,
)
from init.errors import EngineError

CG = Path("/sys/fs/cgroup")

# This VM: each controller its own hierarchy, net_cls & co on none (so on the unified one).
HYBRID_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
cpu\t1\t1\t1
cpuacct\t2\t1\t1
blkio\t7\t1\t1
memory\t4\t16\t1
devices\t5\t1\t1
freezer\t6\t1\t1
net_cls\t0\t1\t1
perf_event\t0\t1\t1
net_prio\t0\t1\t1
hugetlb\t0\t1\t1
pids\t8\t1\t1
"""
HYBRID_MOUNTS = [
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
    "23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw",
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
    "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct",
    "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset",
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
    "36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices",
    "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer",
    "38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio",
    "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids",
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd",
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
]

# A systemd v1 host as a privileged container sees it: co-mounted cpu,cpuacct and net_cls,net_prio.
COMOUNTED_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t2\t1\t1
cpu\t3\t60\t1
cpuacct\t3\t60\t1
blkio\t4\t60\t1
memory\t5\t90\t1
devices\t6\t60\t1
freezer\t7\t1\t1
net_cls\t8\t1\t1
perf_event\t9\t1\t1
net_prio\t8\t1\t1
hugetlb\t10\t1\t1
pids\t11\t66\t1
rdma\t12\t1\t0
"""
COMOUNTED_NAMES = [
    ("cpuset",),
    ("cpu", "cpuacct"),
    ("blkio",),
    ("memory",),
    ("devices",),
    ("freezer",),
    ("net_cls", "net_prio"),
    ("perf_event",),
    ("hugetlb",),
    ("pids",),
]
BASE_MOUNTS = [
    "700 600 0:80 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w",
    "702 700 0:82 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw",
]
TMPFS = "703 702 0:83 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755"

V2_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc\n"
ALL_ZERO_CGROUPS = "".join(
    f"{name}\t0\t1\t1\n" for name in ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")
)


def cgroup_line(number: int, directory: str, options: str, mode: str = "rw") -> str:
    """A mountinfo line of a v1 hierarchy mounted at /sys/fs/cgroup/<directory>."""
    return (
        f"{number} 703 0:{number} / /sys/fs/cgroup/{directory} {mode},nosuid,nodev,noexec,"
        f"relatime - cgroup cgroup {mode},{options}"
    )


def comounted_mounts() -> list[str]:
    """Every hierarchy of COMOUNTED_CGROUPS mounted at its systemd name, and name=systemd."""
    lines = [*BASE_MOUNTS, TMPFS]
    for number, names in enumerate(COMOUNTED_NAMES, start=710):
        lines.append(cgroup_line(number, ",".join(names), ",".join(names)))
    lines.append(cgroup_line(730, "systemd", "xattr,name=systemd"))
    return lines


def fake_root(
    tmp_path: Path,
    mounts: list[str],
    proc_cgroups: str | None,
    links: dict[str, str] | None = None,
    unified: dict[str, str] | None = None,
) -> Path:
    """A /proc/self/mountinfo, /proc/cgroups and /sys/fs/cgroup tree under tmp_path.

    Each mount under /sys/fs/cgroup gets its directory; `links` become symlinks there; the
    files of `unified` are written at /sys/fs/cgroup itself (a cgroup2 root).
    """
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text("\n".join(mounts) + "\n")
    if proc_cgroups is not None:
        (tmp_path / "proc/cgroups").write_text(proc_cgroups)
    cgroup_dir = tmp_path / "sys/fs/cgroup"
    cgroup_dir.mkdir(parents=True)
    for line in mounts:
        point = Path(line.split()[4])
        if point.is_relative_to(CG) and point != CG:
            (tmp_path / point.relative_to("/")).mkdir(parents=True, exist_ok=True)
    for name, target in (links or {}).items():
        (cgroup_dir / name).symlink_to(target)
    for name, text in (unified or {}).items():
        (cgroup_dir / name).write_text(text)
    return tmp_path


def v2_root(tmp_path: Path, procs: str, subtree: str = "", namespace_root: bool = True) -> Path:
    mounts = [
        *BASE_MOUNTS,
        "703 702 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw",
    ]
    files = {
        "cgroup.controllers": V2_CONTROLLERS,
        "cgroup.subtree_control": subtree,
        "cgroup.procs": procs,
    }
    if namespace_root:
        files["cgroup.type"] = "domain\n"
    return fake_root(tmp_path, mounts, ALL_ZERO_CGROUPS, unified=files)


class FakeMounts:
    """mount(2) for a fake tree: records each call and adds its line to the fake mountinfo."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, source: str, target: Path, fs_type: str, options: str) -> None:
        point = "/" + str(target.relative_to(self.root))
        self.calls.append((fs_type, point, options))
        super_options = f"rw,{options}" if options else "rw"
        line = f"{900 + len(self.calls)} 1 0:99 / {point} rw,relatime - {fs_type} x {super_options}"
        with (self.root / "proc/self/mountinfo").open("a") as mountinfo:
            mountinfo.write(line + "\n")


# -- v1 ----------------------------------------------------------------------------------------


def test_v1_separate_controllers_mounts_only_the_missing_hierarchies(tmp_path: Path) -> None:
    mounts = [line for line in HYBRID_MOUNTS if "/memory" not in line and "/systemd" not in line]
    root = fake_root(tmp_path, mounts, HYBRID_CGROUPS)
    plan = cgroups.plan(root)
    assert plan.version is Version.HYBRID
    assert plan.problem is None
    assert plan.actions == (
        MountHierarchy(("memory",), CG / "memory"),
        MountHierarchy(("none", "name=systemd"), CG / "systemd"),
    )


def test_v1_comounted_hierarchies_mounted_get_their_missing_links(tmp_path: Path) -> None:
    root = fake_root(tmp_path, comounted_mounts(), COMOUNTED_CGROUPS)
    plan = cgroups.plan(root)
    assert plan.version is Version.V1
    assert plan.actions == (
        Symlink(CG / "cpu", "cpu,cpuacct"),
        Symlink(CG / "cpuacct", "cpu,cpuacct"),
        Symlink(CG / "net_cls", "net_cls,net_prio"),
        Symlink(CG / "net_prio", "net_cls,net_prio"),
    )


def test_v1_nothing_mounted_mounts_a_tmpfs_every_hierarchy_once_and_links(tmp_path: Path) -> None:
    root = fake_root(tmp_path, BASE_MOUNTS, COMOUNTED_CGROUPS)
    plan = cgroups.plan(root)
    assert plan.version is Version.V1
    assert plan.actions == (
        MountTmpfs(CG),
        MountHierarchy(("cpuset",), CG / "cpuset"),
        MountHierarchy(("cpu", "cpuacct"), CG / "cpu,cpuacct"),
        Symlink(CG / "cpu", "cpu,cpuacct"),
        Symlink(CG / "cpuacct", "cpu,cpuacct"),
        MountHierarchy(("blkio",), CG / "blkio"),
        MountHierarchy(("memory",), CG / "memory"),
        MountHierarchy(("devices",), CG / "devices"),
        MountHierarchy(("freezer",), CG / "freezer"),
        MountHierarchy(("net_cls", "net_prio"), CG / "net_cls,net_prio"),
        Symlink(CG / "net_cls", "net_cls,net_prio"),
        Symlink(CG / "net_prio", "net_cls,net_prio"),
        MountHierarchy(("perf_event",), CG / "perf_event"),
        MountHierarchy(("hugetlb",), CG / "hugetlb"),
        MountHierarchy(("pids",), CG / "pids"),  # rdma is disabled: not mounted
        MountHierarchy(("none", "name=systemd"), CG / "systemd"),
    )


def test_hybrid_as_on_this_machine_is_complete(tmp_path: Path) -> None:
    # net_cls, perf_event, net_prio and hugetlb sit on no v1 hierarchy: left to the unified one.
    plan = cgroups.plan(fake_root(tmp_path, HYBRID_MOUNTS, HYBRID_CGROUPS))
    assert plan.version is Version.HYBRID
    assert plan.empty
    assert cgroups.describe(plan) == [f"{Version.HYBRID.value}: already set up, nothing to do"]


def test_a_tmpfs_mounted_over_the_tree_hides_the_hierarchies_below_it(tmp_path: Path) -> None:
    # What a private mount namespace shows after `mount -t tmpfs tmpfs /sys/fs/cgroup`: the old
    # hierarchy mounts are still listed, earlier, but no longer reachable.
    fresh = "99 31 0:99 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw"
    root = fake_root(tmp_path, [*HYBRID_MOUNTS, fresh], HYBRID_CGROUPS)
    for child in (root / "sys/fs/cgroup").iterdir():
        child.rmdir()  # the fresh tmpfs is empty
    plan = cgroups.plan(root)
    assert plan.version is Version.V1
    assert plan.actions == (
        MountHierarchy(("cpu",), CG / "cpu"),
        MountHierarchy(("cpuacct",), CG / "cpuacct"),
        MountHierarchy(("cpuset",), CG / "cpuset"),
        MountHierarchy(("memory",), CG / "memory"),
        MountHierarchy(("devices",), CG / "devices"),
        MountHierarchy(("freezer",), CG / "freezer"),
        MountHierarchy(("blkio",), CG / "blkio"),
        MountHierarchy(("pids",), CG / "pids"),
        MountHierarchy(("none", "name=systemd"), CG / "systemd"),
    )


# -- the wrapdocker traps: check before mounting or linking --------------------------------------


def test_complete_comounted_tree_is_left_alone(tmp_path: Path) -> None:
    links = {
        "cpu": "cpu,cpuacct",
        "cpuacct": "cpu,cpuacct",
        "net_cls": "net_cls,net_prio",
        "net_prio": "/sys/fs/cgroup/net_cls,net_prio",  # absolute, still right
    }
    plan = cgroups.plan(fake_root(tmp_path, comounted_mounts(), COMOUNTED_CGROUPS, links))
    assert plan.empty


def test_systemd_hierarchy_already_mounted_gets_no_link_into_it(tmp_path: Path) -> None:
    # wrapdocker's `ln -s name=systemd /sys/fs/cgroup/systemd` put the link inside the mounted
    # hierarchy: "failed to create symbolic link '/sys/fs/cgroup/systemd/name=systemd'".
    root = fake_root(tmp_path, comounted_mounts(), COMOUNTED_CGROUPS)
    actions = cgroups.plan(root).actions
    assert all(a.target != CG / "systemd" for a in actions if isinstance(a, MountHierarchy))
    assert all("systemd" not in str(a.name) for a in actions if isinstance(a, Symlink))


def test_hierarchy_mounted_under_another_name_is_reached_by_links(tmp_path: Path) -> None:
    mounts = [line.replace("/cpu,cpuacct ", "/cpuacct,cpu ") for line in comounted_mounts()]
    links = {"net_cls": "net_cls,net_prio", "net_prio": "net_cls,net_prio"}
    plan = cgroups.plan(fake_root(tmp_path, mounts, COMOUNTED_CGROUPS, links))
    assert plan.actions == (
        Symlink(CG / "cpu", "cpuacct,cpu"),
        Symlink(CG / "cpuacct", "cpuacct,cpu"),
        Symlink(CG / "cpu,cpuacct", "cpuacct,cpu"),
    )


def test_stale_link_is_replaced_and_a_directory_in_its_place_gets_the_mount(
    tmp_path: Path,
) -> None:
    links = {"cpu": "gone", "net_cls": "net_cls,net_prio", "net_prio": "net_cls,net_prio"}
    root = fake_root(tmp_path, comounted_mounts(), COMOUNTED_CGROUPS, links)
    (root / "sys/fs/cgroup/cpuacct").mkdir()
    plan = cgroups.plan(root)
    assert plan.actions == (
        Symlink(CG / "cpu", "cpu,cpuacct"),
        MountHierarchy(("cpu", "cpuacct"), CG / "cpuacct"),
    )


def test_a_file_in_the_way_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    root = fake_root(tmp_path, [*BASE_MOUNTS, TMPFS], HYBRID_CGROUPS)
    (root / "sys/fs/cgroup/memory").write_text("")
    plan = cgroups.plan(root)
    assert plan.actions == ()
    assert isinstance(plan.problem, EngineError)
    assert plan.problem.message == (
        "cannot set up the cgroup tree: /sys/fs/cgroup/memory is a file in the way"
    )
    with pytest.raises(EngineError):
        cgroups.apply(plan, root, mount=FakeMounts(root))


def test_apply_then_plan_again_is_empty(tmp_path: Path) -> None:
    root = fake_root(tmp_path, BASE_MOUNTS, COMOUNTED_CGROUPS)
    mounts = FakeMounts(root)
    cgroups.apply(cgroups.plan(root), root, mount=mounts)
    assert mounts.calls[:3] == [
        ("tmpfs", "/sys/fs/cgroup", "mode=755"),
        ("cgroup", "/sys/fs/cgroup/cpuset", "cpuset"),
        ("cgroup", "/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct"),
    ]
    assert mounts.calls[-1] == ("cgroup", "/sys/fs/cgroup/systemd", "none,name=systemd")
    assert (root / "sys/fs/cgroup/cpu").readlink() == Path("cpu,cpuacct")
    assert (root / "sys/fs/cgroup/net_prio").readlink() == Path("net_cls,net_prio")
    again = cgroups.plan(root)
    assert again.empty
    cgroups.apply(again, root, mount=mounts)
    assert len(mounts.calls) == 12  # the tmpfs, ten hierarchies, name=systemd; nothing twice


def test_apply_replaces_a_stale_link(tmp_path: Path) -> None:
    links = {"cpu": "gone", "net_cls": "net_cls,net_prio", "net_prio": "net_cls,net_prio"}
    root = fake_root(tmp_path, comounted_mounts(), COMOUNTED_CGROUPS, links)
    cgroups.apply(cgroups.plan(root), root, mount=FakeMounts(root))
    assert (root / "sys/fs/cgroup/cpu").readlink() == Path("cpu,cpuacct")
    assert cgroups.plan(root).empty


# -- read-only ---------------------------------------------------------------------------------


def test_read_only_v1_tree_is_a_problem_naming_privileged(tmp_path: Path) -> None:
    # `docker run` without --privileged on a v1 host.
    mounts = [
        *BASE_MOUNTS,
        "703 702 0:83 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - tmpfs tmpfs ro,mode=755",
        cgroup_line(711, "cpu,cpuacct", "cpu,cpuacct", mode="ro"),
        cgroup_line(713, "memory", "memory", mode="ro"),
    ]
    root = fake_root(tmp_path, mounts, COMOUNTED_CGROUPS)
    plan = cgroups.plan(root)
    assert plan.actions == ()
    assert isinstance(plan.problem, EngineError)
    assert plan.problem.message == "/sys/fs/cgroup and 2 more cgroup mounts mounted read-only"
    assert "--privileged" in plan.problem.fix
    assert cgroups.describe(plan) == [f"{Version.V1.value}: {plan.problem}"]
    with pytest.raises(EngineError) as raised:
        cgroups.apply(plan, root, mount=FakeMounts(root))
    assert raised.value is plan.problem


def test_read_only_cgroup2_is_a_problem_naming_privileged(tmp_path: Path) -> None:
    mounts = [
        *BASE_MOUNTS,
        "703 702 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw",
    ]
    files = {
        "cgroup.controllers": V2_CONTROLLERS,
        "cgroup.subtree_control": "",
        "cgroup.procs": "1",
    }
    plan = cgroups.plan(fake_root(tmp_path, mounts, ALL_ZERO_CGROUPS, unified=files))
    assert plan.version is Version.V2
    assert plan.actions == ()
    assert plan.problem is not None
    assert plan.problem.message == "/sys/fs/cgroup mounted read-only"
    assert "--privileged" in plan.problem.fix


# -- v2 ----------------------------------------------------------------------------------------

ALL_V2 = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")


def test_v2_empty_root_enables_every_controller(tmp_path: Path) -> None:
    plan = cgroups.plan(v2_root(tmp_path, procs=""))
    assert plan.version is Version.V2
    assert plan.actions == (EnableControllers(CG, ALL_V2),)


def test_v2_processes_in_the_root_move_to_init_first(tmp_path: Path) -> None:
    plan = cgroups.plan(v2_root(tmp_path, procs="1\n57\n"))
    assert plan.actions == (MoveProcs(CG, "init"), EnableControllers(CG, ALL_V2))
    assert cgroups.describe(plan) == [
        "moving the processes of /sys/fs/cgroup into /sys/fs/cgroup/init to delegate controllers",
        f"enabling {' '.join(ALL_V2)} in /sys/fs/cgroup/cgroup.subtree_control",
    ]


def test_v2_host_root_cgroup_keeps_its_processes(tmp_path: Path) -> None:
    # The host's own root (no cgroup.type) may delegate with processes in it; kernel threads
    # there could not be moved anyway.
    plan = cgroups.plan(v2_root(tmp_path, procs="1\n2\n", namespace_root=False))
    assert plan.actions == (EnableControllers(CG, ALL_V2),)


def test_v2_partly_delegated_enables_only_the_rest(tmp_path: Path) -> None:
    plan = cgroups.plan(v2_root(tmp_path, procs="", subtree="cpuset cpu io memory\n"))
    assert plan.actions == (EnableControllers(CG, ("hugetlb", "pids", "rdma", "misc")),)


def test_v2_fully_delegated_is_empty(tmp_path: Path) -> None:
    plan = cgroups.plan(v2_root(tmp_path, procs="", subtree=V2_CONTROLLERS))
    assert plan.empty


def test_v2_nothing_mounted_and_no_v1_hierarchy_mounts_cgroup2(tmp_path: Path) -> None:
    plan = cgroups.plan(fake_root(tmp_path, BASE_MOUNTS, ALL_ZERO_CGROUPS))
    assert plan.version is Version.V2
    assert plan.actions == (MountUnified(CG),)


def test_v2_mounted_by_apply_is_then_delegated(tmp_path: Path) -> None:
    root = fake_root(tmp_path, BASE_MOUNTS, ALL_ZERO_CGROUPS)
    files = {"cgroup.controllers": "cpu memory\n", "cgroup.subtree_control": "", "cgroup.procs": ""}
    for name, text in {**files, "cgroup.type": "domain\n"}.items():
        (root / "sys/fs/cgroup" / name).write_text(text)  # what the mount will show
    mounts, writes = FakeMounts(root), FakeCgroupWrites(root, busy_times=0)
    cgroups.apply(cgroups.plan(root), root, mount=mounts, write=writes)
    assert mounts.calls == [("cgroup2", "/sys/fs/cgroup", "")]
    assert writes.written == [("cgroup.subtree_control", "+cpu +memory")]


def test_read_layout_then_plan_is_the_same_as_plan_of_the_root(tmp_path: Path) -> None:
    root = v2_root(tmp_path, procs="7\n")
    layout = cgroups.read_layout(root)
    assert layout.unified == cgroups.Unified(ALL_V2, (), (7,), namespace_root=True)
    assert cgroups.plan(layout) == cgroups.plan(root)


class FakeCgroupWrites:
    """write(2) to cgroup files: moves a pid out of the fake root; EBUSY while one is left."""

    def __init__(self, root: Path, busy_times: int, late_pid: int | None = None) -> None:
        self.procs = root / "sys/fs/cgroup/cgroup.procs"
        self.busy_times = busy_times
        self.late_pid = late_pid
        self.written: list[tuple[str, str]] = []

    def __call__(self, path: Path, data: bytes) -> None:
        self.written.append(
            (path.name if path.parent.name != "init" else "init/" + path.name, data.decode())
        )
        if path.name == "cgroup.procs":
            left = [p for p in self.procs.read_text().split() if p != data.decode().strip()]
            self.procs.write_text("\n".join(left))
            return
        if self.late_pid is not None:  # a `docker exec` lands in the root after the move
            self.procs.write_text(f"{self.late_pid}\n")
            self.late_pid = None
        if self.busy_times > 0 or self.procs.read_text().split():
            self.busy_times -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")


def test_v2_apply_moves_every_process_then_enables(tmp_path: Path) -> None:
    root = v2_root(tmp_path, procs="1\n57\n")
    writes = FakeCgroupWrites(root, busy_times=0)
    cgroups.apply(cgroups.plan(root), root, write=writes)
    assert (root / "sys/fs/cgroup/init").is_dir()
    assert writes.written == [
        ("init/cgroup.procs", "1\n"),
        ("init/cgroup.procs", "57\n"),
        ("cgroup.subtree_control", " ".join(f"+{c}" for c in ALL_V2)),
    ]


def test_v2_apply_moves_a_process_that_joined_meanwhile_and_retries(tmp_path: Path) -> None:
    root = v2_root(tmp_path, procs="1\n")
    writes = FakeCgroupWrites(root, busy_times=0, late_pid=99)
    cgroups.apply(cgroups.plan(root), root, write=writes)
    assert [data for name, data in writes.written if name == "init/cgroup.procs"] == ["1\n", "99\n"]
    assert [name for name, _ in writes.written].count("cgroup.subtree_control") == 2


def test_v2_apply_gives_up_after_a_bounded_number_of_attempts(tmp_path: Path) -> None:
    root = v2_root(tmp_path, procs="1\n")
    writes = FakeCgroupWrites(root, busy_times=1000)
    with pytest.raises(EngineError, match="attempts"):
        cgroups.apply(cgroups.plan(root), root, write=writes)
    subtree_writes = [name for name, _ in writes.written if name == "cgroup.subtree_control"]
    assert len(subtree_writes) == cgroups.DELEGATE_ATTEMPTS


def test_describe_gives_one_line_per_action(tmp_path: Path) -> None:
    plan = cgroups.plan(fake_root(tmp_path, BASE_MOUNTS, COMOUNTED_CGROUPS))
    lines = cgroups.describe(plan)
    assert len(lines) == len(plan.actions)
    assert lines[0] == "mounting a tmpfs at /sys/fs/cgroup (nothing mounted there)"
    assert lines[2] == "mounting the cgroup hierarchy cpu,cpuacct at /sys/fs/cgroup/cpu,cpuacct"
    assert lines[3] == "linking /sys/fs/cgroup/cpu -> cpu,cpuacct"


def test_unreadable_mountinfo_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="mountinfo"):
        cgroups.plan(tmp_path)
