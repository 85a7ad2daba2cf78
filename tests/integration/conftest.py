"""What the integration tests share: the root rule, waiting on conditions, inits in PID namespaces.

Tests marked `root` skip on a developer machine that is not root, but never in CI (CI set):
there the missing privilege is a failure, so the suite cannot pass by skipping itself.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psutil
import pytest

from tests.conftest import BACKGROUND, KEEP, locked, mtime, remove_later

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
INIT = (PYTHON, "-m", "init")
IN_NEW_PID_NAMESPACE = ("unshare", "--pid", "--fork", "--mount-proc")
# So no variable of the machine's own environment (SANDBOXED_COMPILES, ...) reaches an init.
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONPATH": str(REPO),
}

T = TypeVar("T")


def require(condition: bool, why: str) -> None:
    """Skip on a developer machine that lacks something; never skip in CI."""
    if condition:
        return
    if "CI" in os.environ:
        pytest.fail(f"CI must run this test: {why}", pytrace=False)
    pytest.skip(why)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require(os.geteuid() == 0, "needs root")


@pytest.fixture
def needs_unshare() -> None:
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")


def wait_for(
    condition: Callable[[], T], timeout: float, what: str = "the condition", every: float = 0.02
) -> T:
    """Poll `condition` until it returns something true; its value, or AssertionError. `every`:
    the pause between two polls (longer for a condition that costs much to ask)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_script(path: Path, body: str) -> Path:
    """An executable `#!/bin/sh` script (the body is dedented by the caller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def zombies(pid: int) -> list[int]:
    """Descendants of `pid` that have exited and not been reaped."""
    found = []
    for child in descendants(pid):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def cmdlines(processes: Sequence[psutil.Process]) -> list[list[str]]:
    lines = []
    for p in processes:
        try:
            lines.append(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return lines


class Layout:
    """The init's directories under one base dir; `marks` is where test services write."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.services = base / "service"
        self.startup = base / "my_init.d"
        self.pre = base / "my_init.pre_shutdown.d"
        self.post = base / "my_init.post_shutdown.d"
        self.env = base / "container_environment"
        self.status_file = base / "run" / "status.json"
        self.marks = base / "marks"
        for d in (self.services, self.startup, self.pre, self.post, self.marks):
            d.mkdir(parents=True, exist_ok=True)

    def service(
        self, name: str, run: str, *, down: bool = False, down_signal: str | None = None
    ) -> Path:
        directory = self.services / name
        write_script(directory / "run", run)
        if down:
            (directory / "down").touch()
        if down_signal is not None:
            (directory / "down-signal").write_text(down_signal + "\n")
        return directory

    def run_argv(self, grace: float = 5.0, *extra: str) -> list[str]:
        return [
            *INIT, "run",
            "--service-dir", str(self.services),
            "--startup-dir", str(self.startup),
            "--pre-shutdown-dir", str(self.pre),
            "--post-shutdown-dir", str(self.post),
            "--container-env", str(self.env),
            "--status-file", str(self.status_file),
            "--grace", str(grace),
            *extra,
        ]  # fmt: skip


@dataclass
class Running:
    """A process the test started (in its own session) and, inside it, the init's host pid."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    init_pid: int
    status_file: Path | None = None

    def signal(self, signum: int) -> None:
        os.kill(self.init_pid, signum)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        if self.status_file is None:
            raise RuntimeError("no status file for this run")
        try:
            document: dict[str, Any] = json.loads(self.status_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return document

    def service(self, name: str) -> dict[str, Any]:
        for entry in self.status().get("services", []):
            if entry["name"] == name:
                return dict(entry)
        return {}

    def wait_service(self, name: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        """The service's status entry once it is in `state`."""
        try:
            return wait_for(
                lambda: (entry := self.service(name)).get("state") == state and entry,
                timeout,
                f"{name} {state}",
            )
        except AssertionError:
            raise AssertionError(f"{name} never {state}; log:\n{self.log()}") from None

    def descendants(self) -> list[psutil.Process]:
        return descendants(self.init_pid)

    def zombies(self) -> list[int]:
        return zombies(self.init_pid)


