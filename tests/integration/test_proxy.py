"""The engine policy proxy against a real dockerd: attacked, and used as compile runners use it.

A private dockerd (conftest's `engine`), the proxy in front of it (`python -m init.proxy`, as
root, its socket in www-data's group), and clients as www-data, the services' user: the docker
CLI (`docker -H unix://proxy.sock ...`), the init's own light client, and raw bytes for what no
well-behaved client sends. Each hostile case is refused (or neutralised, checked by inspecting
the container through the raw socket); a compile-shaped run works through it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from init.compiles.paths import CompileDir
from init.compiles.profile import Job, container_spec, load_seccomp
from init.compiles.settings import Limits
from init.engine.client import COMPILE_LABEL, EXPIRES_LABEL, DockerBackend
from tests.integration.conftest import CLEAN_ENV, IMAGE, PYTHON, HostEngine, wait_for

pytestmark = pytest.mark.root
WWW_DATA = 33
LIMITS = Limits(memory=256 << 20, pids=64, cpus=0.5, tmpfs=32 << 20, timeout=60.0)


@dataclass
class Proxy:
    engine: HostEngine
    base: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.base / "proxy.sock"

    @property
    def compiles(self) -> Path:
        return self.base / "compiles"

    def log(self) -> str:
        return (self.base / "proxy.log").read_text(errors="replace")

    def docker(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """The docker CLI as www-data, through the proxy."""
        done = subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            capture_output=True, text=True, timeout=60, user=WWW_DATA, group=WWW_DATA,
            env={**CLEAN_ENV, "HOME": str(self.base / "home"),
                 "DOCKER_CONFIG": str(self.base / "home")},
        )  # fmt: skip
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def refused(self, *args: str) -> str:
        done = self.docker(*args, ok=False)
        assert done.returncode != 0, done.stdout
        assert "sharelatex-init proxy:" in done.stderr, done.stderr
        return done.stderr

    def raw(self, data: bytes, answers: int = 1) -> list[tuple[int, bytes]]:
        """`data` written at once (as www-data would: a connected socket), then `answers`
        responses read: (status, body) each."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(self.socket))
            try:
                sock.sendall(data)
            except BrokenPipeError:
                pass  # refused before the whole body was sent (413): the answer is there
            return read_answers(sock, answers)

    def inspect(self, container: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.engine.docker("inspect", container))[0]
        return found


def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    buffer = b""
    found = []
    while len(found) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return found
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buffer) < length:
            buffer += sock.recv(65536)
        found.append((status, buffer[:length]))
        buffer = buffer[length:]
    return found


def request(method: str, target: str, body: Any = None, extra: str = "") -> bytes:
    data = (
        body
        if isinstance(body, bytes)
        else (json.dumps(body).encode() if body is not None else b"")
    )
    head = f"{method} {target} HTTP/1.1\r\nHost: docker\r\n{extra}"
    if body is not None and "Transfer-Encoding" not in extra:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


