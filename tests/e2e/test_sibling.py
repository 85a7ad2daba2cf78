"""Sibling containers with the real image on a real outer engine: the engine's socket and the
data dir mounted in, as the product documentation's compose file does, with
SANDBOXED_COMPILES_HOST_DIR right, unset (derived) and wrong (exit 78)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.e2e.conftest import COMPILE_LABEL, Container, OuterEngine, Site, lines_with
from tests.integration.conftest import wait_for

READY_TIMEOUT = 90.0
COMPILES = "/var/lib/overleaf/data/compiles"


def run_sibling(site: Site, data: Path, *, group_add: bool = False, **env: str) -> Container:
    """The documented sibling run. The local base has no ShareLaTeX services: they would run as
    root here, so that is the services' user unless a test says otherwise; `group_add` adds
    the socket's group, as the init asks for when the user is www-data."""
    group = ["--group-add", str(os.stat(site.engine.socket).st_gid)] if group_add else []
    return site.run(
        *group,
        "-v", f"{data}:/var/lib/overleaf",
        "-v", f"{site.engine.socket}:/var/run/docker.sock",
        env={"SANDBOXED_COMPILES": "true", "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true",
             "OVERLEAF_INIT_SERVICE_USER": "root", **env},
    )  # fmt: skip


def status(container: Container) -> dict[str, object]:
    document: dict[str, object] = json.loads(
        container.exec("sharelatex-init", "status", "--json").stdout
    )
    return document


def test_host_dir_right_is_proved_and_ready(
    site: Site, outer: OuterEngine, texlive_image: str
) -> None:
    data = site.data_dir()
    container = run_sibling(site, data, SANDBOXED_COMPILES_HOST_DIR=f"{data}/data/compiles")
    took = container.wait_ready(READY_TIMEOUT)
    log = container.logs()
    assert lines_with(log, "sibling: proof:", f"{data}/data/compiles"), log
    (line,) = lines_with(log, "sibling: host compiles dir:")
    assert f"SANDBOXED_COMPILES_HOST_DIR={data}/data/compiles is this container's" in line
    engine = status(container)["engine"]
    assert isinstance(engine, dict) and engine["mode"] == "sibling" and engine["ready"] is True
    took_stop = container.stop()
    assert container.exit_code() == 0
    assert took_stop < 2.0, took_stop
    assert outer.docker("ps", "-aq", "--filter", f"label={COMPILE_LABEL}") == ""
    assert (data / "data/compiles").is_dir()
    print(f"sibling start to ready: {took:.1f} s; docker stop: {took_stop:.2f} s")


def test_a_document_compiles_as_a_sibling(
    site: Site, outer: OuterEngine, texlive_image: str
) -> None:
    data = site.data_dir()
    # The project's warm compile container ends 2 s after its last compile (default 120 s).
    container = run_sibling(site, data, OVERLEAF_INIT_COMPILE_IDLE="2")
    container.wait_ready(READY_TIMEOUT)
    project = data / "data" / "compiles" / "e2e-sibling"
    project.mkdir()
    (project / "main.tex").write_text(
        "\\documentclass{article}\\begin{document}Sibling.\\end{document}\n"
    )
    os.chown(project, 33, 33)  # www-data's: the compile runs as the dir's owner, never root
    # The compile step: `sharelatex-init compile DIR` (issue 6): the compile container runs on
    # the outer engine, bound from the host path the init derived.
    done = container.exec(
        "sharelatex-init", "compile", f"{COMPILES}/e2e-sibling", "--json", timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / "output.pdf").read_bytes().startswith(b"%PDF")
    assert (project / "output.pdf").stat().st_uid == 33
    wait_for(
        lambda: outer.docker("ps", "-aq", "--filter", f"label={COMPILE_LABEL}") == "",
        30,
        "the project's compile container to end by itself",
    )


def test_host_dir_unset_is_derived_from_the_mounts(site: Site, texlive_image: str) -> None:
    data = site.data_dir()
    container = run_sibling(site, data)
    container.wait_ready(READY_TIMEOUT)
    log = container.logs()
    (line,) = lines_with(log, "sibling: host compiles dir:")
    assert "SANDBOXED_COMPILES_HOST_DIR unset" in line
    assert f"using {data}/data/compiles, derived from this container's" in line
    assert f"-v {data}:/var/lib/overleaf" in line
    assert lines_with(log, "sibling: proof:"), log
    assert container.stop() < 2.0


def test_host_dir_wrong_exits_78_naming_both_and_the_fix(site: Site, texlive_image: str) -> None:
    data = site.data_dir()
    wrong = "/data/sharelatex_data/data/compiles"
    container = run_sibling(site, data, SANDBOXED_COMPILES_HOST_DIR=wrong)
    code = container.wait_exit(60)
    log = container.logs()
    assert code == 78, log
    (line,) = lines_with(log, "config: error:")
    assert wrong in line and f"{data}/data/compiles" in line
    assert f"--env SANDBOXED_COMPILES_HOST_DIR={data}/data/compiles" in line
    assert "Traceback" not in log


def test_the_services_reach_the_engine_only_through_the_proxy(
    site: Site, texlive_image: str
) -> None:
    """The host's socket is root on the host: behind the proxy no service gets it, not even with
    the socket's group added to the container (the init no longer puts www-data in it), and the
    proxy's socket is the one they have."""
    data = site.data_dir()
    container = run_sibling(site, data, group_add=True, OVERLEAF_INIT_SERVICE_USER="www-data")
    container.wait_ready(READY_TIMEOUT)
    as_www_data = ("setpriv", "--reuid=www-data", "--regid=www-data", "--init-groups")
    raw = container.exec(
        *as_www_data, "docker", "-H", "unix:///var/run/docker.sock", "version",
        "--format", "{{.Server.Version}}",
    )  # fmt: skip
    assert raw.returncode != 0 and "permission denied" in raw.stderr.lower(), raw
    proxy = container.exec(
        *as_www_data, "docker", "-H", "unix:///run/sharelatex-init/docker.sock", "version",
        "--format", "{{.Server.Version}}",
    )  # fmt: skip
    assert proxy.returncode == 0, proxy.stderr
    escape = container.exec(
        *as_www_data, "docker", "-H", "unix:///run/sharelatex-init/docker.sock", "run", "--rm",
        "--privileged", "--user", "33", texlive_image, "true",
    )  # fmt: skip
    assert escape.returncode != 0 and "sharelatex-init proxy" in escape.stderr, escape
