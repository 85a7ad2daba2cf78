"""Docker-in-docker with the real image on a real outer engine: `docker run --privileged -v
DIR:/var/lib/docker -e SANDBOXED_COMPILES=true`, as the product documentation says.

The tests of this module share one site, in order: a cold start of the Overleaf 5 image (its
startup guards in place; the init's variables given with -e; the inner engine is empty, the init
loads the TeX Live image from a `docker save` tarball) to ready, a compile, `docker stop`; a
restart on the same volume, the init's variables now in /etc/sharelatex-init/*.env, ready with
nothing to install, and a compile; then the ShareLaTeX 4.x layout on that volume (data at
/var/lib/sharelatex, the init's variables by their old names) ready and compiling.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    COMPILE_LABEL,
    DOCUMENT,
    OWN_STOP_WITHIN,
    PYTHON,
    STOP_WITHIN,
    TARBALL_DIR,
    Container,
    OuterEngine,
    Site,
    compile_project,
    compose_site,
    lines_with,
    new_site,
    override,
    post_compile,
    removed_on_failure,
)
from tests.integration.conftest import wait_for

# A 370 MB load on a 2-core machine shared with other tests: ~20 s alone, several times that
# when the machine is busy.
READY_TIMEOUT = 240.0
ENV = {"SANDBOXED_COMPILES": "true", "OVERLEAF_INIT_TEXLIVE_SOURCES": "load"}


@pytest.fixture(scope="module")
def dind(outer: OuterEngine, overleaf5_image: str, texlive_tarballs: Path) -> Iterator[Site]:
    with new_site(outer, overleaf5_image) as made:
        made.dir("docker")
        made.data_dir()
        yield made


def run_dind(
    site: Site,
    tarballs: Path,
    *options: str,
    data_root: str = "/var/lib/overleaf",
    env: dict[str, str] | None = None,
) -> Container:
    return site.run(
        "--privileged",
        "-v", f"{site.dir('docker')}:/var/lib/docker",
        "-v", f"{site.data_dir()}:{data_root}",
        "-v", f"{tarballs}:{TARBALL_DIR}:ro",
        *options,
        env=ENV if env is None else env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cold(dind: Site, texlive_tarballs: Path) -> Container:
    return run_dind(dind, texlive_tarballs)


def test_cold_start_installs_the_texlive_image_and_becomes_ready(cold: Container) -> None:
    took = cold.wait_ready(READY_TIMEOUT)
    log = cold.logs_once_with("texlive:", "present (load)")
    assert lines_with(log, "storage driver overlay2"), log
    assert lines_with(log, "texlive:", "present (load)"), log
    status = json.loads(cold.exec("sharelatex-init", "status", "--json").stdout)
    assert status["pid"] == 1
    assert status["engine"]["mode"] == "dind" and status["engine"]["ready"] is True
    assert cold.probe("healthy")[0] == 0
    print(f"cold start to ready: {took:.1f} s")


def test_a_document_compiles_in_the_inner_engine(dind: Site, cold: Container) -> None:
    cold.wait_ready(READY_TIMEOUT)
    # The guards ran and let it start (Overleaf 5's images refuse with status 101).
    assert not lines_with(cold.logs(), "Refusing to startup"), cold.logs()
    # The compiles root is a filesystem of its own (a loop-mounted image beside it).
    ismount = "import os, sys; sys.exit(not os.path.ismount(sys.argv[1]))"
    root = "/var/lib/overleaf/data/compiles"
    assert cold.exec(PYTHON, "-c", ismount, root).returncode == 0, cold.logs()
    assert (dind.data_dir() / "data" / "compiles.img").is_file()
    compile_project(cold, dind.data_dir(), "e2e-project")
    post_compile(cold)


def test_docker_stop_exits_0_in_time_and_leaves_nothing(
    outer: OuterEngine, dind: Site, cold: Container
) -> None:
    cold.wait_ready(READY_TIMEOUT)
    (dind.data_dir() / "data/compiles/kept").mkdir(exist_ok=True)
    (dind.data_dir() / "data/compiles/kept/main.tex").write_text(DOCUMENT)
    took = cold.stop(timeout=10)
    log = cold.logs()
    assert cold.exit_code() == 0, log
    # Within Docker's grace, never SIGKILLed. The 2 s goal is a figure of scripts/bench/
    # docker-stop (1.3-1.6 s here, ~1.0 s of it dockerd 20.10's own exit, which a loaded
    # machine stretches: 2.2 s seen in a full run); what is the init's own is held here.
    assert took < STOP_WITHIN, f"docker stop took {took:.2f} s"
    # The init's own share: to its stop signal to the inner dockerd, every service stopped.
    ours = cold.seconds_between("init: SIGTERM received", "dockerd: stopping: SIGTERM")
    assert ours < OWN_STOP_WITHIN, f"SIGTERM to the inner dockerd's stop signal took {ours:.2f} s"
    assert lines_with(log, "init: exiting with status 0"), log
    # Nothing on the outer engine but the stopped container itself (`docker ps -a` is the
    # user's view); the compile dirs are untouched.
    assert outer.docker("ps", "-q", "--filter", f"label={COMPILE_LABEL}") == ""
    assert outer.docker("ps", "-q", "--filter", f"id={cold.id}") == ""
    assert (dind.data_dir() / "data/compiles/kept/main.tex").read_text() == DOCUMENT
    print(f"docker stop: {took:.2f} s")


def test_a_restart_on_the_same_volume_configured_by_env_file_is_ready_with_nothing_to_install(
    dind: Site, cold: Container, texlive_tarballs: Path
) -> None:
    """The init's variables in /etc/sharelatex-init/*.env, the old spelling among them: read,
    consumed, and so never seen by Overleaf 5's guard; the env file is the whole configuration."""
    if cold.running():
        cold.stop(timeout=10)
    config = dind.dir("config")
    (config / "10-site.env").write_text(
        "SANDBOXED_COMPILES=true\nOVERLEAF_INIT_TEXLIVE_SOURCES=load\n"
        "SHARELATEX_INIT_COMPILE_IDLE=30\n"
    )
    warm = run_dind(dind, texlive_tarballs, "-v", f"{config}:/etc/sharelatex-init:ro", env={})
    with removed_on_failure(warm):
        took = warm.wait_ready(60)
        log = warm.logs_once_with("texlive:", "present")
        assert lines_with(log, "texlive:", "present"), log
        assert not lines_with(log, "installing"), log  # no load, no pull: the volume had it
        assert lines_with(log, "SHARELATEX_INIT_COMPILE_IDLE is the old name of"), log
        assert not lines_with(log, "Refusing to startup"), log
        began = time.monotonic()
        compile_project(warm, dind.data_dir(), "e2e-env-file")
        compiled = time.monotonic() - began
        assert warm.stop() < STOP_WITHIN
    print(f"warm start to ready: {took:.1f} s; a compile: {compiled:.1f} s")


