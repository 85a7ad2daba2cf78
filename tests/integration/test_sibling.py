"""Sibling-containers mode for real: a private "host" engine, the product's layout in a namespace.

The tests start their own dockerd (data root, exec root and socket under a short /tmp dir) as
the host's engine, create a real container on it for real inspect data (`-v DATA:/var/lib/
sharelatex -v SOCK:/var/run/docker.sock`), and run `python -m init.engine.sibling_check` in a
private
mount namespace whose bind mounts reproduce that container's view: the data dir over
/var/lib/overleaf and the socket at /var/run/docker.sock. The marker proof then really goes
from a container of the host engine, through the host path, to this side.
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from init.core.pid1 import Shutdown
from tests.integration.conftest import IMAGE, SOCKET_GROUP, Site, busybox_tar, wait_for

pytestmark = pytest.mark.root
SOCKET_VOLUME = "-v /var/run/docker.sock:/var/run/docker.sock"


def only(lines: Sequence[str], containing: str) -> str:
    found = [line for line in lines if containing in line]
    assert len(found) == 1, lines
    return found[0]


# -- the host dir ------------------------------------------------------------------------------


def test_host_dir_unset_is_derived_and_the_marker_proof_passes(site: Site) -> None:
    data = site.data_dir()
    container_id = site.container(str(data))
    code, result = site.check("--container-id", container_id, "--image", IMAGE, data=data)
    assert code == 0, result["problems"]
    assert result["ok"] is True and result["problems"] == []
    assert result["derived"] is True
    assert result["host_dir_compiles"] == f"{data}/data/compiles"
    assert result["host_dir_output"] == f"{data}/data/output"
    assert result["container_id"] == container_id
    assert result["api_version"] == "1.41"
    assert result["proof"]["status"] == "passed", result["proof"]
    assert f"{data}/data/compiles/.sharelatex-init-proof-" in result["proof"]["message"]
    assert "/var/lib/overleaf/data/compiles/.sharelatex-init-proof-" in result["proof"]["message"]
    only(result["notes"], f"SANDBOXED_COMPILES_HOST_DIR unset: using {data}/data/compiles")
    root = only(result["warnings"], "root on the host")
    assert "never passes it into" in root
    # Only the marker was made and it is gone; the proof container too.
    assert list((data / "data/compiles").iterdir()) == []
    assert site.proof_containers() == ""


def test_host_dir_set_right_is_accepted_as_is(site: Site) -> None:
    data = site.data_dir()
    container_id = site.container(str(data))
    code, result = site.check(
        "--container-id", container_id, "--image", IMAGE,
        "--host-dir-compiles", f"{data}/data/compiles", "--host-dir-output", f"{data}/data/output",
        data=data,
    )  # fmt: skip
    assert code == 0, result["problems"]
    assert result["derived"] is False
    assert result["host_dir_compiles"] == f"{data}/data/compiles"
    assert result["proof"]["status"] == "passed"


def test_host_dir_set_wrong_is_refused_with_the_right_value(site: Site) -> None:
    data = site.data_dir()
    container_id = site.container(str(data))
    code, result = site.check(
        "--container-id", container_id, "--image", IMAGE,
        # The commonest slip: the path as seen inside the container.
        "--host-dir-compiles", "/var/lib/overleaf/data/compiles",
        "--host-dir-output", "/srv/elsewhere/output",
        "--host-dir-output-variable", "SANDBOXED_COMPILES_HOST_DIR_OUTPUT",
        data=data,
    )  # fmt: skip
    assert code == 1 and result["ok"] is False
    compiles = only(result["problems"], "SANDBOXED_COMPILES_HOST_DIR=")
    assert "SANDBOXED_COMPILES_HOST_DIR=/var/lib/overleaf/data/compiles is not" in compiles
    assert f"that is {data}/data/compiles on the host" in compiles
    assert f"fix: `--env SANDBOXED_COMPILES_HOST_DIR={data}/data/compiles`" in compiles
    output = only(result["problems"], "SANDBOXED_COMPILES_HOST_DIR_OUTPUT=")
    assert "/srv/elsewhere/output" in output
    assert f"`--env SANDBOXED_COMPILES_HOST_DIR_OUTPUT={data}/data/output`" in output
    assert result["proof"]["status"] == "skipped"
    assert list((data / "data/compiles").iterdir()) == []


def test_a_named_volume_maps_to_its_mountpoint_and_the_proof_passes(site: Site) -> None:
    name = f"sls-{site.base.name.lower()}"
    mountpoint = site.volume(name)
    container_id = site.container(name)
    code, result = site.check("--container-id", container_id, "--image", IMAGE, data=mountpoint)
    assert code == 0, result["problems"]
    assert result["host_dir_compiles"] == f"{mountpoint}/data/compiles"
    note = only(result["notes"], "host compiles dir")
    assert f"(volume {name} ({mountpoint}) on /var/lib/overleaf)" in note
    assert result["proof"]["status"] == "passed"


def test_the_compiles_dir_on_the_containers_layer_names_the_volume_to_add(site: Site) -> None:
    container_id = site.engine.docker(
        "create", "-v", f"{site.engine.socket}:/var/run/docker.sock", IMAGE, "sh"
    )
    site.containers.append(container_id)
    code, result = site.check("--container-id", container_id, data=None)
    assert code == 1
    problem = only(result["problems"], "host compiles dir")
    assert "own layer" in problem
    assert "`-v /data/sharelatex_data:/var/lib/overleaf`" in problem


# -- the marker proof --------------------------------------------------------------------------


def test_the_proof_fails_when_the_inspected_bind_is_not_what_this_side_sees(site: Site) -> None:
    seen_here = site.data_dir("seen_here")
    elsewhere = site.data_dir("elsewhere")
    container_id = site.container(str(elsewhere))
    code, result = site.check("--container-id", container_id, "--image", IMAGE, data=seen_here)
    assert code == 1
    assert result["proof"]["status"] == "failed"
    problem = only(result["problems"], "proof")
    # The marker dir made here is not under the host dir: the engine finds no bind source.
    assert f"found no {elsewhere}/data/compiles/.sharelatex-init-proof-" in problem
    assert "made here as /var/lib/overleaf/data/compiles/.sharelatex-init-proof-" in problem
    assert f"the host engine says /var/lib/overleaf/data/compiles is `-v {elsewhere}:" in problem
    # Nothing was written on either side; the marker dir made here is gone.
    assert list((elsewhere / "data/compiles").iterdir()) == []
    assert list((seen_here / "data/compiles").iterdir()) == []
    assert site.proof_containers() == ""


def slow_shell_image(site: Site, seconds: int) -> str:
    """busybox:test whose /bin/sh sleeps `seconds` before it runs: a proof container that is
    still running when the test wants it to be."""
    tag = f"busybox:slow{seconds}"
    site.engine.docker("import", "-", tag, stdin=busybox_tar(sh_sleeps=seconds))
    return tag


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_check_stopped_during_its_proof_removes_the_proof_container(
    site: Site, signum: int
) -> None:
    """PID 1's shutdown ends a check that is proving (SIGTERM, then SIGKILL at the end of the
    grace period: init.engine.host's end_children): the proof container and the marker dir go
    with it, nothing is left on the host engine."""
    data = site.data_dir()
    container_id = site.container(str(data))
    image = slow_shell_image(site, 30)
    check = site.start_check("--container-id", container_id, "--image", image, data=data)
    try:
        wait_for(site.proof_containers, 30, "the proof container")
        wait_for(lambda: list((data / "data/compiles").iterdir()), 5, "the marker dir")
        stopped = time.monotonic()
        check.send_signal(signum)
        code = check.wait(timeout=10)
        took = time.monotonic() - stopped
    finally:
        check.kill()
        check.wait()
    assert code == 128 + signum
    # Quiet, 0.2-0.3 s; a loaded engine has taken 2.2 s. Within half PID 1's default grace.
    assert took < Shutdown().grace / 2, took
    assert site.proof_containers() == ""
    assert list((data / "data/compiles").iterdir()) == []


class Held:
    """A relay in front of the engine's socket that holds one kind of call until `release` is
    set: the engine's answer to it (the engine has done it, the caller does not know yet), or
    the call itself (not done yet; dropped if its caller is gone by then). A check can be
    stopped in either moment."""

    def __init__(self, engine_socket: Path, path: Path, call: bytes, hold: str) -> None:
        self.engine_socket = engine_socket
        self.call, self.hold = call, hold
        self.seen = threading.Event()
        self.release = threading.Event()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        held = os.stat(engine_socket)  # the engine socket's group and mode, for the access check
        os.chown(path, held.st_uid, held.st_gid)
        os.chmod(path, held.st_mode & 0o777)
        self.server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.engine_socket))
            holding = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, holding), daemon=True).start()
            threading.Thread(
                target=self._down, args=(upstream, client, holding), daemon=True
            ).start()

    def _up(self, source: socket.socket, target: socket.socket, holding: threading.Event) -> None:
        with source, target:
            while data := source.recv(65536):
                if self.call in data and not self.seen.is_set():
                    holding.set()  # before the engine can answer it
                    self.seen.set()
                    if self.hold == "call":
                        self.release.wait(30)
                        if gone(source):
                            return  # its caller went: the call never reaches the engine
                target.sendall(data)

    def _down(self, source: socket.socket, target: socket.socket, held: threading.Event) -> None:
        try:
            while data := source.recv(65536):
                if held.is_set() and self.hold == "answer":
                    self.release.wait(30)
                target.sendall(data)
        except OSError:
            pass  # the other side closed

    def close(self) -> None:
        self.release.set()
        self.server.close()


def gone(sock: socket.socket) -> bool:
    """The other end has closed (nothing more to read, ever)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@contextmanager
