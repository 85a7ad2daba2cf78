"""Under faults, the status tells the truth: the init as PID 1 (dockerd inside, for the engine's
faults) and the faults injected for real. dockerd stopped with SIGSTOP, containerd killed with -9,
the status dir read-only for a while, a status file left by an earlier start. Each test states
the bound it holds the answer to, and measures it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import CLEAN_ENV, INIT, Layout, Running, require, wait_for
from tests.integration.test_dind import RunningInit, short_tmp, start_init  # noqa: F401

pytestmark = pytest.mark.root

PING_BOUND = 2.0 + 1.5  # the probe's 2 s ping, plus starting `python -m init status` on a busy box


@pytest.fixture(autouse=True)
def _needs_root_and_nsenter() -> None:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("nsenter") is not None, "needs nsenter (util-linux)")


def ready_engine(start_init: Callable[..., RunningInit]) -> RunningInit:  # noqa: F811
    """A dind init whose compiles can run: the engine ready, the image loaded."""
    init = start_init()
    init.wait_engine("ready")
    wait_for(lambda: init.status()["texlive"]["state"] == "done", 60, "the installer done")
    wait_for(lambda: init.probe("ready")[0] == 0, 10, "ready")
    return init


def first_answer(init: RunningInit, code: int, within: float) -> tuple[float, str]:
    """Probe `ready` until it exits `code`; (seconds it took, that answer)."""
    began = time.monotonic()
    while True:
        got, line = init.probe("ready")
        took = time.monotonic() - began
        if got == code:
            return took, line
        if took > within:
            raise AssertionError(f"still {line!r} after {took:.1f} s; log:\n{init.log()[-3000:]}")


def containerd(init: RunningInit) -> psutil.Process:
    dockerd = init.dockerd()
    assert dockerd is not None
    found = [p for p in dockerd.children() if p.name() == "containerd"]
    assert found, "dockerd runs no containerd"
    return found[0]


def test_a_hung_engine_is_not_ready_within_the_ping_bound_and_ready_again_once_continued(
    start_init: Callable[..., RunningInit],  # noqa: F811
) -> None:
    init = ready_engine(start_init)
    dockerd = init.dockerd()
    assert dockerd is not None
    dockerd.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        took, line = first_answer(init, 1, within=PING_BOUND + 5)
        assert took < PING_BOUND, f"{took:.2f} s to say not ready"
        assert line == (
            "ready: no: compiles cannot run: the dind engine does not answer /_ping within 2 s "
            "(hung or stopped?)"
        )
        assert init.probe("healthy")[0] == 0  # the site is alive; compiles are what is not
        # `status` says it too, once the self-test (every 30 s) has asked.
        engine = init.wait_engine("failed", timeout=30 + 2 + 5)
        assert "self-test: the engine does not answer /_ping within 2 s" in engine["reason"]
        print(f"SIGSTOP: not ready after {took:.2f} s; status failed after "
              f"{time.monotonic() - stopped:.1f} s")  # fmt: skip
    finally:
        dockerd.send_signal(signal.SIGCONT)
    continued = time.monotonic()
    took, line = first_answer(init, 0, within=15)
    assert line == "ready: yes: compiles can run"
    init.wait_engine("ready", timeout=3 + 10)  # the next self-test, 3 s after the failed one
    back = time.monotonic() - continued
    assert back < 3 + 5, f"{back:.1f} s to be ready again"
    print(f"SIGCONT: the probe ready after {took:.2f} s, the status ready after {back:.1f} s")
    assert "the self-test passes again: compiles can run" in init.log()
    assert init.docker("run", "--rm", "busybox:test", "/bin/sh", "-c", "exit 0").returncode == 0


def test_containerd_killed_is_found_at_once_and_the_engine_is_ready_again_when_it_is_back(
    start_init: Callable[..., RunningInit],  # noqa: F811
) -> None:
    init = ready_engine(start_init)
    # A compile running meanwhile: the self-test never touches it.
    compile_ = init.docker(
        "run", "-d", "--network", "none", "--label", "sharelatex-init.compile=1",
        "busybox:test", "/bin/busybox", "sleep", "120",
    )  # fmt: skip
    assert compile_.returncode == 0, compile_.stderr
    victim = containerd(init)
    victim.kill()
    killed = time.monotonic()
    engine = init.wait_engine("failed", timeout=2)
    found = time.monotonic() - killed
    assert found < 1.0, f"{found:.2f} s to find containerd gone"
    assert engine["reason"].startswith("containerd (pid ") and "ended" in engine["reason"]
    code, line = init.probe("ready")
    assert code == 1 and "containerd (pid" in line, line
    # dockerd starts containerd again by itself (~10 s here); a self-test every 3 s, each
    # running a container, says when compiles can run again.
    init.wait_engine("ready", timeout=45)
    back = time.monotonic() - killed
    print(f"containerd -9: failed after {found:.2f} s, ready again after {back:.1f} s")
    assert init.probe("ready") == (0, "ready: yes: compiles can run")
    assert init.docker("run", "--rm", "busybox:test", "/bin/sh", "-c", "exit 0").returncode == 0
    assert init.docker("inspect", compile_.stdout.strip()).returncode == 0  # left alone
    leftovers = init.docker("ps", "-aq", "--filter", "label=sharelatex-init.self-test")
    assert leftovers.stdout.strip() == ""
    # Found again if it dies a second time: the watch follows the new containerd.
    containerd(init).kill()
    init.wait_engine("failed", timeout=2)


def in_namespaces(pid: int, *argv: str) -> list[str]:
    """Run `argv` in the PID and mount namespaces of host pid `pid` (as `docker exec` does).
    It starts in / there (the init's cwd): give it PYTHONPATH (CLEAN_ENV) to find this tree."""
    return ["nsenter", "--target", str(pid), "--pid", "--mount", *argv]


def test_a_read_only_status_dir_is_written_again_within_5_s_of_being_writable(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "site")
    layout.service("web", "exec sleep 1000")
    init = start(layout.run_argv(), status_file=layout.status_file)
    first = init.wait_service("web", "up")
    run_dir = str(layout.status_file.parent)
    # Read-only in the init's own mount namespace only (a bind mount of the dir on itself).
    protect = f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir}"
    subprocess.run(in_namespaces(init.init_pid, "sh", "-c", protect), check=True)
    try:
        os.kill(_host_pid(init, first["pid"]), signal.SIGKILL)
        time.sleep(3)  # a few failed writes and retries, the restart among them
        assert init.service("web")["pid"] == first["pid"]  # the file could not change
        assert "cannot write" in init.log()
    finally:
        subprocess.run(in_namespaces(init.init_pid, "umount", run_dir), check=True)
    writable = time.monotonic()
    web = wait_for(
        lambda: (entry := init.service("web"))["pid"] != first["pid"] and entry, 5 + 1, "rewrite"
    )
    took = time.monotonic() - writable
    print(f"status dir writable again: rewritten after {took:.2f} s")
    assert took <= 5 + 0.5
    assert web["state"] == "up" and web["restarts"] == 1
    assert [p.name for p in layout.status_file.parent.iterdir()] == ["status.json"]  # no .tmp
    # The init says so once the write has succeeded: after the file this test has just read.
    wait_for(lambda: "written again" in init.log(), 5, "the log line of the rewrite")
    assert init.log().count("cannot write") == 1


