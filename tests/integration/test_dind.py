"""Docker-in-docker mode for real: PID 1 in fresh pid + mount namespaces runs Debian's dockerd.

Each test starts `sharelatex-init run` as PID 1 of `unshare --pid --fork --mount-proc --mount`
with the engine's data root, exec root and socket under tmp_path, and checks what an operator
would: ready, storage driver, a container runs, restarts after kill -9, a clean stop.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from init.engine.client import connect_error
from tests.integration.conftest import IMAGE, require, saved_image

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
ENGINE_ARGS = "--bridge=none --iptables=false --ip-masq=false"


@pytest.fixture(autouse=True)
def _needs_root_and_dockerd() -> None:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("dockerd") is not None, "needs dockerd (apt-get install docker.io)")
    require(Path("/bin/busybox").exists(), "needs busybox-static")


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class RunningInit:
    proc: subprocess.Popen[bytes]
    log_path: Path
    status_file: Path
    socket: Path
    environ: dict[str, str]
    started: float = field(default_factory=time.monotonic)

    def probe(self, what: str) -> tuple[int, str]:
        """`sharelatex-init status --check WHAT`, as a HEALTHCHECK or a readiness probe runs it."""
        done = subprocess.run(
            [sys.executable, "-m", "init", "status", "--check", what, "--status-file",
             str(self.status_file)],
            capture_output=True, text=True, env=self.environ, timeout=30,
        )  # fmt: skip
        return done.returncode, done.stdout.strip()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`sharelatex-init ARGS --status-file F` beside the init."""
        return subprocess.run(
            [sys.executable, "-m", "init", *args, "--status-file", str(self.status_file)],
            capture_output=True, text=True, env=self.environ, timeout=30,
        )  # fmt: skip

    def doctor(self) -> tuple[int, list[dict[str, str]]]:
        """`sharelatex-init doctor --json` run beside the init, as an operator would."""
        done = subprocess.run(
            [sys.executable, "-m", "init", "doctor", "--json", "--status-file",
             str(self.status_file)],
            capture_output=True, text=True, env=self.environ, timeout=60,
        )  # fmt: skip
        return done.returncode, json.loads(done.stdout)

    @property
    def init_process(self) -> psutil.Process:
        return wait_for(
            lambda: next(iter(psutil.Process(self.proc.pid).children()), None), 10, "the init"
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}
        return document

    def engine(self) -> dict[str, Any]:
        return self.status().get("engine") or {}

    def wait_engine(self, state: str, timeout: float = 30) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            engine = self.engine()
            return engine if engine.get("state") == state else None

        try:
            return wait_for(reached, timeout, f"engine state {state}")  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"engine {self.engine()}; log:\n{self.log()[-3000:]}") from None

    def dockerd(self) -> psutil.Process | None:
        for child in self.init_process.children(recursive=True):
            try:
                if child.name() == "dockerd":
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def docker(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            input=stdin.decode("latin-1") if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self, timeout: float = 15) -> tuple[int, float]:
        began = time.monotonic()
        self.init_process.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - began


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short base path: unix socket paths (containerd's under the exec root) max 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_init(short_tmp: Path) -> Iterator[Callable[..., RunningInit]]:
    started: list[RunningInit] = []

    def start(
        data_root: Path | None = None,
        overlay: bool = False,
        services: dict[str, str] | None = None,
        prelude: str = "",
        **env: str,
    ) -> RunningInit:
        base = short_tmp / f"e{len(started)}"
        (base / "services").mkdir(parents=True)
        for name, script in (services or {}).items():
            (base / "services" / name).mkdir()
            run = base / "services" / name / "run"
            run.write_text(f"#!/bin/sh\n{script}\n")
            run.chmod(0o755)
        data = data_root or base / "data"
        data.mkdir(parents=True, exist_ok=True)
        status_file = base / "run" / "status.json"
        socket = Path(env.get("OVERLEAF_INIT_DOCKER_SOCKET", base / "docker.sock"))
        # The compile image comes from a `docker save` tarball (no registry is reachable).
        (base / "images").mkdir()
        (base / "images" / "busybox_test.tar").write_bytes(saved_image(IMAGE))
        environ = {
            **os.environ,
            "SANDBOXED_COMPILES": "true",
            "TEX_LIVE_DOCKER_IMAGE": IMAGE,
            "OVERLEAF_INIT_TEXLIVE_SOURCES": "load",
            "OVERLEAF_INIT_TEXLIVE_TARBALL_DIR": str(base / "images"),
            "OVERLEAF_INIT_DOCKER_DATA_ROOT": str(data),
            "OVERLEAF_INIT_DOCKER_EXEC_ROOT": str(base / "exec"),
            "OVERLEAF_INIT_DOCKER_SOCKET": str(socket),
            "OVERLEAF_INIT_DOCKERD_ARGS": ENGINE_ARGS,
            "PYTHONPATH": str(REPO),
            **env,
        }
        init = [
            sys.executable, "-m", "init", "run",
            "--service-dir", str(base / "services"),
            "--startup-dir", str(base / "none"),
            "--pre-shutdown-dir", str(base / "none"),
            "--post-shutdown-dir", str(base / "none"),
            "--container-env", str(base / "container_environment"),
            "--status-file", str(status_file),
            "--grace", "8",
        ]  # fmt: skip
        if overlay:
            # The container's own layered root: the data root is an overlayfs mount made in
            # the same mount namespace the init runs in.
            for d in ("lower", "upper", "work"):
                (base / d).mkdir()
            mount = (
                f"mount -t overlay overlay -o lowerdir={base}/lower,upperdir={base}/upper,"
                f'workdir={base}/work {data} && exec "$@"'
            )
            command = ["sh", "-c", mount, "sh", *init]
        else:
            command = init
        if prelude:  # shell run by the namespace's PID 1 before it becomes the init
            command = ["sh", "-c", f'{prelude}\nexec "$@"', "sh", *command]
        log_path = base / "init.log"
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
             *command],
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env=environ,
            start_new_session=True,
        )  # fmt: skip
        running = RunningInit(proc, log_path, status_file, socket, environ)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            os.killpg(running.proc.pid, signal.SIGKILL)
            running.proc.wait(10)


