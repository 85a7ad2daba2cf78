"""The compile runtime: the variable, runsc's platform, its registration with the inner dockerd,
the host engine's runtimes (sibling), the profile under gVisor, what doctor and status say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from init import config, doctor
from init.checks import Status
from init.compiles.paths import CompileDir
from init.compiles.profile import Job, container_name, container_spec, watchdog_command
from init.compiles.settings import Limits
from init.engine import runtime
from init.engine.client import EngineInfo
from init.engine.sibling_check import SiblingRequest, runtime_checks
from init.engine.side import EngineStatus
from init.errors import ConfigError

IMAGES = "texlive/texlive:2024,texlive/texlive:2019"


def settings(**env: str) -> config.Settings:
    return config.load({"SANDBOXED_COMPILES": "true", config.ALL_TEXLIVE_IMAGES: IMAGES, **env})


# -- the variable ----------------------------------------------------------------------------


def test_runc_is_the_default_for_every_image() -> None:
    s = settings()
    assert s.compile_runtimes == (
        ("texlive/texlive:2024", "runc"),
        ("texlive/texlive:2019", "runc"),
    )
    assert runtime.wanted(s) == frozenset()
    assert runtime.describe(s) == "runc for every compile image"


def test_one_word_sets_every_image_and_items_choose_per_image() -> None:
    every = settings(OVERLEAF_INIT_COMPILE_RUNTIME=" RunSC ")
    assert {r for _, r in every.compile_runtimes} == {"runsc"}
    assert runtime.describe(every, "ptrace") == (
        "runsc (gVisor, platform ptrace) for every compile image"
    )
    one = settings(OVERLEAF_INIT_COMPILE_RUNTIME="runc, texlive/texlive:2019=runsc")
    assert runtime.runtime_for(one, "texlive/texlive:2019") == "runsc"
    assert runtime.runtime_for(one, "texlive/texlive:2024") == "runc"
    assert runtime.wanted(one) == frozenset({"runsc"})
    assert (
        runtime.describe(one) == "texlive/texlive:2024: runc; texlive/texlive:2019: runsc (gVisor)"
    )


def test_a_bad_runtime_image_or_platform_is_named_with_the_fix() -> None:
    with pytest.raises(ConfigError) as e:
        settings(
            OVERLEAF_INIT_COMPILE_RUNTIME="kata,evil/img=runsc",
            OVERLEAF_INIT_RUNSC_PLATFORM="sentry",
        )
    assert e.value.problems == [
        "OVERLEAF_INIT_COMPILE_RUNTIME: 'kata' names no runtime sharelatex-init knows; use "
        "runc or runsc (gVisor), or IMAGE=runsc for one image",
        "OVERLEAF_INIT_COMPILE_RUNTIME: 'evil/img' is not an allowed TeX Live image; choose "
        f"one of {IMAGES.replace(',', ', ')} or add it to ALL_TEX_LIVE_DOCKER_IMAGES",
        "OVERLEAF_INIT_RUNSC_PLATFORM='sentry' is not a gVisor platform; use one of auto, "
        "ptrace, systrap, kvm",
    ]


def test_runsc_with_the_services_own_docker_runner_is_refused() -> None:
    with pytest.raises(ConfigError, match="OVERLEAF_INIT_COMPILE_RUNNER=shim"):
        settings(OVERLEAF_INIT_COMPILE_RUNTIME="runsc", OVERLEAF_INIT_COMPILE_RUNNER="docker")


# -- the platform ----------------------------------------------------------------------------


def fake_root(tmp_path: Path, kvm: bool, flags: str, pvm: bool = False) -> Path:
    (tmp_path / "dev").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    if kvm:
        (tmp_path / "dev" / "kvm").symlink_to("/dev/null")  # a character device
    (tmp_path / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse\n")
    if pvm:
        (tmp_path / "sys" / "module" / "kvm_pvm").mkdir(parents=True)
    return tmp_path


def api(version: int | None):  # type: ignore[no-untyped-def]
    return lambda device: version


def test_kvm_where_the_device_answers_and_the_cpu_virtualizes(tmp_path: Path) -> None:
    root = fake_root(tmp_path, kvm=True, flags="vmx")
    assert runtime.choose_platform("auto", root, api(12)).name == "kvm"
    assert runtime.choose_platform("kvm", root, api(12)).name == "kvm"
    assert runtime.choose_platform("ptrace", root, api(12)).name == "ptrace"


def test_ptrace_without_kvm_and_kvm_refused_with_the_reason(tmp_path: Path) -> None:
    root = fake_root(tmp_path, kvm=False, flags="vmx")
    chosen = runtime.choose_platform("auto", root, api(12))
    assert chosen.name == "ptrace" and f"no {root}/dev/kvm" in chosen.reason
    with pytest.raises(ConfigError, match="use OVERLEAF_INIT_RUNSC_PLATFORM=auto"):
        runtime.choose_platform("kvm", root, api(12))


def offers(*names: str):  # type: ignore[no-untyped-def]
    return lambda binary: frozenset(names)


def test_systrap_only_when_asked_and_refused_with_the_fix_where_this_runsc_lacks_it(
    tmp_path: Path,
) -> None:
    root = fake_root(tmp_path, kvm=False, flags="vmx")
    new, old = offers("kvm", "ptrace", "systrap"), offers("kvm", "ptrace")
    chosen = runtime.choose_platform("auto", root, api(12), new)
    assert chosen.name == "ptrace" and chosen.reason.startswith(f"not KVM: no {root}/dev/kvm")
    assert "systrap is there too, taken only when asked" in chosen.reason
    chosen = runtime.choose_platform("auto", root, api(12), old)
    assert chosen.name == "ptrace" and "systrap is there" not in chosen.reason
    assert runtime.choose_platform("systrap", root, api(12), new).name == "systrap"
    with pytest.raises(ConfigError, match="this runsc offers only kvm, ptrace; install runsc 2"):
        runtime.choose_platform("systrap", root, api(12), old)
    # KVM first where it can run: gVisor's fastest where the CPU virtualizes.
    kvm_root = fake_root(tmp_path / "k", kvm=True, flags="vmx")
    assert runtime.choose_platform("auto", kvm_root, api(12), new).name == "kvm"


def test_the_platforms_runsc_lists(tmp_path: Path) -> None:
    binary = tmp_path / "runsc"
    listing = 'printf "ptrace\\nkvm\\nsystrap\\n"'
    binary.write_text(f'#!/bin/sh\n[ "$1 $2" = "help platforms" ] && {listing}\n')
    binary.chmod(0o755)
    assert runtime.offered_platforms(binary) == {"ptrace", "kvm", "systrap"}
    binary.write_text("#!/bin/sh\nexit 1\n")  # an old or broken one: the platforms every runsc has
    assert runtime.offered_platforms(binary) == {"ptrace", "kvm"}
    assert runtime.offered_platforms(tmp_path / "absent") == {"ptrace", "kvm"}


def test_a_pvm_kvm_without_vmx_is_not_taken(tmp_path: Path) -> None:
    """This VM: /dev/kvm is kvm_pvm's, the CPU shows no vmx/svm, runsc's KVM platform hangs."""
    root = fake_root(tmp_path, kvm=True, flags="", pvm=True)
    chosen = runtime.choose_platform("auto", root, api(12))
    assert chosen.name == "ptrace"
    assert "(served by kvm_pvm)" in chosen.reason and "no vmx/svm" in chosen.reason
    assert "cannot be opened" in runtime.kvm_problem(root, api(None))
    assert "API 11" in runtime.kvm_problem(fake_root(tmp_path / "x", True, "svm"), api(11))


# -- docker-in-docker: registration ------------------------------------------------------------


def image_root(tmp_path: Path, daemon_json: str | None = None) -> Path:
    binary = tmp_path / "usr" / "bin" / "runsc"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    if daemon_json is not None:
        (tmp_path / "etc" / "docker").mkdir(parents=True)
        (tmp_path / "etc" / "docker" / "daemon.json").write_text(daemon_json)
    return tmp_path


def test_runsc_is_registered_on_top_of_the_operators_daemon_json(tmp_path: Path) -> None:
    root = image_root(tmp_path, '{"log-level": "warn", "runtimes": {"crun": {"path": "/c"}}}')
    plan = runtime.plan_registration(
        settings(OVERLEAF_INIT_COMPILE_RUNTIME="runsc"), (), tmp_path / "run", root, api(None)
    )
    assert plan is not None
    assert plan.dockerd_args() == ("--config-file", str(tmp_path / "run" / "dockerd.json"))
    assert plan.document == {
        "log-level": "warn",
        "runtimes": {
            "crun": {"path": "/c"},
            "runsc": {
                "path": "/usr/bin/runsc",
                "runtimeArgs": ["--network=none", "--oci-seccomp", "--platform=ptrace"],
            },
        },
    }
    runtime.apply_registration(plan)
    assert json.loads(plan.path.read_text()) == plan.document
    assert os.listdir(plan.path.parent) == ["dockerd.json"]


def test_nothing_is_registered_for_runc(tmp_path: Path) -> None:
    assert runtime.plan_registration(settings(), (), tmp_path, tmp_path) is None


def test_registration_is_refused_without_runsc_or_beside_the_operators_flags(
    tmp_path: Path,
) -> None:
    s = settings(OVERLEAF_INIT_COMPILE_RUNTIME="runsc")
    with pytest.raises(ConfigError) as e:
        runtime.plan_registration(s, ("--config-file=/x.json",), tmp_path, tmp_path, api(None))
    assert "apt-get install runsc" in e.value.problems[0]
    assert "--config-file" in e.value.problems[1]
    with pytest.raises(ConfigError, match="not a JSON object"):
        runtime.plan_registration(s, (), tmp_path, image_root(tmp_path / "r", "[]"), api(None))


# -- sibling: the host's engine --------------------------------------------------------------


def test_an_engine_without_runsc_is_refused_with_the_daemon_json_fix() -> None:
    info = EngineInfo("20.10", "1.41", "overlay2", ("runc",), (("runc", ()),))
    (check,) = runtime_checks(info, ("runsc",))
    assert check.status is Status.FAIL
    assert "offers only runc" in check.message
    assert '"runtimes": {"runsc"' in check.fix and "systemctl reload docker" in check.fix


def test_an_engines_runsc_without_oci_seccomp_is_a_warning() -> None:
    bare = EngineInfo("20.10", "1.41", "overlay2", ("runc", "runsc"), (("runsc", ()),))
    ok, warn = runtime_checks(bare, ("runsc",))
    assert ok.status is Status.OK and warn.status is Status.WARN
    assert "--network=none --oci-seccomp" in warn.message
    good = EngineInfo("20.10", "1.41", "overlay2", ("runsc",), (("runsc", runtime.RUNSC_ARGS),))
    assert [c.status for c in runtime_checks(good, ("runsc",))] == [Status.OK]


def test_the_sibling_request_carries_the_runtimes_to_the_child(tmp_path: Path) -> None:
    request = SiblingRequest(result=tmp_path / "r.json", runtimes=("runsc",))
    assert SiblingRequest.from_argv(request.argv()).runtimes == ("runsc",)


# -- the profile under gVisor ------------------------------------------------------------------


def job(tmp_path: Path) -> Job:
    directory = CompileDir(tmp_path / "p1", Path("/host/p1"), "p1", 33, 33)
    return Job(directory, ("latexmk",), "img:1", {}, compile_id="c1")


def test_under_runsc_the_pids_limit_bounds_host_tasks_and_nproc_the_processes(
    tmp_path: Path,
) -> None:
    limits = Limits(pids=64)
    runc = container_spec(job(tmp_path), limits, None, now=0.0)
    gvisor = container_spec(job(tmp_path), limits, None, now=0.0, runtime="runsc")
    assert "Runtime" not in runc.host_config  # the engine's default, as before
    assert runc.host_config["PidsLimit"] == 64
    assert gvisor.host_config["Runtime"] == "runsc"
    assert gvisor.host_config["PidsLimit"] == runtime.host_tasks(64) == 64 + 8 * 64
    assert {"Name": "nproc", "Soft": 64, "Hard": 64} in gvisor.host_config["Ulimits"]
    assert not any(u["Name"] == "nproc" for u in runc.host_config["Ulimits"])
    same = {k: v for k, v in gvisor.host_config.items() if k not in ("Runtime", "PidsLimit")}
    rest = {k: v for k, v in runc.host_config.items() if k != "PidsLimit"}
    assert same == {**rest, "Ulimits": same["Ulimits"]}  # the rest unchanged
    assert gvisor.name != runc.name  # another container when the runtime changes
    assert runc.name == container_name(job(tmp_path).directory, "img:1", limits)


def _kill_its_children(watchdog: int) -> int:
    """SIGKILL every process of `watchdog`'s group but itself, as a compile's `kill -1` does
    to every process of the container but its PID 1 (and the killer); how many."""
    import signal

    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == watchdog:
            continue
        try:
            if os.getpgid(int(entry.name)) == watchdog:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except ProcessLookupError:
            pass
    return killed


def test_the_watchdog_outlives_a_compile_killing_whatever_it_runs() -> None:
    """A compile's end (`kill -KILL -1`) may come while the watchdog has any child alive. It
    once had a `$(date +%s)` there: killed, it read as "" and ended the container under the
    compile, whose exit status went with it (1 compile in 20 at once under gVisor, loaded).
    Here its children are killed as fast as it makes them for 2 s (each killed sleep is a
    compile's end, so the loop spins): it lives on. (Its idle end needs a container's own
    /proc: the battery's compiles leave no container behind.)"""
    import signal
    import subprocess
    import time

    watchdog = subprocess.Popen(watchdog_command(Limits(idle=2)), start_new_session=True)
    try:
        kills, until = 0, time.monotonic() + 2.0
        while time.monotonic() < until and watchdog.poll() is None:
            kills += _kill_its_children(watchdog.pid)
        assert watchdog.poll() is None, f"the watchdog ended after {kills} kills"
        assert kills >= 3, "the test killed too few children to mean anything"
        watchdog.send_signal(signal.SIGTERM)
        assert watchdog.wait(5) == 0
    finally:
        if watchdog.poll() is None:
            watchdog.kill()
            watchdog.wait()


def test_the_watchdog_waits_for_the_first_compile_then_ends_when_idle_after_it() -> None:
    """As a container's PID 1 (its own PID namespace and /proc): a first exec that comes later
    than the idle time (4.4 s under gVisor, loaded) finds it still there; after a compile
    ended by `kill -KILL -1`, it ends once idle."""
    import subprocess
    import time

    from tests.integration.conftest import require

    require(os.geteuid() == 0, "a PID namespace of its own needs root")
    limits = Limits(idle=2, timeout=15)  # the battery's; its first exec may take 30 s
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *watchdog_command(limits)],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
        assert len(children) == 1, children
        enter = ["nsenter", "-t", children[0], "-p", "-m"]
        time.sleep(4)  # twice the idle time, no compile yet
        assert outer.poll() is None, "the watchdog ended before its first compile"
        compile_ = ["sh", "-c", "sleep 1.5; kill -KILL -1 2>/dev/null; exit 0"]
        assert subprocess.run([*enter, *compile_], timeout=10).returncode == 0
        began = time.monotonic()
        assert outer.wait(10) == 0
        assert 1.5 < time.monotonic() - began < 5  # idle 2 s, checked each second
    finally:
        if outer.poll() is None:
            os.killpg(outer.pid, 9)
            outer.wait()