@pytest.fixture
def start(tmp_path: Path, needs_unshare: None) -> Iterator[Callable[..., Running]]:
    """start(argv, pid1=True, status_file=None, env=None, cwd=None) -> Running.

    With pid1 the argv runs as PID 1 of a new PID namespace and `init_pid` is its host pid;
    else it runs as a plain child. Teardown SIGKILLs the session by pid: killing a namespace's
    PID 1 ends everything inside it.
    """
    started: list[Running] = []

    def run(
        argv: Sequence[str],
        *,
        pid1: bool = True,
        status_file: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Running:
        log_path = tmp_path / f"init-{len(started)}.log"
        command = [*IN_NEW_PID_NAMESPACE, *argv] if pid1 else list(argv)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**CLEAN_ENV, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        running = Running(proc, log_path, proc.pid, status_file)
        started.append(running)
        if pid1:
            # A short-lived init (wrap mode, `sh -c 'exit 3'`) can exec, run and end between two
            # looks on a busy machine: then unshare has ended too, and its pid stands in (a
            # zombie until reaped, so signalling it reaches no other process).
            running.init_pid = wait_for(
                lambda: _exec_child(proc.pid, argv[0]) or (_ended(proc) and proc.pid),
                10,
                "the namespace's PID 1 to exec",
            )
        return running

    yield run
    for running in started:
        # Not PID 1, what the init started lives on without it (own sessions and groups).
        left = [p.pid for p in running.descendants()]
        # Reaped already (the test waited): its pids may belong to other processes by now.
        mine = () if running.proc.returncode is not None else (running.init_pid, running.proc.pid)
        for pid in (*mine, *left):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            running.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _ended(proc: subprocess.Popen[bytes]) -> bool:
    """Whether `proc` has exited, without reaping it (its pid stays its own)."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _exec_child(unshare_pid: int, program: str) -> int | None:
    """The host pid of unshare's child once it runs `program` (not unshare's forked copy)."""
    for child in descendants(unshare_pid)[:1]:
        try:
            line = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        if line and line[0] == program:
            return child.pid
    return None


# -- a private "host" engine and the product's layout on it (sibling mode, images) ----------

ENGINE_ARGS = ("--bridge=none", "--iptables=false", "--ip-masq=false")
# The socket's group, as a host's `docker` group would be; the services' user is in it.
SOCKET_GROUP = "www-data"
IMAGE = "busybox:test"
COMPILE_LABEL = "sharelatex-init.compile"


def busybox_tar(sh_sleeps: int = 0) -> bytes:
    """A one-binary root filesystem for `docker import`: no registry is reachable here. With
    `sh_sleeps`, its /bin/sh sleeps that many seconds before it runs: a proof container that is
    still running when a test wants it to be."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        if sh_sleeps:
            script = (
                f'#!/bin/busybox sh\n/bin/busybox sleep {sh_sleeps}\nexec /bin/busybox sh "$@"\n'
            )
            member = tarfile.TarInfo("bin/sh")
            member.mode, member.size = 0o755, len(script)
            tar.addfile(member, io.BytesIO(script.encode()))
        else:
            link = tarfile.TarInfo("bin/sh")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def saved_image(tag: str = IMAGE, sh_sleeps: int = 0) -> bytes:
    """`busybox_tar()` as `docker save` writes it (manifest, config, one layer), tagged `tag`:
    what the TeX Live installer's `load` source takes, made with no engine at all."""
    layer = busybox_tar(sh_sleeps)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (
            ("layer/layer.tar", layer),
            (config_name, config),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class HostEngine:
    base: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.base / "d.sock"

    def docker(self, *args: str, stdin: bytes | None = None) -> str:
        done = subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            input=stdin,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout.decode().strip()

    def get(self, path: str) -> Any:
        """The engine's JSON answer to `GET path` on its socket. For what a test polls: a
        `docker ps` costs 18-20 ms of CPU (the CLI's start), this 0.8 ms, the engine's side
        included (200 of each, one quiet engine); 1700 polls of `docker ps` by the compile
        tests' wait for no container were some 35 core-seconds of a full run."""
        connection = UnixHTTPConnection(self.socket)
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
            body = answer.read()
        finally:
            connection.close()
        assert answer.status == 200, f"GET {path}: {answer.status} {body!r}"
        return json.loads(body)

    def labelled(self, label: str) -> list[str]:
        """`docker ps -aq --filter label=LABEL`: the short ids of the containers, running or
        not, that carry `label`, newest first."""
        filters = quote(json.dumps({"label": [label]}))
        return [c["Id"][:12] for c in self.get(f"/containers/json?all=1&filters={filters}")]


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 to a unix socket (an engine's)."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


def engine_ready() -> bool:
    """Whether a host engine can start here (else `engine`'s `require` says what is missing)."""
    return (
        os.geteuid() == 0
        and all(shutil.which(tool) for tool in ("dockerd", "unshare"))
        and Path("/bin/busybox").exists()
    )


@pytest.fixture(scope="module")
def engine() -> Iterator[HostEngine]:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("dockerd") is not None, "needs dockerd (apt-get install docker.io)")
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    require(Path("/bin/busybox").exists(), "needs busybox-static")
    with ExitStack() as stack:
        yield start_host_engine(stack)


def start_host_engine(
    stack: ExitStack, prefix: Sequence[str] = (), seed: Path | None = None
) -> HostEngine:
    """A private dockerd with busybox:test in it; stopped (by pid) and removed by `stack`.
    `prefix`: what it runs under (tests/conftest.py's BACKGROUND, for an early job's).
    `seed`: an image store to start with (`image_store`)."""
    # Unix socket paths (containerd's under the exec root) have at most 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="sls-", dir="/tmp"))
    stack.callback(remove_later, base)
    if seed is not None:
        seed_data_root(seed, base / "data")
    with (base / "dockerd.log").open("wb") as log:
        proc = subprocess.Popen(
            # In a mount namespace of its own: dockerd bind-mounts its data root onto itself,
            # and an unclean end must not leave that on the host.
            [*prefix, "unshare", "--mount", "--propagation", "private",
             "dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
             "--pidfile", str(base / "d.pid"), "--host", f"unix://{base / 'd.sock'}",
             "--group", SOCKET_GROUP, *ENGINE_ARGS, *runsc_registration(base)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    stack.callback(_stop_engine, proc)
    host = HostEngine(base, proc)
    wait_for(lambda: _answers(host), 30, "the host engine to answer")
    host.docker("import", "-", IMAGE, stdin=busybox_tar())
    return host


@pytest.fixture(scope="session")
def texlive_store() -> Path:
    """The TeX Live image's store, for the compile runner's engines to start with
    (texlive_engine.texlive): made once per image key by a dockerd that loads the suite's cached
    tarball (tests/conftest.py), then stopped; shared by the session's workers and kept for the
    next run (one lock file: the first maker, the others wait). A dir that is there is whole: it
    is made under another name and renamed into place."""
    from tests.conftest import local_image, provide

    image = local_image("texlive")
    store = Path(f"/tmp/slt-{image.key[:16]}")  # on the engines' filesystem: hard links
    with locked(Path(f"{store}.lock")):
        if not store.is_dir():
            with ExitStack() as stack:
                # Niced (its containers too: a build's apt and dpkg, on a machine with no
                # tarball yet): the other workers' tests run beside it.
                engine = start_host_engine(stack, prefix=BACKGROUND)
                provide(f"unix://{engine.socket}", "texlive")
                _stop_engine(engine.proc)
                making = Path(tempfile.mkdtemp(prefix=f"{store.name}.", dir=store.parent))
                for part in ("image", "overlay2"):
                    (engine.base / "data" / part).rename(making / part)
                making.rename(store)
        # Other keys' stores (other sources: worktrees share the machine), as the tarballs.
        others = sorted((d for d in store.parent.glob("slt-*") if d.is_dir() and d != store),
                        key=mtime, reverse=True)  # fmt: skip
        for stale in others[KEEP - 1 :]:
            shutil.rmtree(stale, ignore_errors=True)
    return store


def seed_data_root(store: Path, data: Path) -> None:
    """`store`'s images in the data root `data` of an engine not yet started, in about a second
    where `docker load` takes 6-30 s: the metadata copied (dockerd rewrites some of it), the
    layers' files hard-linked. That is safe because nothing writes a layer's files in place:
    overlayfs only reads a lower layer (a change is copied up into the container's own layer),
    `docker rmi` unlinks its own links, and the layer dirs are each engine's own. The rest of a
    data root (bolt databases written in place, the engine id) each engine makes anew."""
    data.mkdir(parents=True)
    for argv in (["cp", "-a", str(store / "image"), str(data / "image")],
                 ["cp", "-al", str(store / "overlay2"), str(data / "overlay2")]):  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def _stop_engine(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def runsc_registration(base: Path) -> tuple[str, ...]:
    """The engine offers gVisor's runsc as the init registers it (init.engine.runtime), when
    runsc is installed (scripts/setup installs it)."""
    from init.engine import runtime

    if not runtime.RUNSC_BINARY.exists():
        return ()
    args = runtime.runsc_args(runtime.choose_platform("auto"))
    document = {"runtimes": {"runsc": {"path": str(runtime.RUNSC_BINARY), "runtimeArgs": args}}}
    (base / "daemon.json").write_text(json.dumps(document))
    return ("--config-file", str(base / "daemon.json"))


def _answers(host: HostEngine) -> bool:
    if host.proc.poll() is not None:
        log = (host.base / "dockerd.log").read_text(errors="replace")
        raise AssertionError(f"dockerd exited: {log[-2000:]}")
    done = subprocess.run(
        ["docker", "-H", f"unix://{host.socket}", "version"], capture_output=True, timeout=10
    )
    return done.returncode == 0


@dataclass
class Site:
    """One test's ShareLaTeX container as the host engine knows it, and its data dir."""

    engine: HostEngine
    base: Path
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def data_dir(self, name: str = "sharelatex_data") -> Path:
        """A host data dir with the compiles and output dirs the startup scripts would make."""
        data = self.base / name
        for sub in ("data/compiles", "data/output"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        return data

    def volume(self, name: str) -> Path:
        self.engine.docker("volume", "create", name)
        self.volumes.append(name)
        mountpoint = Path(self.engine.docker("volume", "inspect", "-f", "{{.Mountpoint}}", name))
        for sub in ("data/compiles", "data/output"):
            (mountpoint / sub).mkdir(parents=True, exist_ok=True)
        return mountpoint

    def container(self, data_source: str) -> str:
        """`docker create` of the product's layout: the data volume and the socket."""
        container_id = self.engine.docker(
            "create", "-v", f"{data_source}:/var/lib/overleaf",
            "-v", f"{self.engine.socket}:/var/run/docker.sock", IMAGE, "sh",
        )  # fmt: skip
        self.containers.append(container_id)
        return container_id

    def command(
        self,
        *args: str,
        data: Path | None,
        sock: str = "bound",
        sock_source: Path | None = None,
    ) -> tuple[Path, list[str]]:
        """`python -m init.engine.sibling_check` in a private mount namespace with the product's
        view; where its result will be.

        `sock`: bound (the engine's socket, or `sock_source`), missing, or directory. Only the
        namespace sees the tmpfs over /var/lib and /run: the host's stay untouched.
        """
        steps = ["set -e", "mount -t tmpfs tmpfs /var/lib", "mkdir /var/lib/overleaf"]
        if data is not None:
            steps.append(f"mount --bind '{data}' /var/lib/overleaf")
        steps.append("mount -t tmpfs tmpfs /run")  # /var/run -> /run
        if sock == "bound":
            source = sock_source or self.engine.socket
            steps += ["touch /run/docker.sock", f"mount --bind '{source}' /run/docker.sock"]
        elif sock == "directory":
            steps.append("mkdir /run/docker.sock")  # what `-v` makes of a missing host path
        steps.append('exec "$@"')
        result = self.base / f"result-{len(list(self.base.glob('result-*')))}.json"
        return result, [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(steps),
            "sh", PYTHON, "-m", "init.engine.sibling_check", "--result", str(result), *args,
        ]  # fmt: skip

    def check(
        self,
        *args: str,
        data: Path | None,
        sock: str = "bound",
        sock_source: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """The check run to its end (see `command`): its exit status and result."""
        result, command = self.command(*args, data=data, sock=sock, sock_source=sock_source)
        done = subprocess.run(
            command, env={**CLEAN_ENV, **(env or {})}, capture_output=True, timeout=60
        )
        assert result.exists(), done.stderr.decode(errors="replace")
        document: dict[str, Any] = json.loads(result.read_text())
        return done.returncode, document

    def start_check(
        self, *args: str, data: Path, sock_source: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """The check, running: `unshare` and `sh` exec, so the pid is the check's own."""
        _, command = self.command(*args, data=data, sock_source=sock_source)
        return subprocess.Popen(command, env=CLEAN_ENV)

    def proof_containers(self) -> str:
        return self.engine.docker("ps", "-aq", "--filter", f"label={COMPILE_LABEL}")


@pytest.fixture
def site(engine: HostEngine) -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="site-", dir=engine.base))
    made = Site(engine, base)
    yield made
    for container_id in made.containers:
        engine.docker("rm", "-f", container_id)
    for volume in made.volumes:
        engine.docker("volume", "rm", "-f", volume)
    shutil.rmtree(base, ignore_errors=True)
