"""Sibling mode through the init itself: `sharelatex-init run` as PID 1 in the product's layout.

Reuses test_sibling's private host engine and site: the init runs in fresh pid + mount
namespaces whose bind mounts reproduce a container made with `-v DATA:/var/lib/overleaf -v
SOCK:/var/run/docker.sock`, and is told that container's id (there is no real container
around the init here; the id is what /proc would give inside one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from init.core.pid1 import Shutdown
from tests.conftest import provide
from tests.integration.conftest import (
    CLEAN_ENV,
    IMAGE,
    PYTHON,
    HostEngine,
    Site,
    saved_image,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


def start_init(
    site: Site, container_id: str, data: Path, env: dict[str, str], sock: bool = True
) -> tuple[subprocess.Popen[bytes], Path]:
    """The init as PID 1 with the product's view; a service writes its environment out."""
    base = site.base / f"init-{len(list(site.base.glob('init-*')))}"
    service = base / "services" / "web"
    service.mkdir(parents=True)
    # Written whole, then renamed: the test reads it as soon as it exists.
    (service / "run").write_text(
        f"#!/bin/sh\nenv > {base}/service.env.tmp\nmv {base}/service.env.tmp {base}/service.env\n"
        "exec sleep 1000\n"
    )
    (service / "run").chmod(0o755)
    steps = ["set -e", "mount -t tmpfs tmpfs /var/lib", "mkdir /var/lib/overleaf",
             f"mount --bind '{data}' /var/lib/overleaf", "mount -t tmpfs tmpfs /run"]  # fmt: skip
    if sock:
        steps += ["touch /run/docker.sock", f"mount --bind '{site.engine.socket}' /run/docker.sock"]
    steps.append('exec "$@"')
    log = base / "init.log"
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
         "sh", "-c", "\n".join(steps), "sh", PYTHON, "-m", "init", "run",
         "--service-dir", str(base / "services"), "--startup-dir", str(base / "none"),
         "--container-env", str(base / "ce"), "--status-file", str(base / "status.json")],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**CLEAN_ENV, "SANDBOXED_COMPILES": "true",
             "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
             "OVERLEAF_INIT_CONTAINER_ID": container_id, "TEX_LIVE_DOCKER_IMAGE": IMAGE,
             **env},
    )  # fmt: skip
    return proc, base


def stop(proc: subprocess.Popen[bytes]) -> int:
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_unset_host_dir_is_derived_proved_and_handed_to_the_services(site: Site) -> None:
    data = site.data_dir()
    proc, base = start_init(site, site.container(str(data)), data, {})
    try:
        try:
            wait_for(lambda: (base / "service.env").exists(), 30, "the service to start")
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{(base / 'init.log').read_text()[-3000:]}") from None
        env = read_env(base / "service.env")
    finally:
        code = stop(proc)
    log = (base / "init.log").read_text()
    assert env["SANDBOXED_COMPILES_HOST_DIR_COMPILES"] == str(data / "data/compiles"), log
    assert env["SANDBOXED_COMPILES_HOST_DIR_OUTPUT"] == str(data / "data/output")
    # The services reach the host's engine through the proxy, never its socket.
    assert env["DOCKER_HOST"] == f"unix://{base}/docker.sock"
    assert "SANDBOXED_COMPILES" not in env  # consumed by the init
    assert "derived from this container's mounts" in log
    assert "root on the host" in log  # the socket's security warning
    assert code == 0
    assert site.proof_containers() == ""


def test_a_wrong_host_dir_exits_78_naming_both_values_and_the_fix(site: Site) -> None:
    data = site.data_dir()
    wrong = "/data/sharelatex_data/data/compiles"
    proc, base = start_init(
        site, site.container(str(data)), data, {"SANDBOXED_COMPILES_HOST_DIR": wrong}
    )
    code = proc.wait(30)
    log = (base / "init.log").read_text()
    assert code == 78, log
    (line,) = [line for line in log.splitlines() if line.startswith("config: error:")]
    assert wrong in line and str(data / "data/compiles") in line
    assert f"--env SANDBOXED_COMPILES_HOST_DIR={data / 'data/compiles'}" in line
    assert not (base / "service.env").exists()
    assert "Traceback" not in log


def test_a_missing_socket_exits_78_with_the_volume_to_add(site: Site) -> None:
    data = site.data_dir()
    proc, base = start_init(site, site.container(str(data)), data, {}, sock=False)
    code = proc.wait(30)
    log = (base / "init.log").read_text()
    assert code == 78, log
    assert "-v /var/run/docker.sock:/var/run/docker.sock" in log
    assert not (base / "service.env").exists()


def test_doctor_in_the_layout_passes_and_proves_the_host_path(site: Site) -> None:
    data = site.data_dir()
    container_id = site.container(str(data))
    steps = [
        "set -e", "mount -t tmpfs tmpfs /var/lib", "mkdir /var/lib/overleaf",
        f"mount --bind '{data}' /var/lib/overleaf", "mount -t tmpfs tmpfs /run",
        "touch /run/docker.sock", f"mount --bind '{site.engine.socket}' /run/docker.sock",
        'exec "$@"',
    ]  # fmt: skip
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(steps), "sh",
         PYTHON, "-m", "init", "doctor", "--status-file", str(site.base / "none.json")],
        capture_output=True, text=True, timeout=60,
        env={**CLEAN_ENV, "SANDBOXED_COMPILES": "true",
             "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
             "OVERLEAF_INIT_CONTAINER_ID": container_id, "TEX_LIVE_DOCKER_IMAGE": IMAGE},
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("ok   proof:") for line in lines), lines
    assert any(line.startswith("WARN socket security:") for line in lines), lines
    assert not any(line.startswith("FAIL") for line in lines)


