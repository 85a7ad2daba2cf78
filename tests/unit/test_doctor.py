"""doctor's gathering of checks, on fake /proc and /sys trees (the engine part is integration)."""

from __future__ import annotations

from pathlib import Path

from init import doctor
from init.checks import Status

FULL_CAPS = "000001ffffffffff"
PLAIN_CONTAINER_CAPS = "00000000a80425fb"  # docker's default set, no CAP_SYS_ADMIN


def fake_root(tmp_path: Path, cap_eff: str) -> Path:
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/status").write_text(f"Name:\tpython\nCapEff:\t{cap_eff}\n")
    (root / "proc/self/mountinfo").write_text(
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    )
    (root / "proc/cgroups").write_text("#subsys_name\thierarchy\tnum_cgroups\tenabled\n")
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpu memory pids\n")
    (root / "sys/fs/cgroup/cgroup.subtree_control").write_text("cpu memory pids\n")
    (root / "sys/fs/cgroup/cgroup.procs").write_text("")
    return root


def dind_env(tmp_path: Path) -> dict[str, str]:
    return {
        "SANDBOXED_COMPILES": "true",
        "OVERLEAF_INIT_DOCKER_DATA_ROOT": str(tmp_path / "data"),
        "OVERLEAF_INIT_DOCKER_EXEC_ROOT": str(tmp_path / "exec"),
        "OVERLEAF_INIT_DOCKER_SOCKET": str(tmp_path / "absent.sock"),
    }


def test_configuration_problems_are_failures_each_on_its_own_line(tmp_path: Path) -> None:
    checks = doctor.run_checks(
        {"SANDBOXED_COMPILES": "maybe", "TEX_LIVE_DOCKER_IMAGE": "Bad Image"},
        tmp_path / "status.json",
    )
    assert [c.status for c in checks] == [Status.FAIL, Status.FAIL]
    assert doctor.exit_status(checks) == 1


def test_compiles_off_is_a_warning_with_both_ways_to_turn_them_on(tmp_path: Path) -> None:
    checks = doctor.run_checks({}, tmp_path / "status.json")
    (warning,) = [c for c in checks if c.status is Status.WARN]
    assert warning.name == "sandbox"
    assert "--privileged" in warning.fix and "/var/run/docker.sock" in warning.fix
    assert doctor.exit_status(checks) == 0


def test_dind_without_privileges_fails_with_the_fix(tmp_path: Path) -> None:
    root = fake_root(tmp_path, PLAIN_CONTAINER_CAPS)
    checks = doctor.run_checks(dind_env(tmp_path), tmp_path / "status.json", root)
    by_name = {c.name: c for c in checks}
    assert by_name["privileges"].status is Status.FAIL
    assert "--privileged" in by_name["privileges"].fix
    assert "SANDBOXED_COMPILES_SIBLING_CONTAINERS=true" in by_name["privileges"].fix
    assert by_name["dockerd"].status is Status.FAIL
    assert "absent.sock" in by_name["dockerd"].message
    assert doctor.exit_status(checks) == 1


def test_dind_privileged_and_delegated_passes_the_local_checks(tmp_path: Path) -> None:
    root = fake_root(tmp_path, FULL_CAPS)
    checks = doctor.run_checks(dind_env(tmp_path), tmp_path / "status.json", root)
    by_name = {c.name: c for c in checks}
    assert by_name["privileges"].status is Status.OK
    assert by_name["cgroups"].status is Status.OK
    assert by_name["storage"].status is Status.OK


def test_report_lines_and_json(tmp_path: Path) -> None:
    checks = doctor.run_checks({}, tmp_path / "status.json")
    text = doctor.report(checks, as_json=False)
    assert text.splitlines()[0].startswith("ok   config: sandboxed compiles: off")
    assert '"status": "warn"' in doctor.report(checks, as_json=True)


def test_the_compile_runner_check_names_the_runner_the_services_will_use(
    tmp_path: Path,
) -> None:
    from init import config

    shim = doctor.compile_runner_check(config.load({"SANDBOXED_COMPILES": "true"}), root=tmp_path)
    assert shim.status is Status.OK and "sandboxing shim" in shim.message
    runner = tmp_path / "overleaf/services/clsi/app/js/DockerRunner.js"
    runner.parent.mkdir(parents=True)
    runner.touch()
    docker = doctor.compile_runner_check(config.load({"SANDBOXED_COMPILES": "true"}), root=tmp_path)
    assert docker.status is Status.OK and "DOCKER_RUNNER=true" in docker.message