def held(site: Site, call: bytes, hold: str) -> Iterator[Held]:
    relay = Held(site.engine.socket, site.base / "held.sock", call, hold)
    try:
        yield relay
    finally:
        relay.close()


@pytest.mark.parametrize(
    ("call", "hold"),
    [(b"/containers/create", "answer"), (b"DELETE /", "call")],
    ids=["created-unanswered", "removal-unsent"],
)
def test_a_check_stopped_between_its_engine_calls_removes_its_proof_container(
    site: Site, call: bytes, hold: str
) -> None:
    """The stop arrives while the engine's answer to the create is on its way (the container
    made, its id not yet read), or as the finished proof's container is about to be removed:
    the check finishes that call, then ends, and nothing is left. Seen in CI: the proof
    container left behind after PID 1's shutdown, "Created" once, "Exited (0)" once."""
    data = site.data_dir()
    container_id = site.container(str(data))
    with held(site, call, hold) as relay:
        check = site.start_check(
            "--container-id", container_id, "--image", IMAGE, data=data,
            sock_source=site.base / "held.sock",
        )  # fmt: skip
        try:
            assert relay.seen.wait(30), f"no {call!r} reached the relay"
            wait_for(site.proof_containers, 10, "the engine to have made the proof container")
            stopped = time.monotonic()
            check.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # the signal is in; the check is still in that call
            relay.release.set()
            code = check.wait(timeout=10)
            took = time.monotonic() - stopped
        finally:
            check.kill()
            check.wait()
    assert code == 128 + signal.SIGTERM
    # Quiet, 0.2-0.3 s; a loaded engine has taken 2.2 s. Within half PID 1's default grace.
    assert took < Shutdown().grace / 2, took
    assert site.proof_containers() == ""
    assert list((data / "data/compiles").iterdir()) == []


