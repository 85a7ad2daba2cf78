"""Sibling mode's judgement on fake mountinfo, cgroup and inspect data (the engine: integration)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path, PurePosixPath

import pytest

from init.checks import Status
from init.engine import sibling
from init.engine.sibling import Mount, ServiceUser, SocketFacts
from init.errors import EngineError

ID = "7567a89398ce907d106521b802488ff001716c4c8fcac4ff8357c476f3a6f34d"
OTHER = "0123456789abcdef" * 4
COMPILES = PurePosixPath("/var/lib/sharelatex/data/compiles")
DOCKER_MOUNTINFO = f"""\
99 50 0:39 / / rw,relatime master:4 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X
100 99 0:43 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
105 104 0:29 /docker/{ID} /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu
120 99 254:0 /var/lib/docker/containers/{OTHER}/logs /srv/other\\040logs rw - ext4 /dev/vda rw
116 99 254:0 /var/lib/docker/containers/{ID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw
117 99 254:0 /var/lib/docker/containers/{ID}/hostname /etc/hostname rw - ext4 /dev/vda rw
118 99 254:0 /var/lib/docker/containers/{ID}/hosts /etc/hosts rw - ext4 /dev/vda rw
"""


# -- the socket --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "path"),
    [
        ({}, "/var/run/docker.sock"),
        ({"DOCKER_HOST": ""}, "/var/run/docker.sock"),
        ({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}, "/run/user/1000/docker.sock"),
    ],
)
def test_the_socket_is_the_default_or_a_unix_docker_host(
    environ: dict[str, str], path: str
) -> None:
    assert sibling.socket_path(environ) == Path(path)


@pytest.mark.parametrize("host", ["tcp://10.0.0.5:2376", "ssh://me@host", "unix://relative"])
def test_a_docker_host_that_is_not_a_unix_socket_says_to_mount_the_host_socket(host: str) -> None:
    with pytest.raises(EngineError) as raised:
        sibling.socket_path({"DOCKER_HOST": host})
    assert host in raised.value.message and "unix socket" in raised.value.message
    assert "-v /var/run/docker.sock:/var/run/docker.sock" in raised.value.fix


def test_read_socket_tells_missing_directory_socket_and_file_apart(tmp_path: Path) -> None:
    assert sibling.read_socket(tmp_path / "absent").kind == "missing"
    (tmp_path / "dir").mkdir()
    assert sibling.read_socket(tmp_path / "dir").kind == "directory"
    (tmp_path / "file").write_text("")
    assert sibling.read_socket(tmp_path / "file").kind == "other"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s"))
        os.chmod(tmp_path / "s", 0o660)
        facts = sibling.read_socket(tmp_path / "s")
    assert (facts.kind, facts.mode, facts.uid) == ("socket", 0o660, os.getuid())


def test_a_missing_socket_names_the_volume_to_add() -> None:
    verdict = sibling.socket_check(SocketFacts(Path("/var/run/docker.sock"), "missing"))
    assert verdict.status is Status.FAIL
    assert "add `-v /var/run/docker.sock:/var/run/docker.sock`" in verdict.fix


def test_a_directory_socket_says_docker_made_it_and_to_remove_it_on_the_host() -> None:
    verdict = sibling.socket_check(SocketFacts(Path("/var/run/docker.sock"), "directory", 0, 0))
    assert verdict.status is Status.FAIL
    assert "Docker created it because the host path did not exist" in verdict.message
    assert "remove that directory" in verdict.fix and "on the host" in verdict.fix
    assert "-v /var/run/docker.sock:/var/run/docker.sock" in verdict.fix


def test_a_refused_connection_says_the_host_engine_is_down_or_restarted(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: connect(2) is refused
    verdict = sibling.probe_socket(path)
    assert verdict.status is Status.FAIL
    assert "connection refused" in verdict.message
    assert "restart this container" in verdict.fix


WWW_DATA = ServiceUser("www-data", 33, frozenset({33}))


@pytest.mark.parametrize(
    ("facts", "user", "usable"),
    [
        (SocketFacts(Path("/s"), "socket", 0, 999, 0o660), WWW_DATA, False),
        (SocketFacts(Path("/s"), "socket", 0, 33, 0o660), WWW_DATA, True),
        (
            SocketFacts(Path("/s"), "socket", 0, 999, 0o660),
            ServiceUser("w", 33, frozenset({33, 999})),
            True,
        ),
        (SocketFacts(Path("/s"), "socket", 33, 0, 0o600), WWW_DATA, True),
        (SocketFacts(Path("/s"), "socket", 0, 999, 0o666), WWW_DATA, True),
        (
            SocketFacts(Path("/s"), "socket", 0, 0, 0o600),
            ServiceUser("root", 0, frozenset({0})),
            True,
        ),
        (SocketFacts(Path("/s"), "socket", 0, 33, 0o640), WWW_DATA, False),  # connect needs w
    ],
)
def test_who_may_use_the_socket_follows_its_mode(
    facts: SocketFacts, user: ServiceUser, usable: bool
) -> None:
    assert sibling.can_use(facts, user) is usable
    verdict = sibling.access_check(facts, user, user.name)
    assert verdict.status is (Status.OK if usable else Status.FAIL)


def test_a_socket_of_another_group_names_the_group_add_with_its_gid() -> None:
    facts = SocketFacts(Path("/var/run/docker.sock"), "socket", 0, 998, 0o660)
    verdict = sibling.access_check(facts, WWW_DATA, "www-data")
    assert verdict.status is Status.FAIL
    assert "www-data (uid 33" in verdict.message and "998" in verdict.message
    assert "`--group-add 998`" in verdict.fix
    assert "the init then adds www-data to that group" in verdict.fix


def test_a_root_root_socket_says_the_group_is_roots() -> None:
    facts = SocketFacts(Path("/var/run/docker.sock"), "socket", 0, 0, 0o660)
    verdict = sibling.access_check(facts, WWW_DATA, "www-data")
    assert "gid 0 is root's group" in verdict.message
    assert "`--group-add 0`" in verdict.fix


def test_an_owner_only_socket_says_what_to_change_on_the_host() -> None:
    facts = SocketFacts(Path("/var/run/docker.sock"), "socket", 0, 0, 0o600)
    verdict = sibling.access_check(facts, WWW_DATA, "www-data")
    assert verdict.status is Status.FAIL
    assert "chmod 0660" in verdict.fix and "--group-add" in verdict.fix


def test_an_unknown_service_user_is_a_warning() -> None:
    facts = SocketFacts(Path("/s"), "socket", 0, 0, 0o660)
    verdict = sibling.access_check(facts, None, "no-such-user")
    assert verdict.status is Status.WARN and "no-such-user" in verdict.message


def test_service_user_resolves_real_users() -> None:
    root = sibling.service_user("root")
    assert root is not None and root.uid == 0 and 0 in root.gids
    assert sibling.service_user("no-such-user-here") is None


@pytest.mark.parametrize(
    ("version", "status"),
    [("1.41", Status.OK), ("1.45", Status.OK), ("1.40", Status.FAIL), ("2.0", Status.OK)],
)
def test_the_engine_api_version_has_a_minimum(version: str, status: Status) -> None:
    verdict = sibling.api_version_check(version)
    assert verdict.status is status
    if status is Status.FAIL:
        assert "1.41" in verdict.message and "upgrade Docker" in verdict.fix


# -- which container we are --------------------------------------------------------------------


def test_the_id_comes_from_the_hostname_mount_not_other_containers_dirs() -> None:
    assert sibling.container_id_from_mountinfo(DOCKER_MOUNTINFO) == ID


def test_the_id_is_found_when_the_data_root_is_its_own_filesystem() -> None:
    # /var/lib/docker on its own disk: the mount's root is relative to that filesystem.
    text = f"117 99 8:17 /containers/{ID}/hostname /etc/hostname rw - xfs /dev/sdb1 rw\n"
    assert sibling.container_id_from_mountinfo(text) == ID


def test_no_container_mounts_no_id() -> None:
    text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    assert sibling.container_id_from_mountinfo(text) is None


@pytest.mark.parametrize(
    "text",
    [
        f"12:memory:/docker/{ID}\n0::/docker/{ID}\n",  # cgroupfs driver
        f"0::/system.slice/docker-{ID}.scope\n",  # systemd driver, cgroup v2
        f"4:memory:/docker/{OTHER}/docker/{ID}\n",  # nested: the innermost is ours
    ],
)
def test_the_id_comes_from_the_cgroup_path(text: str) -> None:
    assert sibling.container_id_from_cgroup(text) == ID


def test_a_private_cgroup_namespace_shows_no_id() -> None:
    assert sibling.container_id_from_cgroup("0::/\n") is None
    assert (
        sibling.container_id_from_cgroup("4:memory:/process_api/367722d0072c528457ac9e\n") is None
    )


def fake_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    return tmp_path


def test_find_container_id_tries_mountinfo_then_cgroup_then_the_hostname(tmp_path: Path) -> None:
    root = fake_proc(tmp_path / "a", DOCKER_MOUNTINFO, "0::/\n")
    assert sibling.find_container_id(root) == (ID, "/proc/self/mountinfo")
    root = fake_proc(tmp_path / "b", "", f"0::/docker/{ID}\n")
    assert sibling.find_container_id(root) == (ID, "/proc/self/cgroup")
    root = fake_proc(tmp_path / "c", "", "0::/\n")
    assert sibling.find_container_id(root, hostname=ID[:12]) == (ID[:12], "the hostname")
    assert sibling.find_container_id(root, hostname="sharelatex") is None


# -- the host dirs behind ours -----------------------------------------------------------------


def inspect(*mounts: dict[str, str]) -> dict[str, object]:
    socket_mount = {
        "Type": "bind",
        "Source": "/var/run/docker.sock",
        "Destination": "/var/run/docker.sock",
    }
    return {"Id": ID, "Mounts": [socket_mount, *mounts]}


def test_a_bind_of_the_data_root_gives_the_products_example() -> None:
    mounts = sibling.mounts_from_inspect(
        inspect(
            {
                "Type": "bind",
                "Source": "/data/sharelatex_data",
                "Destination": "/var/lib/sharelatex",
            }
        )
    )
    found = sibling.host_path(COMPILES, mounts)
    assert found.host == PurePosixPath("/data/sharelatex_data/data/compiles")
    assert found.mount is not None and found.mount.describe() == (
        "-v /data/sharelatex_data:/var/lib/sharelatex"
    )


def test_the_deepest_mount_wins() -> None:
    mounts = sibling.mounts_from_inspect(
        inspect(
            {"Type": "bind", "Source": "/data/sl", "Destination": "/var/lib/sharelatex"},
            {"Type": "bind", "Source": "/fast/compiles", "Destination": str(COMPILES)},
        )
    )
    assert sibling.host_path(COMPILES, mounts).host == PurePosixPath("/fast/compiles")
    output = PurePosixPath("/var/lib/sharelatex/data/output")
    assert sibling.host_path(output, mounts).host == PurePosixPath("/data/sl/data/output")


def test_a_named_volume_maps_to_its_mountpoint() -> None:
    volume = {
        "Type": "volume",
        "Name": "sharelatex_data",
        "Source": "/var/lib/docker/volumes/sharelatex_data/_data",
        "Destination": "/var/lib/sharelatex",
        "Driver": "local",
    }
    found = sibling.host_path(COMPILES, sibling.mounts_from_inspect(inspect(volume)))
    assert found.host == PurePosixPath(
        "/var/lib/docker/volumes/sharelatex_data/_data/data/compiles"
    )


def test_a_sibling_path_is_not_a_parent() -> None:
    mounts = (Mount("bind", "/data/x", PurePosixPath("/var/lib/share")),)
    assert sibling.host_path(COMPILES, mounts).host is None


def test_a_mount_through_a_symlinked_data_root_matches() -> None:
    # Newer images: /var/lib/sharelatex -> /var/lib/overleaf, the volume given on either name.
    def realpath(path: str) -> str:
        return path.replace("/var/lib/sharelatex", "/var/lib/overleaf", 1)

    mounts = (Mount("bind", "/data/ol", PurePosixPath("/var/lib/overleaf")),)
    assert sibling.host_path(COMPILES, mounts, realpath).host == PurePosixPath(
        "/data/ol/data/compiles"
    )


def test_a_tmpfs_mount_has_no_host_path() -> None:
    mounts = sibling.mounts_from_inspect(
        inspect({"Type": "tmpfs", "Source": "", "Destination": "/var/lib/sharelatex"})
    )
    found = sibling.host_path(COMPILES, mounts)
    assert found.host is None and found.mount is not None
    _, verdict = sibling.resolve_host_dir("compiles", "SANDBOXED_COMPILES_HOST_DIR", None, found)
    assert verdict.status is Status.FAIL and "tmpfs mount" in verdict.message


# -- compared with the settings ----------------------------------------------------------------

VARIABLE = "SANDBOXED_COMPILES_HOST_DIR"
FOUND = sibling.HostPath(
    COMPILES,
    Mount("bind", "/data/sharelatex_data", PurePosixPath("/var/lib/sharelatex")),
    PurePosixPath("/data/sharelatex_data/data/compiles"),
)


def test_unset_uses_the_derived_value() -> None:
    host_dir, verdict = sibling.resolve_host_dir("compiles", VARIABLE, None, FOUND)
    assert verdict.status is Status.OK
    assert host_dir.use == FOUND.host and host_dir.derived
    assert "unset: using /data/sharelatex_data/data/compiles" in verdict.message


def test_set_and_equal_is_ok_and_not_derived() -> None:
    host_dir, verdict = sibling.resolve_host_dir("compiles", VARIABLE, FOUND.host, FOUND)
    assert verdict.status is Status.OK and not host_dir.derived and host_dir.use == FOUND.host


def test_set_and_different_names_both_values_and_the_env_to_use() -> None:
    wrong = PurePosixPath("/var/lib/sharelatex/data/compiles")  # the container path: common slip
    _, verdict = sibling.resolve_host_dir("compiles", VARIABLE, wrong, FOUND)
    assert verdict.status is Status.FAIL
    assert f"{VARIABLE}={wrong}" in verdict.message and str(FOUND.host) in verdict.message
    assert verdict.fix.startswith(f"`--env {VARIABLE}=/data/sharelatex_data/data/compiles`")


def test_the_split_output_variable_is_checked_the_same_way() -> None:
    output = sibling.HostPath(
        PurePosixPath("/var/lib/sharelatex/data/output"),
        FOUND.mount,
        PurePosixPath("/data/sharelatex_data/data/output"),
    )
    variable = "SANDBOXED_COMPILES_HOST_DIR_OUTPUT"
    _, verdict = sibling.resolve_host_dir("output", variable, PurePosixPath("/elsewhere"), output)
    assert verdict.status is Status.FAIL
    assert f"`--env {variable}=/data/sharelatex_data/data/output`" in verdict.fix


def test_the_dir_on_the_containers_layer_says_which_volume_to_add() -> None:
    found = sibling.HostPath(COMPILES, None, None)
    _, verdict = sibling.resolve_host_dir("compiles", VARIABLE, None, found)
    assert verdict.status is Status.FAIL
    assert "own layer" in verdict.message
    assert "`-v /data/sharelatex_data:/var/lib/sharelatex`" in verdict.fix


def test_without_inspection_a_set_value_is_used_with_a_warning_and_unset_fails() -> None:
    why = "no id"
    host_dir, verdict = sibling.resolve_host_dir("compiles", VARIABLE, FOUND.host, None, why)
    assert (
        verdict.status is Status.WARN and host_dir.use == FOUND.host and "proof" in verdict.message
    )
    host_dir, verdict = sibling.resolve_host_dir("compiles", VARIABLE, None, None, why)
    assert verdict.status is Status.FAIL and host_dir.use is None
    assert f"--env {VARIABLE}=" in verdict.fix


@pytest.mark.parametrize(
    ("environ", "kind", "variable"),
    [
        ({}, "compiles", "SANDBOXED_COMPILES_HOST_DIR"),
        (
            {"OVERLEAF_SANDBOXED_COMPILES_HOST_DIR": "/x"},
            "compiles",
            "OVERLEAF_SANDBOXED_COMPILES_HOST_DIR",
        ),
        (
            {"SANDBOXED_COMPILES_HOST_DIR": "/x", "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/y"},
            "compiles",
            "SANDBOXED_COMPILES_HOST_DIR_COMPILES",
        ),
        ({}, "output", "SANDBOXED_COMPILES_HOST_DIR_OUTPUT"),
    ],
)
def test_the_fix_names_the_variable_that_wins(
    environ: dict[str, str], kind: str, variable: str
) -> None:
    assert sibling.configured_variable(environ, kind) == variable


def test_problems_and_warnings_are_full_lines_with_the_fix_last() -> None:
    checks = [
        sibling.socket_check(SocketFacts(Path("/var/run/docker.sock"), "missing")),
        sibling.access_check(SocketFacts(Path("/s"), "socket", 0, 0, stat.S_IRUSR), None, "x"),
    ]
    (problem,) = sibling.problems(checks)
    assert problem.startswith("docker socket: no Docker socket at /var/run/docker.sock")
    assert "; fix: add `-v /var/run/docker.sock:/var/run/docker.sock` to docker run" in problem
    (warning,) = sibling.warnings(checks)
    assert warning.startswith("socket access: no user 'x'")


GROUPS = "root:x:0:\nwww-data:x:33:\ndocker:x:999:\n"


def grant_facts(gid: int, mode: int = 0o660) -> sibling.SocketFacts:
    return sibling.SocketFacts(Path("/var/run/docker.sock"), "socket", uid=0, gid=gid, mode=mode)


WWW = sibling.ServiceUser("www-data", 33, frozenset({33}))


def test_a_group_the_container_was_given_is_granted_to_the_services_user() -> None:
    grant = sibling.plan_group_grant(grant_facts(999), WWW, frozenset({999}), GROUPS)
    assert grant is not None
    assert grant.text == "root:x:0:\nwww-data:x:33:\ndocker:x:999:www-data\n"
    assert grant.description == "added www-data to group docker (gid 999, the socket's group)"
    made = sibling.plan_group_grant(grant_facts(106), WWW, frozenset({106}), GROUPS)
    assert made is not None and made.text.endswith("docker-host:x:106:www-data\n")


def test_no_grant_without_the_group_added_or_when_it_would_not_help() -> None:
    assert sibling.plan_group_grant(grant_facts(999), WWW, frozenset(), GROUPS) is None
    owner_only = grant_facts(999, 0o600)
    assert sibling.plan_group_grant(owner_only, WWW, frozenset({999}), GROUPS) is None
    member = sibling.ServiceUser("www-data", 33, frozenset({33, 999}))
    assert sibling.plan_group_grant(grant_facts(999), member, frozenset({999}), GROUPS) is None


def test_applying_a_grant_replaces_the_group_file_keeping_its_mode(tmp_path: Path) -> None:
    group_file = tmp_path / "group"
    group_file.write_text(GROUPS)
    group_file.chmod(0o644)
    grant = sibling.plan_group_grant(grant_facts(999), WWW, frozenset({999}), GROUPS)
    assert grant is not None
    sibling.apply_group_grant(grant, group_file)
    assert group_file.read_text().endswith("docker:x:999:www-data\n")
    assert group_file.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["group"]