def test_compiles_are_not_ready_while_the_image_cannot_be_installed_and_status_says_why(
    start_init: Callable[..., RunningInit], short_tmp: Path
) -> None:
    (short_tmp / "empty").mkdir()
    init = start_init(OVERLEAF_INIT_TEXLIVE_TARBALL_DIR=str(short_tmp / "empty"))
    init.wait_engine("ready")
    wait_for(lambda: init.status().get("texlive", {}).get("state") == "failed", 30, "failed")
    code, line = init.probe("ready")
    assert code == 1
    assert line.startswith("ready: no: compiles cannot run yet: TeX Live image busybox:test")
    assert f"no tarball for busybox:test at {short_tmp}/empty/busybox_test.tar" in line
    assert "docker save busybox:test" in line
    assert init.probe("healthy")[0] == 0  # the site itself is up
    services = {s["name"]: s for s in init.status()["services"]}
    assert services["texlive"]["state"] == "down"  # finished, not restarted in a loop
    assert services["texlive"]["restarts"] == 0


def test_dockerd_on_ext4_is_ready_with_overlay2_and_runs_a_container(
    start_init: Callable[..., RunningInit],
) -> None:
    init = start_init(services={"web": "echo DOCKER_HOST=$DOCKER_HOST; exec sleep 1000"})
    engine = init.wait_engine("ready")
    assert engine["driver"] == "overlay2"
    assert engine["ready"] is True
    # The engine's socket is root's; the services (www-data) get the proxy's, in their group.
    socket_stat = init.socket.stat()
    assert (socket_stat.st_uid, socket_stat.st_gid) == (0, 0)
    proxy_socket = init.status_file.parent / "docker.sock"
    wait_for(proxy_socket.exists, 10, "the proxy's socket")
    proxy_stat = proxy_socket.stat()
    assert proxy_stat.st_gid == grp.getgrnam("www-data").gr_gid
    assert proxy_stat.st_mode & 0o777 == 0o660
    # The installer loads the compile image from its tarball once dockerd answers.
    wait_for(lambda: init.status()["texlive"]["state"] == "done", 30, "the installer done")
    assert init.status()["texlive"]["ready"] is True
    assert "texlive: busybox:test present (load)" in init.log()
    shown = init.cli("status")
    assert "texlive: busybox:test  present (load) (default)" in shown.stdout
    ran = init.docker("run", "--rm", "--network", "none", "busybox:test", "/bin/busybox", "echo",
                      "hello from the inner engine")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "hello from the inner engine"
    assert "dockerd: ready in" in init.log()
    assert init.probe("ready") == (0, "ready: yes: compiles can run")
    assert init.probe("healthy")[0] == 0
    code, checks = init.doctor()
    by_name = {c["name"]: c for c in checks}
    assert code == 0, checks
    assert by_name["privileges"]["status"] == "ok"
    assert by_name["dockerd"]["status"] == "ok"
    assert by_name["storage driver"]["message"] == "dockerd uses overlay2"

    code, took = init.stop()
    assert code == 0
    assert took < 8
    log = init.log()
    assert "dockerd: stopped: exited with status 0" in log, log[-2000:]
    # dockerd started first and stops last, after the services.
    assert log.index("dockerd: started") < log.index("web: started")
    assert log.index("web: stopped") < log.index("dockerd: stopping")
    # The proxy starts after dockerd, before the services, and stops between them.
    assert log.index("dockerd: started") < log.index("engine-proxy: started")
    assert log.index("engine-proxy: started") < log.index("web: started")
    assert log.index("web: stopped") < log.index("engine-proxy: stopped")
    assert log.index("engine-proxy: stopped") < log.index("dockerd: stopping")
    assert f"web | DOCKER_HOST=unix://{proxy_socket}" in log
    assert str(init.socket.parent) not in Path("/proc/self/mountinfo").read_text()


