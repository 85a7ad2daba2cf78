"""The TeX Live installer against a real registry (docker-registry) and a private dockerd.

A throttling TCP proxy sits between the engine and the registry so a pull on loopback lasts a
few seconds: long enough to watch progress, stop the registry mid-pull, or SIGTERM the installer.
The proxy only slows bytes down; what answers is the real registry.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import docker
import pytest

from init import texlive
from tests.integration.conftest import CLEAN_ENV, HostEngine, busybox_tar, require, wait_for

pytestmark = pytest.mark.root

REGISTRY = "/usr/bin/docker-registry"
PADDING = 60_000_000  # random, so gzip cannot shrink it: the pull moves this many bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
class World:
    engine: HostEngine
    registry: Registry
    proxy: Proxy
    base: Path

    @property
    def image(self) -> str:
        return f"127.0.0.1:{self.proxy.port}/texlive:test"

    def remove(self, image: str | None = None) -> None:
        self.engine.docker("rmi", "-f", image or self.image)

    def installer(self, *args: str, images: str | None = None) -> subprocess.Popen[bytes]:
        log = (self.base / "installer.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "init.texlive", "--socket", str(self.engine.socket),
             "--status", str(self.status_path), "--images", images or self.image, *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=CLEAN_ENV, start_new_session=True,
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
def world() -> Iterator[World]:
    require(os.geteuid() == 0, "needs root")
    require(shutil.which("dockerd") is not None, "needs dockerd (apt-get install docker.io)")
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    require(Path(REGISTRY).exists(), "needs docker-registry (apt-get install docker-registry)")
    require(Path("/bin/busybox").exists(), "needs busybox-static")
    base = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))  # short: socket paths <= 107 bytes
    port = free_port()
    config = base / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    registry = Registry(config, base / "registry.log", port)
    proxy = Proxy(port)
    with (base / "dockerd.log").open("wb") as log:
        dockerd = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private",
             "dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
             "--pidfile", str(base / "d.pid"), "--host", f"unix://{base / 'd.sock'}",
             "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    engine = HostEngine(base, dockerd)
    try:
        registry.start()
        proxy.start()
        wait_for(lambda: _answers(engine), 30, "the engine to answer")
        made = World(engine, registry, proxy, base)
        engine.docker("import", "-", made.image, stdin=padded_busybox(PADDING))
        engine.docker("push", made.image)
        made.remove()
        yield made
    finally:
        proxy.close()
        registry.stop()
        if dockerd.poll() is None:
            dockerd.send_signal(signal.SIGTERM)
            try:
                dockerd.wait(20)
            except subprocess.TimeoutExpired:
                dockerd.kill()
                dockerd.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def _answers(engine: HostEngine) -> bool:
    assert engine.proc.poll() is None, (engine.base / "dockerd.log").read_text()[-2000:]
    done = subprocess.run(
        ["docker", "-H", f"unix://{engine.socket}", "version"], capture_output=True, timeout=10
    )
    return done.returncode == 0


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
        client = docker.APIClient(base_url=f"unix://{world.engine.socket}", version="auto")
        board = texlive.Board(world.base / "direct.json", [world.image], lambda line: None)
        started = time.monotonic()
        assert texlive.install(client, world.image, ["pull"], None, board, once=True)
        assert time.monotonic() - started < 0.5
        assert board.document()["ready"] is True
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