@pytest.fixture(scope="module")
def proxy(engine: HostEngine) -> Iterator[Proxy]:
    # Not under the engine's dir (0700): www-data must reach the socket and the compile dirs.
    base = Path(tempfile.mkdtemp(prefix="slp-", dir="/tmp"))
    for d in (base / "compiles" / "p1", base / "output", base / "home"):
        d.mkdir(parents=True, exist_ok=True)
    for d in (base / "compiles", base / "compiles" / "p1", base / "output", base / "home"):
        os.chown(d, WWW_DATA, WWW_DATA)
    base.chmod(0o755)
    config = [
        "--listen", str(base / "proxy.sock"), "--engine", str(engine.socket),
        "--group", str(WWW_DATA), "--image", IMAGE,
        "--root", str(base / "compiles"), "--root", str(base / "output"),
        "--memory", str(LIMITS.memory), "--pids", str(LIMITS.pids), "--cpus", "0.5",
        "--tmpfs", str(LIMITS.tmpfs), "--timeout", "60",
    ]  # fmt: skip
    with (base / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(
            [PYTHON, "-m", "init.proxy", *config], stdout=log, stderr=subprocess.STDOUT,
            env={**CLEAN_ENV, "OVERLEAF_INIT_LOG_LEVEL": "debug"},
        )  # fmt: skip
    proxy = Proxy(engine, base, proc)
    try:
        wait_for(lambda: proxy.socket.exists() or proc.poll() is not None, 10, "the proxy")
        assert proc.poll() is None, proxy.log()
        yield proxy
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def bystander(engine: HostEngine) -> Iterator[str]:
    """A container that is not a compile's (in sibling mode: the site itself), running."""
    name = "site-bystander"
    engine.docker("run", "-d", "--name", name, IMAGE, "sh", "-c", "read x")
    try:
        yield name
    finally:
        engine.docker("rm", "-f", name)


def compile_container(proxy: Proxy, name: str) -> str:
    """A running compile container created through the proxy."""
    proxy.docker("create", "--name", name, "--user", "1000:1000", IMAGE, "sh", "-c", "sleep 30")
    proxy.docker("start", name)
    return name


# -- the socket -----------------------------------------------------------------------------------


def test_the_socket_is_the_services_groups_and_the_proxy_stops_on_sigterm(proxy: Proxy) -> None:
    info = proxy.socket.stat()
    assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o660, 0, WWW_DATA)
    assert proxy.docker("version", "--format", "{{.Server.Version}}").stdout.strip()


# -- a compile works ------------------------------------------------------------------------------


def test_a_compile_shaped_run_works_through_the_cli(proxy: Proxy) -> None:
    project = proxy.compiles / "p1"
    done = proxy.docker(
        "run", "--rm", "--user", "33:33", "-v", f"{project}:/compile", "-w", "/compile",
        IMAGE, "sh", "-c", "echo compiled > output.log; echo done; echo warn >&2",
    )  # fmt: skip
    assert done.stdout.strip() == "done" and done.stderr.strip() == "warn"
    assert (project / "output.log").read_text() == "compiled\n"


def test_create_start_attach_logs_wait_remove_step_by_step(proxy: Proxy) -> None:
    project = proxy.compiles / "p1"
    name = "step-by-step"
    proxy.docker("create", "--name", name, "--user", "33:33", "-v", f"{project}:/compile",
                 IMAGE, "sh", "-c", "echo one; echo two >&2; exit 3")  # fmt: skip
    started = proxy.docker("start", "-a", name, ok=False)
    assert started.returncode == 3 and started.stdout == "one\n" and started.stderr == "two\n"
    assert proxy.docker("wait", name).stdout.strip() == "3"
    logs = proxy.docker("logs", name)
    assert (logs.stdout, logs.stderr) == ("one\n", "two\n")
    proxy.docker("rm", name)
    assert name not in proxy.engine.docker("ps", "-a", "--format", "{{.Names}}")


def test_a_created_container_carries_the_profile_and_the_labels(proxy: Proxy) -> None:
    name = compile_container(proxy, "profiled")
    try:
        found = proxy.inspect(name)
        host = found["HostConfig"]
        assert host["NetworkMode"] == "none" and found["Config"]["NetworkDisabled"] is True
        assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert (host["Memory"], host["MemorySwap"], host["PidsLimit"]) == (
            LIMITS.memory, LIMITS.memory, LIMITS.pids,
        )  # fmt: skip
        assert host["NanoCpus"] == 5 * 10**8 and "/tmp" in host["Tmpfs"]
        labels = found["Config"]["Labels"]
        assert labels[COMPILE_LABEL] == "1"
        assert float(labels[EXPIRES_LABEL]) <= time.time() + LIMITS.deadlines.lifetime + 1
        # The container itself: no capability, a read-only root, /tmp capped.
        done = proxy.docker("exec", name, "sh", "-c", "grep CapEff /proc/self/status; "
                            "touch /x 2>&1; busybox df -k /tmp | busybox tail -1")  # fmt: skip
        assert "CapEff:\t0000000000000000" in done.stdout
        assert "Read-only file system" in done.stdout
        assert f" {LIMITS.tmpfs >> 10} " in done.stdout
    finally:
        proxy.docker("rm", "-f", name)