def test_doctor_beside_a_running_compile_leaves_it_alone(
    start_init: Callable[..., RunningInit],
) -> None:
    """doctor asks the engine whether it answers; it never sweeps compile containers (a sweep
    killed a compile in progress, reported to its user as a LaTeX error)."""
    init = start_init()
    init.wait_engine("ready")
    wait_for(lambda: init.status()["texlive"]["state"] == "done", 30, "the installer done")
    compile_ = init.docker(
        "run", "-d", "--network", "none", "--label", "sharelatex-init.compile=1",
        "busybox:test", "/bin/busybox", "sh", "-c", "sleep 4; exit 7",
    )  # fmt: skip
    assert compile_.returncode == 0, compile_.stderr
    container = compile_.stdout.strip()
    code, checks = init.doctor()
    assert code == 0, checks
    assert {c["name"]: c["status"] for c in checks}["dockerd"] == "ok"
    # The compile ends on its own terms, with its own status, not killed (137) by doctor.
    waited = init.docker("wait", container)
    assert waited.stdout.strip() == "7", (waited.stdout, waited.stderr)
    assert init.docker("inspect", container).returncode == 0  # still there: nobody swept it
    # An engine that starts again sweeps what is left of ours: that is the only sweep.
    ready_since = init.engine()["since"]
    os.kill(init.dockerd().pid, signal.SIGKILL)  # type: ignore[union-attr]
    wait_for(
        lambda: init.engine().get("state") == "ready" and init.engine()["since"] > ready_since,
        30,
        "the engine ready again",
    )
    assert init.docker("ps", "-aq", "--filter", "label=sharelatex-init.compile").stdout == ""


def test_data_root_on_overlayfs_is_refused_with_the_volume_fix(
    start_init: Callable[..., RunningInit],
) -> None:
    init = start_init(overlay=True)
    engine = init.wait_engine("refused")
    # In a real container the data root is /var/lib/docker; here it is under tmp_path.
    fix = f"-v /var/sharelatex/docker-images:{init.socket.parent / 'data'}"
    assert engine["fix"].startswith(fix)
    assert init.dockerd() is None
    assert fix in init.log()
    code, said = init.probe("ready")
    assert code == 1 and "dind engine is not ready" in said
    # The engine proxy starts beside the refused engine (the init's child, a moment after the
    # refusal is reported); the doctor asks it too, so only once it answers.
    proxy = init.status_file.parent / "docker.sock"
    wait_for(lambda: connect_error(proxy) is None, 10, "the engine proxy to answer")
    code, checks = init.doctor()
    assert code == 1
    failed = [c for c in checks if c["status"] == "fail"]
    assert len(failed) == 1, checks
    assert failed[0]["name"] == "dockerd" and failed[0]["fix"].startswith(fix)
    code, _ = init.stop()
    assert code == 0