def test_the_sharelatex_4_layout_on_that_volume_is_ready_and_compiles(
    dind: Site, sharelatex4_image: str, texlive_tarballs: Path
) -> None:
    """A ShareLaTeX 4.x image (no guards): data at /var/lib/sharelatex, the init's variables by
    their old names, each read with a one-line notice."""
    old = {"SANDBOXED_COMPILES": "true", "SHARELATEX_INIT_TEXLIVE_SOURCES": "load"}
    began = time.monotonic()
    container = run_dind(
        Site(dind.engine, sharelatex4_image, dind.base, dind.containers),
        texlive_tarballs,
        data_root="/var/lib/sharelatex",
        env=old,
    )
    with removed_on_failure(container):
        container.wait_ready(60)
        log = container.logs_once_with("texlive:", "present")
        (notice,) = lines_with(log, "SHARELATEX_INIT_TEXLIVE_SOURCES is the old name of")
        assert "OVERLEAF_INIT_TEXLIVE_SOURCES" in notice
        assert lines_with(log, "texlive:", "present"), log
        compile_project(container, dind.data_dir(), "e2e-sharelatex4", "/var/lib/sharelatex")
        assert container.stop() < STOP_WITHIN
    print(f"ShareLaTeX 4.x layout, start to a compiled document: {time.monotonic() - began:.1f} s")