def test_the_inits_own_runner_compiles_through_the_proxy(proxy: Proxy) -> None:
    project = proxy.compiles / "p1"
    directory = CompileDir(project, project, "p1", WWW_DATA, WWW_DATA)
    job = Job(directory, ("sh", "-c", "echo from-exec; id -u"), IMAGE)
    spec = container_spec(job, LIMITS, load_seccomp(lambda _: None))
    backend = DockerBackend(f"unix://{proxy.socket}", 30, 5)
    container = backend.start(spec.name, spec.create_body())
    try:
        execution = backend.exec(container, list(job.command), spec.user, spec.working_dir, {})
        # The project's own uid (init.compiles.identity): a number the proxy lets through.
        expected = f"from-exec\n{directory.compile_uid}\n".encode()
        assert b"".join(execution.stream()) == expected
        assert execution.exit_code() == 0
        assert not backend.oom_killed(container, time.time() - 60)  # the events call passes
        assert [c["Id"] for c in backend.containers()] == [container]  # compile ones only
    finally:
        backend.remove(container)


def test_server_pros_runner_is_brought_to_the_profile(proxy: Proxy) -> None:
    project = proxy.compiles / "p1"
    body = {
        "Cmd": ["sh", "-c", "echo sp"], "Image": IMAGE, "WorkingDir": "/compile",
        "NetworkDisabled": True, "Memory": 1 << 40, "User": "33", "Env": ["HOME=/tmp"],
        "HostConfig": {"Binds": [f"{project}:/compile:rw"],
                       "LogConfig": {"Type": "none", "Config": {}},
                       "Ulimits": [{"Name": "cpu", "Soft": 65, "Hard": 70}], "CapDrop": ["ALL"],
                       "SecurityOpt": ["no-new-privileges"]},
    }  # fmt: skip
    name = "project-abc-0123"
    [(status, _)] = proxy.raw(request("GET", f"/containers/{name}/json"))
    assert status == 404  # what Server Pro's runner needs to create one
    [(status, created)] = proxy.raw(request("POST", f"/containers/create?name={name}", body))
    assert status == 201, created
    try:
        host = proxy.inspect(name)["HostConfig"]
        assert (host["Memory"], host["NetworkMode"], host["ReadonlyRootfs"]) == (
            LIMITS.memory, "none", True,
        )  # fmt: skip
    finally:
        proxy.engine.docker("rm", "-f", name)


def test_chunked_bodies_and_keep_alive_work(proxy: Proxy) -> None:
    body = json.dumps({"Image": IMAGE, "User": "1000", "Cmd": ["true"]}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    data = (
        request("GET", "/_ping")
        + request("POST", "/v1.41/containers/create?name=chunky", chunked,
                  "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n")
        + request("DELETE", "/v1.41/containers/chunky?force=1")
    )  # fmt: skip
    answers = proxy.raw(data, 3)
    assert [status for status, _ in answers] == [200, 201, 204], answers


# -- attacks: each refused or neutralised ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--privileged"], "privileged"),
        (["--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined"], "capabilities"),
        (["--security-opt", "seccomp=unconfined"], "seccomp=unconfined"),
        (["--security-opt", "apparmor=unconfined"], "apparmor=unconfined"),
        (["-v", "/:/host"], "not under"),
        (["-v", "/var/run/docker.sock:/var/run/docker.sock"], "not under"),
        (["--network", "host"], "network mode 'host'"),
        (["--pid", "host"], "PidMode"),
        (["--pid", "host", "--user", "0"], "is root"),
        (["--user", "0"], "is root"),
        (["--ipc", "host"], "IpcMode"),
        (["--uts", "host"], "UTSMode"),
        (["--userns", "host"], "UsernsMode"),
        (["--device", "/dev/null:/dev/sda"], "Devices"),
        (["--volumes-from", "site-bystander"], "VolumesFrom"),
        (["--network", "container:site-bystander"], "container:site-bystander"),
        (["--sysctl", "kernel.shmmax=1"], "Sysctls"),
        (["--log-driver", "syslog"], "log driver"),
        (["--mount", "type=volume,dst=/x,volume-opt=type=none,volume-opt=o=bind,"
                     "volume-opt=device=/"], "volume"),
    ],
)  # fmt: skip
def test_escapes_through_docker_run_are_refused(
    proxy: Proxy, bystander: str, args: list[str], why: str
) -> None:
    user = [] if "--user" in args else ["--user", "1000"]
    assert why in proxy.refused("run", "--rm", *user, *args, IMAGE, "true")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["pull", "alpine"], "POST /images/create"),
        (["import", "/dev/null", "x:y"], "POST /images/create"),
        (["volume", "create", "-d", "local", "-o", "type=none", "-o", "o=bind", "-o", "device=/",
          "v"], "POST /volumes/create"),
        (["plugin", "install", "--grant-all-permissions", "vieux/sshfs"], "/plugins/"),
        (["swarm", "init"], "POST /swarm/init"),
        (["secret", "ls"], "GET /secrets"),
        (["network", "create", "n"], "POST /networks/create"),
        (["run", "--rm", "--user", "1000", "alpine", "true"], "not an allowed"),
    ],
)  # fmt: skip
def test_everything_but_compiles_is_refused(proxy: Proxy, args: list[str], why: str) -> None:
    assert why in proxy.refused(*args)