@pytest.mark.parametrize("given", ["right", "wrong", "absent"])
def test_without_self_inspection_the_proof_judges_the_set_value(site: Site, given: str) -> None:
    data = site.data_dir()
    wrong = site.data_dir("wrong")
    host_dir = {
        "right": data / "data/compiles",
        "wrong": wrong / "data/compiles",
        "absent": site.base / "no/such/dir",
    }[given]
    # No --container-id: this test process is not a container of that engine.
    code, result = site.check("--host-dir-compiles", str(host_dir), "--image", IMAGE, data=data)
    assert code == 1  # the output dir is unset and cannot be derived either
    only(result["warnings"], f"SANDBOXED_COMPILES_HOST_DIR={host_dir} cannot be checked")
    assert result["host_dir_compiles"] == str(host_dir)
    if given == "right":
        assert result["proof"]["status"] == "passed", result["proof"]
        return
    assert result["proof"]["status"] == "failed"
    problem = only(result["problems"], "proof")
    assert str(host_dir) in problem and "/var/lib/overleaf/data/compiles" in problem
    assert "fix: check that /var/run/docker.sock is the socket of the host" in problem
    assert not (site.base / "no").exists()  # a type=bind mount never creates it empty
    assert list((wrong / "data/compiles").iterdir()) == []