def test_the_engines_self_test_runs_its_container_under_the_compile_images_runtime(
    tmp_path: Path,
) -> None:
    """docker-in-docker's self-test runs a container of the compile image: under runsc when
    compiles run under it (a runsc that cannot start a sandbox fails the self-test), under the
    engine's default otherwise."""
    from init.engine import ready
    from tests.unit.test_engine_client import FakeEngine
    from tests.unit.test_status_truth import working

    engine = FakeEngine(tmp_path / "d.sock")
    engine.routes[("GET", "/_ping")] = lambda _: (200, b"OK", {"Content-Type": "text/plain"})
    working(engine)
    serving = engine.serve()
    next(serving)
    try:
        for under, host_config in (
            ("runsc", {"NetworkMode": "none", "Runtime": "runsc"}),
            ("", {"NetworkMode": "none"}),
        ):
            request = ready.ReadyRequest(
                engine.path, tmp_path / "r.json", 5.0, self_test=True, image="tl", runtime=under
            )
            assert ready.ReadyRequest.from_argv(request.argv()) == request
            engine.seen.clear()
            assert ready.self_test(request).ready
            created = next(
                b for m, t, b in engine.seen if t.endswith(f"name={ready.SELF_TEST_NAME}")
            )
            assert json.loads(created)["HostConfig"] == host_config
    finally:
        next(serving, None)