def test_build_is_refused(proxy: Proxy) -> None:
    [(status, body)] = proxy.raw(
        request("POST", "/v1.41/build?t=x", b"tar", "Content-Type: application/x-tar\r\n")
    )
    assert status == 403 and b"POST /build is not a call" in body


def test_exec_and_attach_into_a_container_not_a_compiles_are_refused(
    proxy: Proxy, bystander: str
) -> None:
    assert "is not a compile container" in proxy.refused("exec", bystander, "true")
    assert "is not a compile container" in proxy.refused("logs", bystander)
    assert "is not a compile container" in proxy.refused("rm", "-f", bystander)
    assert "is not a compile container" in proxy.refused("inspect", bystander)
    [(status, _)] = proxy.raw(request("POST", f"/containers/{bystander}/attach?stdin=1&stream=1"))
    assert status == 403
    assert bystander not in proxy.docker("ps", "-a", "--format", "{{.Names}}").stdout


def test_updating_renaming_or_copying_into_a_compile_container_is_refused(proxy: Proxy) -> None:
    name = compile_container(proxy, "kept-in-profile")
    try:
        assert "POST /containers/" in proxy.refused(
            "update", "--memory", "8g", "--pids-limit", "-1", name
        )
        assert "rename" in proxy.refused("rename", name, "other")
        assert "archive" in proxy.refused("cp", "/etc/hostname", f"{name}:/tmp/x")
        assert "POST /commit" in proxy.refused("commit", name, "x:y")
        assert proxy.inspect(name)["HostConfig"]["Memory"] == LIMITS.memory
    finally:
        proxy.docker("rm", "-f", name)


def test_a_bind_through_a_link_planted_under_the_compiles_root_is_refused(proxy: Proxy) -> None:
    link = proxy.compiles / "planted"
    link.symlink_to("/etc")
    try:
        assert "outside" in proxy.refused(
            "run", "--rm", "--user", "1000", "-v", f"{link}:/x", IMAGE, "true"
        )
        assert "contains '..'" in proxy.refused(
            "run", "--rm", "--user", "1000", "-v", f"{proxy.compiles}/p1/../..:/x", IMAGE, "true"
        )
        assert "is the root" in proxy.refused(
            "run", "--rm", "--user", "1000", "-v", f"{proxy.compiles}:/x", IMAGE, "true"
        )
    finally:
        link.unlink()


def test_systempaths_unconfined_is_neutralised(proxy: Proxy) -> None:
    done = proxy.docker(
        "run", "--rm", "--user", "1000", "--security-opt", "systempaths=unconfined", IMAGE,
        "busybox", "grep", "-c", "-e", "/proc/kcore", "-e", "/proc/timer_list",
        "/proc/self/mountinfo",
    )  # fmt: skip
    assert int(done.stdout) >= 1  # still masked


