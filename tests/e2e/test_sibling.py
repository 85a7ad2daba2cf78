"""Sibling containers with the real image on a real outer engine: the engine's socket and the
data dir mounted in, as the product documentation's compose file does, with
SANDBOXED_COMPILES_HOST_DIR right, unset (derived) and wrong (exit 78). The Overleaf 5 image has
its startup guards in place (the site fixture); the configuration comes by -e or by env file; the
ShareLaTeX 4.x layout (/var/lib/sharelatex, the old names) compiles too."""

from __future__ import annotations

import json
import os
from pathlib import Path

from init.config import DEFAULT_COMPILE_UIDS
from tests.e2e.conftest import (
    COMPILE_LABEL,
    OWN_STOP_WITHIN,
    STOP_WITHIN,
    Container,
    OuterEngine,
    Site,
    compile_project,
    compose_site,
    lines_with,
    override,
)
from tests.integration.conftest import wait_for

READY_TIMEOUT = 90.0
SIBLING = {"SANDBOXED_COMPILES": "true", "SANDBOXED_COMPILES_SIBLING_CONTAINERS": "true"}


def run_sibling(
    site: Site,
    data: Path,
    *,
    group_add: bool = False,
    data_root: str = "/var/lib/overleaf",
    config: Path | None = None,
    defaults: bool = True,
    **env: str,
) -> Container:
    """The documented sibling run. The local base has no ShareLaTeX services: they would run as
    root here, so that is the services' user unless a test says otherwise; `group_add` adds
    the socket's group, as the init asks for when the user is www-data. With `config`, that dir
    is /etc/sharelatex-init and the whole configuration: nothing more by -e; without `defaults`,
    `env` is all the -e there is."""
    group = ["--group-add", str(os.stat(site.engine.socket).st_gid)] if group_add else []
    mounted = ["-v", f"{config}:/etc/sharelatex-init:ro"] if config else []
    given = {**SIBLING, "OVERLEAF_INIT_SERVICE_USER": "root"} if defaults and not config else {}
    return site.run(
        *group,
        *mounted,
        "-v", f"{data}:{data_root}",
        "-v", f"{site.engine.socket}:/var/run/docker.sock",
        env={**given, **env},
    )  # fmt: skip


def status(container: Container) -> dict[str, object]:
    document: dict[str, object] = json.loads(
        container.exec("sharelatex-init", "status", "--json").stdout
    )
    return document


def test_host_dir_right_given_by_env_file_is_proved_and_ready(
    site: Site, outer: OuterEngine, texlive_image: str
) -> None:
    """The whole configuration in /etc/sharelatex-init/*.env (the old spelling of one of the
    init's names among it): read, and past Overleaf 5's guards."""
    data = site.data_dir()
    config = site.dir("config")
    (config / "10-site.env").write_text(
        "".join(f"{name}={value}\n" for name, value in SIBLING.items())
        + f"SANDBOXED_COMPILES_HOST_DIR={data}/data/compiles\nSHARELATEX_INIT_SERVICE_USER=root\n"
    )
    container = run_sibling(site, data, config=config)
    took = container.wait_ready(READY_TIMEOUT)
    log = container.logs()
    assert lines_with(log, "sibling: proof:", f"{data}/data/compiles"), log
    (line,) = lines_with(log, "sibling: host compiles dir:")
    assert f"SANDBOXED_COMPILES_HOST_DIR={data}/data/compiles is this container's" in line
    assert lines_with(log, "SHARELATEX_INIT_SERVICE_USER is the old name of"), log
    assert not lines_with(log, "Refusing to startup"), log
    engine = status(container)["engine"]
    assert isinstance(engine, dict) and engine["mode"] == "sibling" and engine["ready"] is True
    took_stop = container.stop()
    assert container.exit_code() == 0
    assert took_stop < STOP_WITHIN, took_stop
    ours = container.seconds_between("init: SIGTERM received", "init: exiting with status 0")
    assert ours < OWN_STOP_WITHIN, f"the init's own share of docker stop: {ours:.2f} s"
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
    # The compile container runs on the outer engine, bound from the host path the init derived.
    compile_project(container, data, "e2e-sibling")
    # Written through the host path by the project's own uid, in the dir's group (www-data's).
    made = (data / "data/compiles/e2e-sibling/output.pdf").stat()
    assert (made.st_uid, made.st_gid) == (DEFAULT_COMPILE_UIDS.uid_for("e2e-sibling"), 33)
    wait_for(
        lambda: outer.docker("ps", "-aq", "--filter", f"label={COMPILE_LABEL}") == "",
        30,
        "the project's compile container to end by itself",
    )


