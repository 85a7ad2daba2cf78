"""The TeX Live installer against a real registry (docker-registry) and a private dockerd
(conftest's `engine`), and its offline `build` source from Debian's TeX Live packages.

A throttling TCP proxy sits between the engine and the registry so a pull on loopback lasts a
few seconds: long enough to watch progress, stop the registry mid-pull, or SIGTERM the installer.
The proxy only slows bytes down; what answers is the real registry. The builds run on the base
image `scripts/build-images --only base` imports (debootstrap, cached), against the Debian
mirror, as the recipe does for scripts/build-images.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from init.engine.client import Engine
from init.texlive import install as texlive
from tests.conftest import BACKGROUND, Early, renice_tree
from tests.integration.conftest import (
    CLEAN_ENV,
    REPO,
    HostEngine,
    busybox_tar,
    engine_ready,
    free_port,
    require,
    start_host_engine,
    wait_for,
)

pytestmark = pytest.mark.root

REGISTRY = "/usr/bin/docker-registry"
PADDING = 60_000_000  # random, so gzip cannot shrink it: the pull moves this many bytes


@dataclass
class Proxy:
    """Forwards 127.0.0.1:port to the registry; `rate` bytes/s towards the client when set."""

    upstream: int
    port: int = 0
    rate: float | None = None
    refuse: bool = False  # close new connections at once, as if the registry were gone
    conns: list[socket.socket] = field(default_factory=list)
    listener: socket.socket | None = None

    def start(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if throttle and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        """Close every live connection, as a registry that went away would."""
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self.drop()


@dataclass
class Registry:
    config: Path
    log: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [REGISTRY, "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._answers, 10, "the registry to answer")

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Installs:
    """An engine, and the installer run against it with its status file and log in `base`."""

    engine: HostEngine
    base: Path

    def installer(
        self, *args: str, images: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.base / "installer.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "init.texlive.install", "--socket", str(self.engine.socket),
             "--status", str(self.status_path), "--images", images, *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**CLEAN_ENV, **(env or {})}, start_new_session=True,
        )  # fmt: skip

    @property
    def status_path(self) -> Path:
        return self.base / "status.json"

    def status(self) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return document

    def entry(self) -> dict[str, Any]:
        images = self.status().get("images") or [{}]
        return dict(images[0])

    def log(self) -> str:
        return (self.base / "installer.log").read_text(errors="replace")

    def finish(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"installer still running; log:\n{self.log()}") from None


@dataclass
class World(Installs):
    """The module's engine with a registry behind a throttling proxy."""

    registry: Registry
    proxy: Proxy

    @property
    def image(self) -> str:
        return f"127.0.0.1:{self.proxy.port}/texlive:test"

    def remove(self, image: str | None = None) -> None:
        self.engine.docker("rmi", "-f", image or self.image)

    def installer(
        self, *args: str, images: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return super().installer(*args, images=images or self.image, env=env)


def padded_busybox(size: int) -> bytes:
    """busybox plus `size` random bytes, as one tarball for `docker import`."""
    path = Path(tempfile.mkstemp(prefix="texlive-", dir="/tmp")[1])
    try:
        with path.open("wb") as out, tarfile.open(fileobj=out, mode="w") as tar:
            with tarfile.open(fileobj=io.BytesIO(busybox_tar())) as small:
                for member in small.getmembers():
                    tar.addfile(member, small.extractfile(member) if member.isfile() else None)
            info = tarfile.TarInfo("padding")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        return path.read_bytes()
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def world(engine: HostEngine) -> Iterator[World]:
    require(Path(REGISTRY).exists(), "needs docker-registry (apt-get install docker-registry)")
    base = Path(tempfile.mkdtemp(prefix="tl-", dir=engine.base))  # short: socket paths
    port = free_port()
    config = base / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    registry = Registry(config, base / "registry.log", port)
    proxy = Proxy(port)
    try:
        registry.start()
        proxy.start()
        made = World(engine, base, registry, proxy)
        engine.docker("import", "-", made.image, stdin=padded_busybox(PADDING))
        engine.docker("push", made.image)
        made.remove()
        yield made
    finally:
        proxy.close()
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_pull_reaches_100_percent_and_ready(world: World) -> None:
    world.proxy.rate = 40e6
    proc = world.installer("--once")
    seen = cast(
        dict[str, Any],
        wait_for(
            lambda: 0 < (world.entry().get("percent") or 0) < 100 and world.entry(),
            20,
            "progress under 100%",
        ),
    )
    assert seen["state"] == "installing" and seen["source"] == "pull"
    assert world.status()["ready"] is False
    assert world.finish(proc, 30) == 0, world.log()
    document = world.status()
    entry = document["images"][0]
    assert document["ready"] is True
    assert (entry["state"], entry["percent"], entry["source"]) == ("present", 100.0, "pull")
    assert entry["bytes_total"] >= PADDING
    assert f"texlive: {world.image} present (pull)" in world.log()


def test_present_is_done_at_once(world: World) -> None:
    world.proxy.refuse = True  # no network: a try to reach the registry would fail
    try:
        engine = Engine(f"unix://{world.engine.socket}")
        board = texlive.Board(world.base / "direct.json", [world.image], lambda line: None)
        started = time.monotonic()
        assert texlive.install(engine, world.image, ["pull"], None, board, once=True)
        assert time.monotonic() - started < 0.5
        assert board.document().ready is True
        assert world.finish(world.installer("--once"), 10) == 0
        assert "(already in the engine)" in world.log()
    finally:
        world.proxy.refuse = False


def test_wrong_name_fails_with_a_clear_message(world: World) -> None:
    wrong = f"127.0.0.1:{world.proxy.port}/texlive:no-such-tag"
    started = time.monotonic()
    assert world.finish(world.installer("--source", "pull", images=wrong), 20) == 1
    assert time.monotonic() - started < 15
    entry = world.entry()
    assert entry["state"] == "failed"
    assert "does not exist" in entry["reason"] and "TEX_LIVE_DOCKER_IMAGE" in entry["reason"]
    assert world.status()["ready"] is False


def test_unreachable_registry_is_retried_with_its_reason(world: World) -> None:
    world.remove()
    world.proxy.refuse = True
    proc = world.installer()
    try:
        entry = cast(
            dict[str, Any],
            wait_for(lambda: (e := world.entry()).get("state") == "retrying" and e, 20, "retrying"),
        )
        assert "cannot reach 127.0.0.1:" in entry["reason"], entry
        assert entry["next_try_at"]
    finally:
        world.proxy.refuse = False
    assert world.finish(proc, 30) == 0, world.log()
    assert world.status()["ready"] is True


def test_registry_stopped_mid_pull_then_back(world: World) -> None:
    world.remove()
    world.proxy.rate = 20e6
    proc = world.installer()
    try:
        wait_for(lambda: 0 < (world.entry().get("percent") or 0) < 90, 20, "progress")
        world.registry.stop()
        world.proxy.drop()
        time.sleep(1.5)  # the registry stays down across a retry
        world.registry.start()
        assert world.finish(proc, 60) == 0, world.log()
    finally:
        world.proxy.rate = None
    assert world.status()["ready"] is True, world.log()


def test_tarball_load_and_a_broken_one(world: World, tmp_path: Path) -> None:
    tarballs = tmp_path / "tarballs"
    tarballs.mkdir()
    tarball = tarballs / texlive.tarball_name(world.image)
    world.engine.docker("save", "-o", str(tarball), world.image)
    world.remove()
    args = ("--source", "load", "--tarball-dir", str(tarballs), "--once")
    assert world.finish(world.installer(*args), 30) == 0, world.log()
    entry = world.entry()
    assert (entry["state"], entry["source"], world.status()["ready"]) == ("present", "load", True)

    world.remove()
    tarball.write_bytes(tarball.read_bytes()[: 3 * 1024 * 1024])
    assert world.finish(world.installer(*args), 30) == 1, world.log()
    entry = world.entry()
    assert entry["state"] == "failed" and "is broken" in entry["reason"], entry


def test_sigterm_during_pull_exits_at_once_and_a_later_run_completes(world: World) -> None:
    world.remove()
    world.proxy.rate = 10e6
    proc = world.installer()
    try:
        wait_for(lambda: 0 < (world.entry().get("percent") or 0) < 50, 20, "progress")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert world.finish(proc, 5) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 2.0
        assert world.status()["note"] == "stopped by SIGTERM"
    finally:
        world.proxy.rate = None
    assert world.finish(world.installer("--once"), 30) == 0, world.log()
    assert world.status()["ready"] is True


# -- `texlive install` at a terminal and in a pipe ------------------------------------------------

COLUMNS = 90


def on_a_terminal(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run `argv` with a pty of COLUMNS columns as its terminal; its exit and everything shown."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=CLEAN_ENV, start_new_session=True
    )
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side has closed it
                break
            if not chunk:
                break
            shown += chunk
        return proc.wait(max(1.0, deadline - time.monotonic())), shown.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def install_argv(world: World, *args: str) -> list[str]:
    return [sys.executable, "-m", "init.texlive.install", "install",
            "--engine", f"unix://{world.engine.socket}", *args]  # fmt: skip


def test_install_on_a_terminal_draws_one_line_progress_bar(world: World) -> None:
    world.remove()
    world.proxy.rate = 20e6
    try:
        code, shown = on_a_terminal(install_argv(world, "--source", "pull", world.image), 60)
    finally:
        world.proxy.rate = None
    assert code == 0, shown
    pieces = shown.replace("\x1b[K", "").replace("\n", "\r").split("\r")
    bars = [piece for piece in pieces if re.search(r" \[[=> ]+\] \d+% ", piece)]
    assert len(bars) >= 3, shown  # redrawn in place, several times
    assert all(len(bar) < COLUMNS for bar in bars), bars
    assert any(re.search(r"\d% [\d.]+/6\d\.\d MB [\d.]+ MB/s ETA", bar) for bar in bars), bars
    assert f"texlive: {world.image} present (pull)" in shown
    assert "texlive: pulling" not in shown  # the bar, not the log's progress lines


def test_install_in_a_pipe_prints_plain_lines(world: World) -> None:
    world.remove()
    world.proxy.rate = 12e6  # ~5 s: at least one progress line at LOG_INTERVAL
    try:
        done = subprocess.run(
            install_argv(world, "--source", "pull", world.image),
            capture_output=True, text=True, timeout=60, env=CLEAN_ENV,
        )  # fmt: skip
    finally:
        world.proxy.rate = None
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout and "\x1b" not in done.stdout
    assert f"texlive: pulling {world.image}: " in done.stdout
    assert done.stdout.splitlines()[-1] == f"texlive: {world.image} present (pull)"


def test_install_with_a_bad_source_is_a_usage_error(world: World) -> None:
    done = subprocess.run(
        install_argv(world, "--source", "ftp", world.image),
        capture_output=True, text=True, timeout=30, env=CLEAN_ENV,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--source 'ftp': choose from pull, load, build" in done.stderr
    assert "Traceback" not in done.stderr


# -- the `build` source: offline, from Debian's packages, on the base in the engine ---------------

BUILT = "local/texlive:built"
BUILD_TIMEOUT = 900  # a cold basic-scheme build takes ~50 s here; a slow mirror much longer
UNREACHABLE_MIRROR = "http://127.0.0.1:9/debian"  # the discard port: nothing listens
DOCUMENT = r"""\documentclass{article}
\usepackage{amsmath}
\begin{document}
Built offline: $\int_0^1 x\,dx = \tfrac12$.
\end{document}
"""


@dataclass
class Built:
    """The module's one build, after a first try was stopped by SIGTERM halfway."""

    stopped_code: int
    stopped_seconds: float
    stopped_status: dict[str, Any]
    seen: list[dict[str, Any]]  # the status entry, sampled while the build ran
    code: int
    seconds: float
    log: str
    where: Installs  # the build's own engine (not the registry's), its status and log


def import_base(engine: HostEngine, prefix: Sequence[str] = ()) -> str:
    """scripts/build-images' base (debootstrap + docker import; cached after the first run)."""
    done = subprocess.run(
        [*prefix, str(REPO / "scripts" / "build-images"), "--engine", f"unix://{engine.socket}",
         "--only", "base"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return "sharelatex-init/debian:bookworm"


@pytest.fixture(scope="module")
def base_image(world: World) -> str:
    require(shutil.which("debootstrap") is not None, "needs debootstrap")
    return import_base(world.engine)


def containers(engine: HostEngine, *args: str) -> list[str]:
    return engine.docker("ps", "-q", *args).split()


def build_offline(stack: ExitStack) -> Built:
    """The `build` source in an engine of its own: stopped by SIGTERM once apt is under way,
    then run again to the end, its status sampled. The session's slowest set-up after
    test_images' cold build, so it starts early too (`EARLY`, tests/conftest.py)."""
    # Niced, the engine (and so the build's container) and a debootstrap alike, while the
    # session's other tests run beside it; the installer itself is not: its SIGTERM is timed.
    engine = start_host_engine(stack, prefix=BACKGROUND)
    where = Installs(engine, Path(tempfile.mkdtemp(prefix="tb-", dir=engine.base)))
    base = import_base(engine, prefix=BACKGROUND)
    args = ("--source", "build", "--base-image", base, "--scheme", "basic")  # half small's work
    first = where.installer(*args, images=BUILT)
    stack.callback(_kill, first)
    wait_for(lambda: "apt:" in where.entry().get("note", ""), 300, "apt to be under way")
    first.send_signal(signal.SIGTERM)
    began = time.monotonic()
    stopped_code = where.finish(first, 10)
    stopped_seconds = time.monotonic() - began
    stopped_status = where.status()
    # The engine cancels a build whose client went away: its RUN container goes too.
    wait_for(lambda: not containers(engine), 60, "the stopped build's container to go")

    where.status_path.unlink()  # so every sample below is the second run's
    began = time.monotonic()
    second = where.installer(*args, "--once", images=BUILT)
    stack.callback(_kill, second)
    seen: list[dict[str, Any]] = []
    while second.poll() is None and time.monotonic() - began < BUILD_TIMEOUT:
        if (entry := where.entry()) and (not seen or entry != seen[-1]):
            seen.append(entry)
        time.sleep(0.5)
    code = where.finish(second, 10)
    renice_tree(engine.proc.pid)
    return Built(
        stopped_code, stopped_seconds, stopped_status, seen, code,
        time.monotonic() - began, where.log(), where,
    )  # fmt: skip


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


BUILD = Early(
    "test_texlive: the installer's offline build",
    build_offline,
    ready=lambda: engine_ready() and shutil.which("debootstrap") is not None,
)
EARLY = (BUILD,)


@pytest.fixture(scope="module")
def built(engine: HostEngine) -> Iterator[Built]:
    """The build started early (or now, if the session did not start it); `engine` for its
    `require`s."""
    require(shutil.which("debootstrap") is not None, "needs debootstrap")
    try:
        yield BUILD.result()
    finally:
        BUILD.close()


def test_build_without_the_base_fails_at_once_and_names_the_fix(world: World) -> None:
    began = time.monotonic()
    proc = world.installer(
        "--source", "build", "--base-image", "sharelatex-init/debian:absent", images=BUILT
    )
    assert world.finish(proc, 30) == 1, world.log()  # no --once: permanent, not retried
    assert time.monotonic() - began < 15
    entry = world.entry()
    assert entry["state"] == "failed", entry
    assert "base image sharelatex-init/debian:absent is not in the engine" in entry["reason"]
    assert "scripts/build-images --only base" in entry["reason"]


def test_build_with_an_unreachable_mirror_is_retried_with_its_reason(
    world: World, base_image: str
) -> None:
    proc = world.installer(
        "--source", "build", "--base-image", base_image, images="local/texlive:nomirror",
        env={"DEBIAN_MIRROR": UNREACHABLE_MIRROR, "DEBIAN_SECURITY_MIRROR": ""},
    )  # fmt: skip
    try:
        entry = cast(
            dict[str, Any],
            wait_for(lambda: (e := world.entry()).get("state") == "retrying" and e, 120, "retry"),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        world.finish(proc, 10)
    assert f"cannot reach the Debian mirror {UNREACHABLE_MIRROR}" in entry["reason"], entry
    assert "DEBIAN_MIRROR" in entry["reason"] and entry["next_try_at"]


def test_sigterm_during_a_build_exits_at_once(built: Built) -> None:
    assert built.stopped_code == 128 + signal.SIGTERM, built.log
    assert built.stopped_seconds < 3.0
    assert built.stopped_status["note"] == "stopped by SIGTERM"
    assert built.stopped_status["ready"] is False


def test_the_next_start_builds_it_offline_from_the_base(built: Built) -> None:
    assert built.code == 0, built.log[-5000:]
    document = built.where.status()
    entry = document["images"][0]
    assert document["ready"] is True
    assert (entry["state"], entry["source"], entry["percent"]) == ("present", "build", 100.0)
    labels = json.loads(built.where.engine.docker("image", "inspect", "-f",
                                                  "{{json .Config.Labels}}", BUILT))  # fmt: skip
    assert labels["sharelatex-init.scheme"] == "basic"
    assert labels["sharelatex-init.built-by"] == "installer"
    print(f"build: {built.seconds:.1f} s, {len(built.seen)} status samples")


def test_build_progress_goes_by_steps_and_apt_counts(built: Built) -> None:
    building = [e for e in built.seen if e["state"] == "installing" and e["note"]]
    assert building, built.seen
    percents = [e["percent"] for e in building]
    assert percents == sorted(percents), percents  # never a step back
    assert any(0 < p < 100 for p in percents), percents
    notes = [e["note"] for e in building]
    assert any(n.startswith("step ") and "apt: " in n and "packages" in n for n in notes), notes
    assert all(e["bytes_total"] == 0 for e in building)  # a build moves no bytes to count
    # apt's lines reach the log, at a low rate
    lines = [line for line in built.log.splitlines() if line.startswith("texlive: building ")]
    assert lines and len(lines) <= built.seconds / texlive.LOG_INTERVAL + 8, lines


def test_the_built_image_runs_as_non_root_without_compilers_or_network_tools(
    built: Built,
) -> None:
    engine = built.where.engine
    out = engine.docker("run", "--rm", BUILT, "sh", "-c", 'id -u; id -g; pwd; echo "$HOME"')
    assert out.split() == ["1000", "1000", "/compile", "/tmp"]
    for tool in ("gcc", "cc", "curl", "wget"):
        done = subprocess.run(
            ["docker", "-H", f"unix://{engine.socket}", "run", "--rm", BUILT,
             "sh", "-c", f"command -v {tool}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0, f"{tool} is in the image: {done.stdout}"
    leftovers = engine.docker(
        "run", "--rm", "--user", "0", BUILT,
        "find", "/var/lib/apt/lists", "/var/cache/apt", "-type", "f", "!", "-name", "lock",
    )  # fmt: skip
    assert leftovers == ""


def test_the_built_image_compiles_in_a_sandbox(built: Built, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.tex").write_text(DOCUMENT)
    os.chown(project, 1000, 1000)
    built.where.engine.docker(
        "run", "--rm", "--network", "none", "--cap-drop", "ALL", "--security-opt",
        "no-new-privileges", "--read-only", "--tmpfs", "/tmp", "-v", f"{project}:/compile",
        BUILT, "latexmk", "-pdf", "main.tex",
    )  # fmt: skip
    assert (project / "main.pdf").read_bytes().startswith(b"%PDF")