def test_the_bridge_network_becomes_none(proxy: Proxy) -> None:
    proxy.docker(
        "create", "--name", "netless", "--user", "1000", "--network", "bridge", IMAGE, "true"
    )
    try:
        assert proxy.inspect("netless")["HostConfig"]["NetworkMode"] == "none"
    finally:
        proxy.docker("rm", "netless")


def privileged_create(**change: Any) -> dict[str, Any]:
    return {"Image": IMAGE, "User": "1000", "Cmd": ["true"], **change}


PULL = "images/create?fromImage=alpine"
CREATE = "/containers/create"
HEAD = b'{"Image":"busybox:test","User":"1000",'
ALLOW_ALL = 'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}'
BOTH_FRAMINGS = "Transfer-Encoding: chunked\r\nContent-Length: 40\r\n"


@pytest.mark.parametrize(
    ("data", "status", "why"),
    [
        # The path, spelled to slip past a filter that reads the raw text.
        (request("POST", f"/v1.41/containers/x/../../{PULL}"), 403, b"POST /images/create"),
        (request("POST", "/v1.41%2Fimages%2Fcreate?fromImage=x"), 403, b"POST /images/create"),
        (request("POST", "//v1.41//images//create?fromImage=x"), 403, b"POST /images/create"),
        (request("POST", "/v1.41/%69mages/create?fromImage=x"), 403, b"POST /images/create"),
        # An old API version, where start still applied a HostConfig sent with it.
        (request("POST", "/v1.22/containers/x/start", {"Privileged": True}), 400, b"older than"),
        # The body, spelled so the engine reads another thing than a naive check.
        (request("POST", CREATE, HEAD + b'"HostConfig":{"Privileged":false,"Privileged":true}}'),
         400, b"given twice"),
        (request("POST", CREATE, HEAD + b'"HostConfig":{"privileged":true}}'), 403, b"privileged"),
        (request("POST", CREATE, privileged_create(Privileged=True)), 403, b"Privileged is not"),
        (request("POST", CREATE, privileged_create(HostConfig={"SecurityOpt": [ALLOW_ALL]})),
         403, b"by default"),
        (request("POST", CREATE, b"{" + b" " * (2 << 20) + b"}"), 413, b"larger than"),
        # Smuggling: two framings, or a body that is really the next request.
        (request("POST", CREATE, b"0\r\n\r\n", BOTH_FRAMINGS), 400, b"smuggling"),
        (request("POST", "/_ping", b"x", "Transfer-Encoding: identity\r\n"), 400, b"chunked"),
    ],
)  # fmt: skip
def test_hostile_requests_are_refused(proxy: Proxy, data: bytes, status: int, why: bytes) -> None:
    [(got, body)] = proxy.raw(data)
    assert (got, why in body) == (status, True), body
    assert json.loads(body)["message"].startswith("sharelatex-init proxy: ")


def test_a_second_request_in_the_same_write_is_judged_on_its_own(proxy: Proxy) -> None:
    hidden = request(
        "POST", "/containers/create", privileged_create(HostConfig={"Privileged": True})
    )
    answers = proxy.raw(request("GET", "/_ping") + hidden, 2)
    assert [status for status, _ in answers] == [200, 403]
    body = b"PO"  # a Content-Length that ends mid-way: the rest is a request of its own
    answers = proxy.raw(
        request("POST", "/containers/x/kill", body) + b"ST /swarm/init HTTP/1.1\r\n\r\n", 2
    )
    assert answers[0][0] in (400, 404) and answers[-1][0] in (400, 403)


def test_refusals_are_logged_once_with_the_callers_uid(proxy: Proxy) -> None:
    for _ in range(3):
        proxy.refused("run", "--rm", "--user", "1000", "--privileged", IMAGE, "true")
    said = "a privileged container is not allowed"
    lines = [line for line in proxy.log().splitlines() if said in line]
    # The same refusal of the same uid again within a minute is counted, not logged.
    assert len([line for line in lines if f"refused uid {WWW_DATA} (pid " in line]) == 1, lines