def test_the_sharelatex_4_layout_derives_the_host_dir_and_compiles(
    site: Site, sharelatex4_image: str, texlive_image: str
) -> None:
    """A ShareLaTeX 4.x image (no guards): data at /var/lib/sharelatex, the init's variables
    by their old names; the host dir derived from that mount."""
    data = site.data_dir()
    container = run_sibling(
        Site(site.engine, sharelatex4_image, site.base, site.containers),
        data,
        data_root="/var/lib/sharelatex",
        defaults=False,
        **SIBLING,
        SHARELATEX_INIT_SERVICE_USER="root",
        SHARELATEX_INIT_COMPILE_IDLE="2",
    )
    container.wait_ready(READY_TIMEOUT)
    log = container.logs()
    (line,) = lines_with(log, "sibling: host compiles dir:")
    assert "SANDBOXED_COMPILES_HOST_DIR unset" in line
    assert f"using {data}/data/compiles, derived from this container's" in line
    assert f"-v {data}:/var/lib/sharelatex" in line
    assert lines_with(log, "sibling: proof:"), log
    assert lines_with(log, "SHARELATEX_INIT_SERVICE_USER is the old name of"), log
    compile_project(container, data, "e2e-sharelatex4", "/var/lib/sharelatex")
    assert container.stop() < STOP_WITHIN
    ours = container.seconds_between("init: SIGTERM received", "init: exiting with status 0")
    assert ours < OWN_STOP_WITHIN, f"the init's own share of docker stop: {ours:.2f} s"


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


def test_the_compose_example_runs_compiles_and_goes_down_leaving_nothing(
    site: Site, outer: OuterEngine, texlive_image: str
) -> None:
    """examples/docker-compose.sibling.yml with Debian's docker-compose: this test's data dir
    and the outer engine's socket for the host's, the Overleaf 5 image."""
    data = site.data_dir()
    volumes = [f"{data}:/var/lib/overleaf", f"{outer.socket}:/var/run/docker.sock"]
    changes = override(site.image, volumes, {
        "SANDBOXED_COMPILES_HOST_DIR": f"{data}/data/compiles",
        "OVERLEAF_INIT_SERVICE_USER": "root",
        "OVERLEAF_INIT_COMPILE_IDLE": "2",
    })  # fmt: skip
    with compose_site(outer, "docker-compose.sibling.yml", site.dir("compose"), changes) as c:
        container = c.up()
        took = c.wait_readyz(container, READY_TIMEOUT)
        assert not lines_with(container.logs(), "Refusing to startup"), container.logs()
        compile_project(container, data, "e2e-compose-sibling")
        took_down = c.down()
        assert c.leftovers() == {}
    # The project's warm compile container ends by itself (its idle time, 2 s), the site gone.
    wait_for(
        lambda: outer.docker("ps", "-aq", "--filter", f"label={COMPILE_LABEL}") == "",
        30,
        "the compile containers to be gone: "
        + outer.docker("ps", "-a", "--filter", f"label={COMPILE_LABEL}", "--format",
                       "{{.Names}} {{.Status}} {{.Label \"sharelatex-init.compile\"}}"),
    )  # fmt: skip
    print(f"compose sibling: up to /readyz 200: {took:.1f} s; down -v: {took_down:.1f} s")