def test_a_second_init_on_the_same_data_root_is_refused_at_once_and_the_first_keeps_it(
    start_init: Callable[..., RunningInit],
) -> None:
    """Two containers on one /var/lib/docker volume (an old one still running, a compose
    project scaled to two): the second engine's containerd would wait forever on the first's
    metadata database, dockerd restarting it every 15 s, silent on why (a CI run's e2e sites
    hung so). The second is refused with the fix, its dockerd never started; the first is
    untouched; once the first has ended, the volume is free again."""
    first = start_init()
    first.wait_engine("ready")
    data = first.socket.parent / "data"
    second = start_init(data_root=data)
    engine = second.wait_engine("refused", timeout=10)
    assert time.monotonic() - second.started < 10
    assert engine["reason"].startswith(f"another engine is using {data} ")
    assert engine["fix"].startswith("stop the other container first")
    assert second.dockerd() is None
    assert f"another engine is using {data}" in second.log()
    code, said = second.probe("ready")
    assert code == 1 and "another engine is using" in said, said
    assert second.stop()[0] == 0
    assert first.engine()["state"] == "ready"
    assert first.docker("info", "--format", "{{.Driver}}").returncode == 0
    assert first.stop()[0] == 0
    third = start_init(data_root=data)
    third.wait_engine("ready")
    assert third.stop()[0] == 0


def test_overlayfs_with_the_vfs_opt_in_runs_on_vfs(start_init: Callable[..., RunningInit]) -> None:
    init = start_init(overlay=True, SANDBOXED_COMPILES_STORAGE_DRIVER="vfs")
    engine = init.wait_engine("ready")
    assert engine["driver"] == "vfs"
    assert "vfs" in init.log() and "disk" in init.log()
    code, _ = init.stop()
    assert code == 0


def test_dockerd_killed_comes_back_ready_within_ten_seconds(
    start_init: Callable[..., RunningInit],
) -> None:
    init = start_init()
    init.wait_engine("ready")
    first = init.dockerd()
    assert first is not None
    killed_at = time.monotonic()
    first.kill()
    init.wait_engine("down", timeout=5)
    init.wait_engine("ready", timeout=10)
    assert time.monotonic() - killed_at < 10
    second = init.dockerd()
    assert second is not None and second.pid != first.pid
    assert init.docker("version").returncode == 0
    code, _ = init.stop()
    assert code == 0


def test_stale_pidfile_and_socket_from_an_unclean_stop_are_cleared(
    start_init: Callable[..., RunningInit],
) -> None:
    first = start_init()
    first.wait_engine("ready")
    base = first.socket.parent
    # The whole container killed at once: dockerd leaves its socket and its pidfile.
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    pidfile = base / "exec.pid"
    pidfile.write_text("999999")  # names no live dockerd
    assert first.socket.is_socket()
    second = start_init(
        data_root=base / "data",
        OVERLEAF_INIT_DOCKER_EXEC_ROOT=str(base / "exec"),
        OVERLEAF_INIT_DOCKER_SOCKET=str(first.socket),
    )
    second.wait_engine("ready")
    log = second.log()
    assert f"removing {pidfile}, left by an unclean stop" in log
    assert f"removing {first.socket}, left by an unclean stop" in log
    assert second.docker("version").returncode == 0
    code, _ = second.stop()
    assert code == 0


def test_without_privileges_the_init_exits_78_with_both_fixes(short_tmp: Path) -> None:
    # A root without CAP_SYS_ADMIN, as in a container run without --privileged.
    done = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-m", "init", "run",
         "--service-dir", str(short_tmp / "none"), "--startup-dir", str(short_tmp / "none"),
         "--container-env", str(short_tmp / "ce"), "--status-file", str(short_tmp / "st.json")],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "SANDBOXED_COMPILES": "true", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 78, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if "error" in line]
    assert len(errors) == 1, done.stdout
    assert "docker-in-docker needs `--privileged`" in errors[0]
    assert "CAP_SYS_ADMIN" in errors[0]
    assert "SANDBOXED_COMPILES_SIBLING_CONTAINERS=true" in errors[0]
    assert "/var/run/docker.sock:/var/run/docker.sock" in errors[0]
    assert "Traceback" not in done.stdout + done.stderr


def test_a_dockerd_that_never_answers_fails_with_its_last_lines(
    start_init: Callable[..., RunningInit], short_tmp: Path
) -> None:
    # A real way for dockerd to hang: a containerd socket nobody serves. It retries forever.
    init = start_init(
        OVERLEAF_INIT_DOCKERD_ARGS=f"{ENGINE_ARGS} --containerd={short_tmp}/none.sock",
        OVERLEAF_INIT_DOCKERD_READY_TIMEOUT="3",
    )
    engine = init.wait_engine("failed", timeout=30)
    assert "no answer on" in engine["reason"] and "in 3 s" in engine["reason"]
    assert "dockerd said:" in engine["reason"]
    assert "none.sock" in engine["reason"]  # its last lines name what it waits for
    assert engine["ready"] is False
    code, _ = init.stop()
    assert code == 0