# -- the socket --------------------------------------------------------------------------------


def test_a_missing_socket_says_which_volume_to_add(site: Site) -> None:
    code, result = site.check(data=site.data_dir(), sock="missing")
    assert code == 1
    (problem,) = result["problems"]
    assert "no Docker socket at /var/run/docker.sock" in problem
    assert f"fix: add `{SOCKET_VOLUME}`" in problem
    assert result["socket"]["kind"] == "missing"


def test_a_socket_that_is_a_directory_says_docker_made_it(site: Site) -> None:
    code, result = site.check(data=site.data_dir(), sock="directory")
    assert code == 1
    (problem,) = result["problems"]
    assert "/var/run/docker.sock is a directory" in problem
    assert "the host path did not exist when this container started" in problem
    assert "remove that directory" in problem


def test_a_socket_the_service_user_cannot_use_names_its_group(site: Site) -> None:
    data = site.data_dir()
    container_id = site.container(str(data))
    code, result = site.check("--container-id", container_id, "--service-user", "nobody", data=data)
    gid = grp.getgrnam(SOCKET_GROUP).gr_gid
    assert code == 1
    problem = only(result["problems"], "socket access")
    assert "nobody (uid 65534" in problem and f"owner 0:{gid}, mode 0660" in problem
    assert f"`--group-add {gid}`" in problem
    assert "the init then adds nobody to that group" in problem
    assert result["socket"]["gid"] == gid
    # The rest is still checked, so every problem shows at once.
    assert result["host_dir_compiles"] == f"{data}/data/compiles"


def test_a_stale_socket_nobody_listens_on_says_to_restart(site: Site) -> None:
    stale = site.base / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # what is left when the host's dockerd restarts
    code, result = site.check(
        "--deadline", "0.3", "--service-user", "root",
        data=site.data_dir(), sock_source=stale,
    )  # fmt: skip
    assert code == 1
    problem = only(result["problems"], "connection refused")
    assert "restart this container" in problem


def test_docker_host_over_tcp_is_refused_for_sibling_mode(site: Site) -> None:
    code, result = site.check(
        data=site.data_dir(), sock="missing", env={"DOCKER_HOST": "tcp://10.0.0.5:2376"}
    )
    assert code == 1
    (problem,) = result["problems"]
    assert "DOCKER_HOST=tcp://10.0.0.5:2376 is not a unix socket" in problem
    assert f"unset DOCKER_HOST and add `{SOCKET_VOLUME}`" in problem


# -- which container we are --------------------------------------------------------------------


def test_a_real_containers_id_is_found_in_its_mountinfo_and_cgroup(site: Site) -> None:
    from init.engine import sibling

    container_id = site.engine.docker(
        "create", "--network", "none", IMAGE,
        "sh", "-c", "cat /proc/self/mountinfo; echo ---; cat /proc/self/cgroup",
    )  # fmt: skip
    site.containers.append(container_id)
    mountinfo, cgroup = site.engine.docker("start", "-a", container_id).split("---\n")
    assert sibling.container_id_from_mountinfo(mountinfo) == container_id
    # Under a private cgroup namespace (cgroup v2's default) the path is only "/".
    if cgroup.strip() != "0::/":
        assert sibling.container_id_from_cgroup(cgroup) == container_id


# -- the runtime compiles run under --------------------------------------------------------------


def test_a_runtime_the_host_engine_offers_passes_and_one_it_lacks_is_refused(site: Site) -> None:
    """The test engine offers runsc as the init would register it (conftest); "kata" it lacks."""
    data = site.data_dir()
    container_id = site.container(str(data))
    code, result = site.check("--container-id", container_id, "--runtime", "runsc", data=data)
    assert code == 0, result["problems"]
    only(result["notes"], "runtime: the host's engine offers runsc")
    assert not [w for w in result["warnings"] if "runsc runs without" in w]  # its args are right
    code, result = site.check("--container-id", container_id, "--runtime", "kata", data=data)
    assert code == 1
    problem = only(result["problems"], "compiles are to run under kata")
    assert "the host's engine offers only io.containerd.runc.v2" in problem
    assert '/etc/docker/daemon.json: "runtimes": {"runsc"' in problem