def test_the_compose_example_runs_compiles_and_goes_down_leaving_nothing(
    dind: Site, texlive_tarballs: Path
) -> None:
    """examples/docker-compose.dind.yml with Debian's docker-compose: this site's dirs for its
    data and its engine's volume (the TeX Live image is there already), the Overleaf 5 image."""
    data = dind.data_dir()
    volumes = [f"{data}:/var/lib/overleaf", f"{dind.dir('docker')}:/var/lib/docker",
               f"{texlive_tarballs}:{TARBALL_DIR}:ro"]  # fmt: skip
    changes = override(dind.image, volumes, {"OVERLEAF_INIT_TEXLIVE_SOURCES": "load"})
    # The project's network where the engine volume's earlier starts (this module's sites, with
    # no network) would have put the inner engine's bridge: 172.17.0.0/16, dockerd's first
    # choice, kept in its data root. The inner engine makes no bridge, so the site is reachable.
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert "172.17." not in routes, f"the host routes 172.17.0.0/16 already:\n{routes}"
    changes["networks"]["default"]["ipam"] = {"config": [{"subnet": "172.17.0.0/16"}]}
    with compose_site(dind.engine, "docker-compose.dind.yml", dind.dir("compose"), changes) as c:
        merged = c.run("config")
        assert merged.returncode == 0, merged.stderr
        assert "privileged: true" in merged.stdout and "/data/sharelatex_data" not in merged.stdout
        container = c.up()
        took = c.wait_readyz(container, READY_TIMEOUT)
        assert not lines_with(container.logs(), "Refusing to startup"), container.logs()
        inside = container.exec("cat", "/proc/net/route").stdout
        assert "docker0" not in inside, inside
        compile_project(container, data, "e2e-compose-dind")
        post_compile(container)
        took_down = c.down()
        assert c.leftovers() == {}
    print(f"compose dind: up to /readyz 200: {took:.1f} s; down -v: {took_down:.1f} s")


def test_without_a_volume_for_var_lib_docker_the_engine_is_refused_with_the_fix(
    site: Site,
) -> None:
    container = site.run("--privileged", env=ENV)
    fix = "-v /var/sharelatex/docker-images:/var/lib/docker"

    def refused() -> bool:
        return fix in container.logs()

    wait_for(refused, 60, "the refusal")
    log = container.logs()
    (line,) = lines_with(log, "dockerd: error:")
    assert "/var/lib/docker is on overlay" in line and fix in line
    assert "Traceback" not in log

    # The site stays up for everything but compiles, and says why it is not ready (once the
    # status file says it: the log line comes first, the status file's write just after).
    def said() -> tuple[int, str] | None:
        found = container.probe("ready")
        return None if "still starting" in found[1] else found

    code, why = wait_for(said, 10, "the status file to say why")
    assert code == 1 and "/var/lib/docker is on overlay" in why, why
    assert container.probe("healthy")[0] == 0
    status = json.loads(container.exec("sharelatex-init", "status", "--json").stdout)
    assert status["engine"]["ready"] is False
    assert container.stop() < STOP_WITHIN
    assert container.exit_code() == 0


def test_without_privileged_it_exits_78_with_the_fix(site: Site) -> None:
    container = site.run("-v", f"{site.dir('docker')}:/var/lib/docker", env=ENV)
    code = container.wait_exit(60)
    log = container.logs()
    assert code == 78, log
    (line,) = lines_with(log, "config: error:")
    assert "docker-in-docker needs `--privileged`" in line
    assert "run the container with `--privileged`" in line
    assert "SANDBOXED_COMPILES_SIBLING_CONTAINERS=true" in line  # the other way, also named
    assert "Traceback" not in log