def test_a_stale_containerd_pidfile_naming_a_live_unrelated_process_is_cleared(
    start_init: Callable[..., RunningInit],
) -> None:
    # The quick restart's case: the last boot's containerd pidfile names a pid alive in the
    # new namespace, as something else. dockerd took it for containerd: "containerd is still
    # running", 15 s waiting for its socket, exit 1, over and over (26 also SIGTERMs that pid).
    first = start_init()
    first.wait_engine("ready")
    base = first.socket.parent
    os.killpg(first.proc.pid, signal.SIGKILL)  # an unclean stop: the whole namespace at once
    first.proc.wait(10)
    pidfile = base / "exec" / "containerd" / "containerd.pid"
    assert pidfile.exists()
    pidfile.write_text("2")  # the sleep below: pid 2 of the new namespace
    began = time.monotonic()
    second = start_init(
        data_root=base / "data",
        prelude="sleep 1000 &",
        OVERLEAF_INIT_DOCKER_EXEC_ROOT=str(base / "exec"),
        OVERLEAF_INIT_DOCKER_SOCKET=str(first.socket),
    )
    second.wait_engine("ready", timeout=30)
    ready_in = time.monotonic() - began
    print(f"engine ready {ready_in:.1f} s after the restart")
    assert ready_in < 12, f"ready after {ready_in:.1f} s; dockerd waits 15 s for containerd"
    assert f"removing {pidfile}, left by an unclean stop" in second.log()
    assert "still running" not in second.log()
    sleeps = [p for p in second.init_process.children() if p.name() == "sleep"]
    assert sleeps, "the unrelated process was ended"
    assert second.docker("version").returncode == 0
    code, _ = second.stop()
    assert code == 0


def test_runsc_is_registered_with_the_inner_dockerd_and_named_by_status_and_doctor(
    start_init: Callable[..., RunningInit],
) -> None:
    require(Path("/usr/bin/runsc").exists(), "needs runsc (apt-get install runsc)")
    init = start_init(OVERLEAF_INIT_COMPILE_RUNTIME="runsc")
    engine = init.wait_engine("ready")
    assert engine["runtimes"].startswith("runsc (gVisor, platform ")
    info = init.docker("info", "--format", "{{json .Runtimes}}")
    args = json.loads(info.stdout)["runsc"]["runtimeArgs"]
    assert args[:2] == ["--network=none", "--oci-seccomp"] and args[2].startswith("--platform=")
    wait_for(lambda: init.status()["texlive"]["state"] == "done", 30, "the installer done")
    # gVisor's own kernel answers (it says Linux 4.4.0), not the host's.
    ran = init.docker("run", "--rm", "--runtime", "runsc", "--network", "none", IMAGE,
                      "/bin/busybox", "uname", "-r")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "4.4.0" != os.uname().release
    assert "compiles under runsc (gVisor, platform" in init.cli("status").stdout
    code, checks = init.doctor()
    assert code == 0, checks
    runtime_check = next(c for c in checks if c["name"] == "runtime")
    assert runtime_check["status"] == "ok", checks
    assert runtime_check["message"].startswith("compiles run under runsc (gVisor, platform ")
    assert "compiles run under runsc (gVisor, platform" in init.log()
    assert init.stop()[0] == 0


def test_kvm_asked_where_it_cannot_run_exits_78_with_the_reason(
    start_init: Callable[..., RunningInit],
) -> None:
    from init.engine import runtime

    require(Path("/usr/bin/runsc").exists(), "needs runsc (apt-get install runsc)")
    problem = runtime.kvm_problem(Path("/"))
    init = start_init(OVERLEAF_INIT_COMPILE_RUNTIME="runsc", OVERLEAF_INIT_RUNSC_PLATFORM="kvm")
    if not problem:  # a machine whose KVM gVisor can use
        assert init.wait_engine("ready")["runtimes"].startswith("runsc (gVisor, platform kvm)")
        return
    assert init.proc.wait(30) == 78
    assert f"OVERLEAF_INIT_RUNSC_PLATFORM=kvm cannot run here: {problem}" in init.log()