@pytest.fixture(scope="module")
def app_image(engine: HostEngine) -> str:
    """The Dockerfile on the local Debian base in the host engine: loaded from the tarball the
    session shares (tests/conftest.py), built only when no run has it yet."""
    return provide(f"unix://{engine.socket}", "app").name


def test_the_image_as_a_real_sibling_container_derives_proves_and_stops_cleanly(
    site: Site, app_image: str
) -> None:
    data = site.data_dir()
    container_id = site.engine.docker(
        "run", "-d", "--network", "none",
        "-v", f"{data}:/var/lib/overleaf", "-v", f"{site.engine.socket}:/var/run/docker.sock",
        "-e", "SANDBOXED_COMPILES=true", "-e", "SANDBOXED_COMPILES_SIBLING_CONTAINERS=true",
        "-e", f"TEX_LIVE_DOCKER_IMAGE={IMAGE}", app_image,
    )  # fmt: skip
    site.containers.append(container_id)

    def logs() -> str:
        return site.engine.docker("logs", container_id)

    # The image's own service (compile-api) is all there is.
    wait_for(lambda: "starting 1 services" in logs(), 60, "the init to start its services")
    log = logs()
    assert f"host compile dir {data}/data/compiles, output dir {data}/data/output" in log, log
    assert "derived from this container's mounts" in log
    status = json.loads(site.engine.docker("exec", container_id, "sharelatex-init", "status",
                                           "--json"))  # fmt: skip
    assert status["pid"] == 1
    assert status["engine"]["mode"] == "sibling" and status["engine"]["ready"] is True
    assert status["engine"]["proof"]["status"] == "passed", status["engine"]["proof"]
    # The image was there at boot: the installer's end runs no second proof (CI once caught
    # one half-made by the shutdown).
    wait_for(lambda: "the boot's proof stands" in logs(), 60, "the installer's end")
    assert len([line for line in logs().splitlines() if "sibling: proof:" in line]) == 1
    began = time.monotonic()
    site.engine.docker("stop", "-t", "10", container_id)
    took = time.monotonic() - began
    assert site.engine.docker("inspect", "-f", "{{.State.ExitCode}}", container_id) == "0"
    assert took < 2, took
    assert site.proof_containers() == ""
    assert (data / "data" / "compiles").is_dir()  # nothing of the data dir was removed


def test_the_proof_runs_again_once_the_installer_has_the_image(site: Site) -> None:
    """At boot the compile image is missing (no proof possible); the TeX Live installer loads
    it from a tarball, and the init proves the host path through it then."""
    later = "busybox:later"
    data = site.data_dir()
    images = site.base / "images"
    images.mkdir()
    (images / "busybox_later.tar").write_bytes(saved_image(later))
    env = {
        "TEX_LIVE_DOCKER_IMAGE": later,
        "OVERLEAF_INIT_TEXLIVE_SOURCES": "load",
        "OVERLEAF_INIT_TEXLIVE_TARBALL_DIR": str(images),
    }
    proc, base = start_init(site, site.container(str(data)), data, env)
    try:

        def proved() -> bool:
            try:
                document = json.loads((base / "status.json").read_text())
            except (OSError, ValueError):
                return False
            return (document.get("engine") or {}).get("proof", {}).get("status") == "passed"

        wait_for(proved, 60, "the proof after the install")
        document = json.loads((base / "status.json").read_text())
        assert document["texlive"]["state"] == "done"
        # What `docker exec ... sharelatex-init compile` picks up: the services' view.
        shared = document["compile_environment"]
        assert shared["SANDBOXED_COMPILES_HOST_DIR_COMPILES"] == f"{data}/data/compiles"
        assert shared["DOCKER_HOST"] == f"unix://{base}/docker.sock"  # the proxy's
        code = stop(proc)
    finally:
        if proc.poll() is None:
            stop(proc)
        site.engine.docker("rmi", "-f", later)
    log = (base / "init.log").read_text()
    assert "texlive: busybox:later present (load)" in log
    assert log.index("present (load)") < log.index("sibling: proof:")
    assert code == 0
    assert site.proof_containers() == ""


def test_a_stop_during_the_proof_again_leaves_no_proof_container_on_the_host(
    site: Site,
) -> None:
    """The proof after the install is still running (its container's shell sleeps 30 s) when
    the init is stopped. The check is ended first and given the grace period to remove its
    container: not the kill-all's timeout, set to 0 here, which would leave it on the host."""
    slow = "busybox:slowproof"
    data = site.data_dir()
    images = site.base / "images"
    images.mkdir()
    (images / "busybox_slowproof.tar").write_bytes(saved_image(slow, sh_sleeps=30))
    env = {
        "TEX_LIVE_DOCKER_IMAGE": slow,
        "OVERLEAF_INIT_TEXLIVE_SOURCES": "load",
        "OVERLEAF_INIT_TEXLIVE_TARBALL_DIR": str(images),
        "KILL_ALL_PROCESSES_TIMEOUT": "0",
    }
    proc, base = start_init(site, site.container(str(data)), data, env)
    try:
        wait_for(site.proof_containers, 60, "the proof container after the install")
        asked = time.monotonic()
        code = stop(proc)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            stop(proc)
        site.engine.docker("rmi", "-f", slow)
    log = (base / "init.log").read_text()
    assert code == 0, log
    assert site.proof_containers() == "", log
    assert list((data / "data/compiles").iterdir()) == []  # its marker dir went too
    assert "sibling: ending the check: the init is stopping" in log
    assert "sibling: the check has ended" in log
    assert "compiles cannot run" not in log  # the stop is not a failed proof
    assert took < Shutdown().grace, took  # never the grace's SIGKILL