def _host_pid(init: Running, pid_in_namespace: int) -> int:
    for process in init.descendants():
        status = Path(f"/proc/{process.pid}/status").read_text()
        nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
        if int(nspid.split()[-1]) == pid_in_namespace:
            return process.pid
    raise AssertionError(f"no process is pid {pid_in_namespace} in the init's namespace")


def test_a_status_file_left_by_an_earlier_start_is_not_taken_for_this_one(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "site")
    layout.service("web", "exec sleep 1000")
    earlier = start(layout.run_argv(), status_file=layout.status_file)
    earlier.wait_service("web", "up")
    earlier.signal(signal.SIGKILL)  # an unclean stop (its PID 1 killed): its file stays
    earlier.wait(10)
    left = layout.status_file.read_text()
    assert json.loads(left)["phase"] == "running"
    (layout.status_file.parent / "texlive.json").write_text("{}")  # the installer's, also stale

    def probe(what: str, inside: int | None = None) -> tuple[int, str]:
        argv = [*INIT, "status", "--check", what, "--status-file", str(layout.status_file)]
        if inside is not None:
            argv = in_namespaces(inside, *argv)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=CLEAN_ENV)
        return done.returncode, done.stdout.strip()

    code, line = probe("healthy")
    assert code == 1
    # From outside, the writer is found by its PID namespace's number. Gone, as a rule: "is not
    # running". But the kernel hands a freed number to the next namespace made, and the tests
    # beside this one make many: then a PID 1 of another start is found ("another process now").
    assert line.startswith("healthy: no: ") and "earlier start of the init" in line, line
    # The container starts again: PID 1 again, the same status dir.
    earlier_boot = json.loads(left)["boot"]
    later = start(layout.run_argv(), status_file=layout.status_file)
    answers = []
    deadline = time.monotonic() + 10
    while later.status().get("boot") in (None, earlier_boot):
        answer = probe("healthy")
        if later.status().get("boot") in (None, earlier_boot):  # read while it was still there
            answers.append(answer)
        assert time.monotonic() < deadline, "the new init never wrote its status"
    assert all(code == 1 for code, _ in answers), answers  # never the earlier start's "yes"
    later.wait_service("web", "up")
    boot = later.status()["boot"]
    assert boot["pid"] == 1 and boot["start_time"] != earlier_boot["start_time"]
    assert not (layout.status_file.parent / "texlive.json").exists()
    assert probe("healthy", inside=later.init_pid)[0] == 0
    # The earlier start's file read inside the new start's namespace (as `docker exec` would,
    # before the new init's first write): same pid 1, another process.
    layout.status_file.write_text(left)
    code, line = probe("healthy", inside=later.init_pid)
    assert code == 1, line
    # (pid 1 of another namespace, or of the same one if the kernel reused its number)
    assert line.startswith("healthy: no: ") and "from an earlier start of the init" in line
    shown = subprocess.run(
        in_namespaces(later.init_pid, *INIT, "status", "--status-file", str(layout.status_file)),
        capture_output=True, text=True, timeout=30, env=CLEAN_ENV,
    )  # fmt: skip
    assert shown.stdout.startswith("init: not this start's word: ")
