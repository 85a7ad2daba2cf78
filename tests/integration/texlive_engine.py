"""A module-scoped TeX Live engine for the compile runner's tests: a private dockerd as
conftest's `engine` (socket group www-data) that starts with the TeX Live image in it (built
once per content key, cached as a tarball: tests/conftest.py; loaded once per key into
conftest's `texlive_store`, shared by the workers and runs, which each engine's data root is
seeded from), and a compiles root under its short base dir.

A test module takes the fixtures by name: `texlive = texlive_engine.texlive` and
`compiles = texlive_engine.compiles` at its top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from init.broker.pool import REMOVE_WITHIN
from tests.conftest import provide
from tests.integration.conftest import (
    CLEAN_ENV,
    COMPILE_LABEL,
    HostEngine,
    require,
    start_host_engine,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
TEXLIVE = "sharelatex-init/texlive:bookworm"
WWW_DATA = 33  # the services' user in the ShareLaTeX image: compile dirs are its own
# Small limits, so each attack ends fast; IDLE short, so leftovers show within seconds.
LIMITS = {
    "OVERLEAF_INIT_COMPILE_TIMEOUT": "15",
    "OVERLEAF_INIT_COMPILE_MEMORY": "256m",
    "OVERLEAF_INIT_COMPILE_PIDS": "64",
    "OVERLEAF_INIT_COMPILE_OUTPUT_SIZE": "8m",
    "OVERLEAF_INIT_COMPILE_TMPFS": "64m",
    "OVERLEAF_INIT_COMPILE_IDLE": "2",
    "OVERLEAF_INIT_COMPILE_CONCURRENCY": "4",
}


@pytest.fixture(scope="module")
def texlive(texlive_store: Path) -> Iterator[HostEngine]:
    """A private engine (as conftest's `engine`) that starts with the TeX Live image in it: its
    data root seeded from the session's image store in about a second (conftest's
    `seed_data_root`), where a `docker load` of the cached tarball takes 6-30 s a module."""
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("dockerd") is not None, "needs dockerd (apt-get install docker.io)")
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    require(Path("/bin/busybox").exists(), "needs busybox-static")
    require(shutil.which("debootstrap") is not None, "needs debootstrap (scripts/setup)")
    with ExitStack() as stack:
        engine = start_host_engine(stack, seed=texlive_store)
        # Present by its key already: provide() only looks (else it loads the tarball).
        assert provide(f"unix://{engine.socket}", "texlive").name == TEXLIVE
        yield engine


@dataclass
class Compiles:
    """The compiles root on the test engine's machine and how to run the runner on it."""

    engine: HostEngine
    root: Path
    status_file: Path
    runtime: str = "runc"  # OVERLEAF_INIT_COMPILE_RUNTIME: runc or runsc (gVisor)
    # The compile brokers of this site, by socket: one per environment the tests compile with
    # (a broker reads its settings once); shared with `with_runtime`'s copies, stopped by pid
    # at the site's teardown.
    brokers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def project(self, name: str, files: dict[str, str | bytes]) -> Path:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        for relative, content in files.items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        chown_tree(directory, WWW_DATA)
        return directory

    def env(self, **extra: str) -> dict[str, str]:
        """The site's environment with `extra`, and the socket of a broker started with it."""
        return self.with_broker(self.site_env(**extra))

    def site_env(self, **extra: str) -> dict[str, str]:
        """The site's environment with `extra` (no broker started for it)."""
        return {
            **CLEAN_ENV,
            "DOCKER_HOST": f"unix://{self.engine.socket}",
            "OVERLEAF_INIT_COMPILES_DIR": str(self.root),
            "OVERLEAF_INIT_STATUS_FILE": str(self.status_file),
            **LIMITS,
            "OVERLEAF_INIT_COMPILE_RUNTIME": self.runtime,
            **extra,
        }

    def with_broker(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with BROKER_SOCKET set to a broker's that runs with `env` (started now if
        none does yet)."""
        env = {k: v for k, v in env.items() if k != BROKER_SOCKET}
        key = hashlib.sha256(json.dumps(sorted(env.items())).encode()).hexdigest()[:12]
        socket_path = self.status_file.parent / f"broker-{key}.sock"
        env[BROKER_SOCKET] = str(socket_path)
        broker = self.brokers.get(str(socket_path))
        if broker is None or broker.poll() is not None:
            self.brokers[str(socket_path)] = start_broker(env, socket_path)
        return env

    def broker(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """The broker `env` (from `env()`) compiles through."""
        return self.brokers[env[BROKER_SOCKET]]

    def stop_brokers(self) -> None:
        for key, broker in list(self.brokers.items()):
            if broker.poll() is None:
                broker.send_signal(signal.SIGTERM)
                try:
                    broker.wait(30)
                except subprocess.TimeoutExpired:
                    broker.kill()
                    broker.wait()
            del self.brokers[key]

    def compile(
        self, directory: Path, *args: str, timeout: float = 120, **env: str
    ) -> tuple[int, dict[str, Any], str]:
        """`python -m init.compiles.command DIR --json ARGS`: (exit status, the JSON, stderr)."""
        import json

        done = subprocess.run(
            [sys.executable, "-m", "init.compiles.command", str(directory), "--json", *args],
            capture_output=True, text=True, timeout=timeout, env=self.env(**env), cwd=REPO,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        assert lines, f"no JSON on stdout; stderr:\n{done.stderr}"
        return done.returncode, json.loads(lines[-1]), done.stderr

    def containers(self) -> str:
        """The compile containers' short ids, a line each (`docker ps -aq`'s output)."""
        return "\n".join(self.engine.labelled(COMPILE_LABEL))

    def wait_no_containers(self, timeout: float = REMOVE_WITHIN + 10) -> None:
        """No compile container left: each one retired after a compile is removed behind its
        answer, which the engine may take up to REMOVE_WITHIN to do (0.1 s, mostly)."""
        wait_for(lambda: self.containers() == "", timeout, "no compile container left")


BROKER_SOCKET = "OVERLEAF_INIT_COMPILE_BROKER_SOCKET"


# Holds `count` fds open (made inheritable: they outlive the exec), then becomes the broker:
# every fd the broker opens is past them (a big site's hundreds of warm containers).
HOLDING = (
    "import os, resource, sys; count = int(sys.argv[1]); soft, hard = "
    "resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, "
    "(max(soft, min(hard, count + 1024)), hard)); held = [os.open('/dev/null', os.O_RDONLY) "
    "for _ in range(count)]; [os.set_inheritable(fd, True) for fd in held]; "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def start_broker(
    env: dict[str, str], socket_path: Path, hold_fds: int = 0, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """`python -m init.broker.service` with `env`, once it listens on `socket_path`; its log
    beside the socket. `hold_fds`: that many fds held open below every fd it opens. `prefix`:
    a command it runs under (`prlimit ...`)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    holding = ["-c", HOLDING, str(hold_fds)] if hold_fds else []
    command = [*prefix, sys.executable, *holding, "-m", "init.broker.service"]
    log_path = socket_path.with_suffix(".log")
    before = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        broker = subprocess.Popen(
            command, env={**env, "PYTHONPATH": str(REPO)},
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        # Its line once it listens (the path is there from its bind, before its listen: a
        # connect between the two is refused).
        listening = f"listening on {socket_path}".encode()

        def ready() -> bool:
            with log_path.open("rb") as f:
                f.seek(before)
                return listening in f.read()

        wait_for(lambda: ready() or broker.poll() is not None, 60, "the broker")
    except AssertionError:
        broker.kill()
        broker.wait()
        raise
    assert broker.poll() is None, socket_path.with_suffix(".log").read_text()
    return broker


def chown_tree(directory: Path, uid: int) -> None:
    for root, dirs, files in os.walk(directory):
        os.chown(root, uid, uid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def compiles_root(texlive: HostEngine) -> Iterator[Compiles]:
    base = texlive.base / "site"
    root = base / "compiles"
    root.mkdir(parents=True)
    os.chmod(base, 0o755)
    made = Compiles(texlive, root, base / "status.json")
    try:
        yield made
    finally:
        made.stop_brokers()
    for container in made.containers().split():
        done = subprocess.run(
            ["docker", "-H", f"unix://{texlive.socket}", "rm", "-f", container],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # The container's own idle end (AutoRemove) may be removing it already: that is gone.
        gone = ("No such container", "already in progress")
        assert done.returncode == 0 or any(why in done.stderr for why in gone), done.stderr


# The compiles root for a module (`compiles`), and under another name for a module that makes
# its own `compiles` of it (test_sandbox: one per runtime).
compiles = pytest.fixture(scope="module", name="compiles")(compiles_root)
site = pytest.fixture(scope="module", name="site")(compiles_root)
RUNTIMES = ("runc", "runsc")


def with_runtime(site: Compiles, runtime: str) -> Compiles:
    """`site` compiling under `runtime` (runsc needs it installed: scripts/setup), with a
    compiles root, run dir and status file of its own beside the site's: a project's files
    from one runtime's run are not the next one's."""
    if runtime == "runsc":
        require(Path("/usr/bin/runsc").exists(), "needs runsc (apt-get install runsc)")
    base = site.root.parent / runtime
    (base / "compiles").mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    return dataclasses.replace(
        site,
        runtime=runtime,
        root=base / "compiles",
        status_file=base / "status.json",
    )