# -- doctor and status -------------------------------------------------------------------------


def test_doctor_names_the_runtime_and_the_platform(tmp_path: Path) -> None:
    s = settings(OVERLEAF_INIT_COMPILE_RUNTIME="runsc")
    root = image_root(tmp_path)
    (root / "proc").mkdir()
    check = doctor.runtime_check(s, {}, root)
    assert check.status is Status.OK
    assert check.message.startswith("compiles run under runsc (gVisor, platform ptrace)")
    assert "not KVM: no " in check.message
    forced = doctor.runtime_check(
        settings(OVERLEAF_INIT_COMPILE_RUNTIME="runsc", OVERLEAF_INIT_RUNSC_PLATFORM="kvm"),
        {},
        root,
    )
    assert forced.status is Status.FAIL and "kvm cannot run here" in forced.message
    assert doctor.runtime_check(settings(), {}, root).message == (
        "compiles run under runc for every compile image"
    )


def test_status_names_the_runtime() -> None:
    from init.status import _engine_line

    engine = EngineStatus(
        mode="dind", state="ready", ready=True, driver="overlay2",
        runtimes="runsc (gVisor, platform ptrace) for every compile image",
    )  # fmt: skip
    assert EngineStatus.from_json(engine.to_json()) == engine
    assert _engine_line(engine) == (
        "engine: dind ready, storage driver overlay2, compiles under runsc (gVisor, platform "
        "ptrace) for every compile image"
    )
