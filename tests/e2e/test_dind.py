"""Docker-in-docker with the real image on a real outer engine: `docker run --privileged -v
DIR:/var/lib/docker -e SANDBOXED_COMPILES=true`, as the product documentation says.

The tests of this module share one site, in order: a cold start (the inner engine is empty; the
init loads the TeX Live image from a `docker save` tarball) to ready, a compile, `docker stop`,
and a restart on the same volume that is ready again with nothing to install.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    COMPILE_LABEL,
    TARBALL_DIR,
    Container,
    OuterEngine,
    Site,
    lines_with,
    new_site,
)
from tests.integration.conftest import wait_for

COMPILES = "/var/lib/overleaf/data/compiles"
DOCUMENT = r"""\documentclass{article}
\begin{document}
Hello from a sandboxed compile, end to end.
\end{document}
"""
# A 370 MB load on a 2-core machine shared with other tests: ~20 s alone, several times that
# when the machine is busy.
READY_TIMEOUT = 240.0
ENV = {"SANDBOXED_COMPILES": "true", "OVERLEAF_INIT_TEXLIVE_SOURCES": "load"}


@pytest.fixture(scope="module")
def dind(outer: OuterEngine, app_image: str, texlive_tarballs: Path) -> Iterator[Site]:
    with new_site(outer, app_image) as made:
        made.dir("docker")
        made.data_dir()
        yield made


def run_dind(site: Site, tarballs: Path) -> Container:
    return site.run(
        "--privileged",
        "-v", f"{site.dir('docker')}:/var/lib/docker",
        "-v", f"{site.data_dir()}:/var/lib/overleaf",
        "-v", f"{tarballs}:{TARBALL_DIR}:ro",
        env=ENV,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cold(dind: Site, texlive_tarballs: Path) -> Container:
    return run_dind(dind, texlive_tarballs)


def test_cold_start_installs_the_texlive_image_and_becomes_ready(cold: Container) -> None:
    took = cold.wait_ready(READY_TIMEOUT)
    log = cold.logs()
    assert lines_with(log, "storage driver overlay2"), log
    assert lines_with(log, "texlive:", "present (load)"), log
    status = json.loads(cold.exec("sharelatex-init", "status", "--json").stdout)
    assert status["pid"] == 1
    assert status["engine"]["mode"] == "dind" and status["engine"]["ready"] is True
    assert cold.probe("healthy")[0] == 0
    print(f"cold start to ready: {took:.1f} s")


def test_a_document_compiles_in_the_inner_engine(dind: Site, cold: Container) -> None:
    cold.wait_ready(READY_TIMEOUT)
    project = dind.data_dir() / "data" / "compiles" / "e2e-project"
    project.mkdir()
    (project / "main.tex").write_text(DOCUMENT)
    os.chown(project, 33, 33)  # www-data's: the compile runs as the dir's owner, never root
    # The compile step: `sharelatex-init compile DIR` (issue 6) runs what the compile
    # service's latexmk shim runs, in a sandbox container of the inner engine.
    done = cold.exec("sharelatex-init", "compile", f"{COMPILES}/e2e-project", "--json", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "ok", result
    assert (project / "output.pdf").read_bytes().startswith(b"%PDF")
    # And as an operator or the demo does it: the compile service in the container.
    client = (
        "import sys, urllib.request\n"
        "r = urllib.request.Request('http://127.0.0.1:8090/compile', data=sys.stdin.buffer.read(),"
        " headers={'Content-Type': 'text/x-tex'})\n"
        "sys.stdout.buffer.write(urllib.request.urlopen(r, timeout=170).read())\n"
    )
    posted = subprocess.run(
        ["docker", "-H", cold.engine.url, "exec", "-i", cold.id,
         "/opt/sharelatex-init/bin/python", "-c", client],
        input=DOCUMENT.encode(), capture_output=True, timeout=180,
    )  # fmt: skip
    assert posted.returncode == 0, posted.stderr.decode(errors="replace")
    assert posted.stdout.startswith(b"%PDF")


def test_docker_stop_exits_0_in_time_and_leaves_nothing(
    outer: OuterEngine, dind: Site, cold: Container
) -> None:
    cold.wait_ready(READY_TIMEOUT)
    (dind.data_dir() / "data/compiles/kept").mkdir(exist_ok=True)
    (dind.data_dir() / "data/compiles/kept/main.tex").write_text(DOCUMENT)
    took = cold.stop(timeout=10)
    log = cold.logs()
    assert cold.exit_code() == 0, log
    assert took < 2.0, f"docker stop took {took:.2f} s"
    assert lines_with(log, "init: exiting with status 0"), log
    # Nothing on the outer engine but the stopped container itself (`docker ps -a` is the
    # user's view); the compile dirs are untouched.
    assert outer.docker("ps", "-q", "--filter", f"label={COMPILE_LABEL}") == ""
    assert outer.docker("ps", "-q", "--filter", f"id={cold.id}") == ""
    assert (dind.data_dir() / "data/compiles/kept/main.tex").read_text() == DOCUMENT
    print(f"docker stop: {took:.2f} s")


def test_a_restart_on_the_same_volume_is_ready_with_nothing_to_install(
    dind: Site, cold: Container, texlive_tarballs: Path
) -> None:
    if cold.running():
        cold.stop(timeout=10)
    warm = run_dind(dind, texlive_tarballs)
    took = warm.wait_ready(60)
    log = warm.logs()
    assert lines_with(log, "texlive:", "present"), log
    assert not lines_with(log, "installing"), log  # no load, no pull: the volume had it
    assert warm.stop() < 2.0
    print(f"warm start to ready: {took:.1f} s")


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
    # The site stays up for everything but compiles, and says why it is not ready.
    code, why = container.probe("ready")
    assert code == 1 and "/var/lib/docker is on overlay" in why, why
    assert container.probe("healthy")[0] == 0
    status = json.loads(container.exec("sharelatex-init", "status", "--json").stdout)
    assert status["engine"]["ready"] is False
    assert container.stop() < 2.0
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
