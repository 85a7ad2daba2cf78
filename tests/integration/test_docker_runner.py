"""Server Pro runner mode against a real engine with the TeX Live image: the compile service's
own docker runner (tests/fixtures/overleaf/docker_runner.py, DockerRunner.js's behaviour and
wire shapes) run as www-data with the environment the init gives the services
(init.compiles.service_env through init.engine.side.SandboxSide, `auto` finding DockerRunner.js
in the image), its calls through the init's engine proxy (its spec as the init makes it), in
both engine modes: docker-in-docker (the inner engine sees the app container's paths) and
sibling containers (the app's data dir is a bind mount of a host dir the engine knows by
another path). Each test checks what the compile service would report, and what is left on
the engine.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from init import config
from init.compiles import service_env
from init.core.log import Log
from init.engine.client import COMPILE_LABEL, EXPIRES_LABEL
from init.engine.side import Installer, SandboxSide
from init.proxy.service import ProxyService
from tests.fixtures.overleaf.docker_runner import RunnerSettings, SettingsError
from tests.integration import texlive_engine
from tests.integration.conftest import CLEAN_ENV, PYTHON, REPO, HostEngine, require, wait_for
from tests.integration.texlive_engine import TEXLIVE, WWW_DATA, chown_tree

texlive = texlive_engine.texlive
pytestmark = pytest.mark.root

HELLO = "\\documentclass{article}\n\\begin{document}\nHello, Server Pro.\n\\end{document}\n"
BROKEN = HELLO.replace("Hello", r"\input{no-such-file}")  # fatal in batch mode: no PDF
LOOP = HELLO.replace("Hello", r"\def\x{\x}\x")
IDLE = 8.0  # OVERLEAF_INIT_COMPILE_IDLE: a stopped container is retired after 4 s, swept after 8
OWN = {
    "OVERLEAF_INIT_COMPILE_TIMEOUT": "10",
    "OVERLEAF_INIT_COMPILE_IDLE": f"{IDLE:g}",
    "OVERLEAF_INIT_COMPILE_MEMORY": "512m",
    "OVERLEAF_INIT_COMPILE_PIDS": "128",
    "OVERLEAF_INIT_COMPILE_CPUS": "1",
    "OVERLEAF_INIT_LOG_LEVEL": "debug",
}


class NoInstaller(Installer):
    """The images are in the test engine already."""


@dataclass
class Site:
    """One engine mode's site: the services' environment as the init gives it, the proxy the
    init would run, and where the compile service keeps its compile dirs."""

    mode: str
    engine: HostEngine
    base: Path
    compiles: Path  # the compile service's compiles dir (this container's path)
    host_compiles: Path  # the same dir as the engine knows it
    environment: dict[str, str]
    proxy: subprocess.Popen[bytes]

    def project(self, name: str, text: str) -> Path:
        directory = self.compiles / name
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir()
        (directory / "main.tex").write_text(text)
        chown_tree(directory, WWW_DATA)  # the service writes a project's files as itself
        return directory

    def runner(self, *args: str, timeout: float = 120) -> subprocess.Popen[str]:
        """The compile service's docker runner, as the service's user, in its environment."""
        return subprocess.Popen(
            [self.python, "-m", "tests.fixtures.overleaf.docker_runner", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**self.environment, "PYTHONDONTWRITEBYTECODE": "1"},
            user=WWW_DATA, group=WWW_DATA,
        )  # fmt: skip

    @property
    def python(self) -> str:
        # www-data cannot run the test venv's interpreter (under /root); the fixture needs only
        # the standard library.
        return shutil.which("python3", path="/usr/bin:/bin") or "python3"

    def compile(self, project: str, timeout_ms: int = 60000) -> dict[str, Any]:
        running = self.runner(
            "compile", "--compiles", str(self.compiles), "--project", project,
            "--timeout-ms", str(timeout_ms),
        )  # fmt: skip
        out, err = running.communicate(timeout=180)
        assert running.returncode == 0 and out.strip(), f"{out}\n{err}\n{self.proxy_log()}"
        found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return found

    def proxy_log(self) -> str:
        return (self.base / "proxy.log").read_text(errors="replace")[-3000:]

    def inspect(self, container: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.engine.docker("inspect", container))[0]
        return found

    def containers(self) -> list[str]:
        return self.engine.labelled(COMPILE_LABEL)


def services_environment(
    settings: config.Settings, environ: dict[str, str], engine_env: dict[str, str], base: Path
) -> tuple[dict[str, str], tuple[str, ...]]:
    """The services' environment and the proxy's argv, composed as init.boot composes them:
    the engine side's variables, the proxy's socket as DOCKER_HOST, what the wiring adds."""
    image_root = base / "image"
    runner = image_root / "overleaf/services/clsi/app/js/DockerRunner.js"
    runner.parent.mkdir(parents=True, exist_ok=True)
    runner.write_text("// the image's compile service has its own docker runner\n")
    wiring = service_env.ServicesCompile(settings, base / "shim", PYTHON, root=image_root)
    assert wiring.runner == "docker"  # `auto` found it
    side = SandboxSide(Log(io.StringIO()), NoInstaller(), wiring)
    side.use_proxy(ProxyService(settings, base / "proxy.sock"))
    side.keep_own(environ)
    services = config.service_environment(environ)
    gained = side.with_compiles(services, engine_env)
    assert side._proxy_spec is not None
    return {**services, **gained}, side._proxy_spec.argv


@pytest.fixture(scope="module", params=["dind", "sibling"])
def site(request: pytest.FixtureRequest, texlive: HostEngine) -> Iterator[Site]:
    require(shutil.which("python3", path="/usr/bin:/bin") is not None, "needs /usr/bin/python3")
    mode = request.param
    base = Path(tempfile.mkdtemp(prefix=f"slr-{mode}-", dir="/tmp"))
    base.chmod(0o755)
    app = base / "app-data"  # the app container's data dir
    compiles, output = app / "compiles", app / "output"
    mounted: list[Path] = []
    engine_env = {config.DOCKER_HOST: f"unix://{texlive.socket}"}
    if mode == "sibling":
        # The host's dir, bind-mounted at the app's path after the engine started in a mount
        # namespace of its own: the engine knows it only by the host's path.
        host = base / "host-data"
        for name in ("compiles", "output"):
            (host / name).mkdir(parents=True)
            (app / name).mkdir(parents=True)
            subprocess.run(["mount", "--bind", str(host / name), str(app / name)], check=True)
            mounted.append(app / name)
        engine_env |= {
            config.HOST_DIR_COMPILES: str(host / "compiles"),
            config.HOST_DIR: str(host / "compiles"),
            config.HOST_DIR_OUTPUT: str(host / "output"),
        }
        host_compiles = host / "compiles"
    else:
        compiles.mkdir(parents=True)
        output.mkdir(parents=True)
        host_compiles = compiles
    for directory in (app, compiles, output):
        os.chown(directory, WWW_DATA, WWW_DATA)
    environ = {
        **CLEAN_ENV,
        **OWN,
        "SANDBOXED_COMPILES": "true",
        "TEX_LIVE_DOCKER_IMAGE": TEXLIVE,
        "TEXLIVE_IMAGE_USER": "tex",  # as Server Pro's documentation has it: replaced
        "OVERLEAF_INIT_COMPILES_DIR": str(compiles),
        "OVERLEAF_INIT_OUTPUT_DIR": str(output),
    }
    if mode == "sibling":
        environ["SANDBOXED_COMPILES_SIBLING_CONTAINERS"] = "true"
    settings = config.load(environ)
    environment, proxy_argv = services_environment(settings, environ, engine_env, base)
    with (base / "proxy.log").open("wb") as log:
        proxy = subprocess.Popen(
            proxy_argv, stdout=log, stderr=subprocess.STDOUT,
            env={**CLEAN_ENV, "OVERLEAF_INIT_LOG_LEVEL": "debug"},
        )  # fmt: skip
    made = Site(mode, texlive, base, compiles, host_compiles, environment, proxy)
    try:
        wait_for(lambda: (base / "proxy.sock").exists() or proxy.poll() is not None, 10, "proxy")
        assert proxy.poll() is None, made.proxy_log()
        yield made
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(20)
        for container in made.containers():
            texlive.docker("rm", "-f", container)
        for path in mounted:
            subprocess.run(["umount", str(path)], check=False)
        shutil.rmtree(base, ignore_errors=True)


# -- what the runner is given ------------------------------------------------------------------


def test_the_runner_starts_with_the_inits_environment_and_throws_without_it(site: Site) -> None:
    given = RunnerSettings.from_env(site.environment)
    assert given.host_dir_compiles == str(site.host_compiles)
    assert given.user == f"{WWW_DATA}:{WWW_DATA}"  # the compile dirs' owner, not `tex`
    assert given.image == TEXLIVE and given.allowed_images == (TEXLIVE,)
    assert given.socket == str(site.base / "proxy.sock")  # the proxy, never the engine
    # What the service would see with the init's variables passed on as given (no host dir).
    with pytest.raises(SettingsError, match="SANDBOXED_COMPILES_HOST_DIR_COMPILES not set"):
        RunnerSettings.from_env({"SANDBOXED_COMPILES": "true", "DOCKER_RUNNER": "true"})


# -- compiles ----------------------------------------------------------------------------------


def test_a_compile_succeeds_in_a_container_held_to_the_projects_profile(site: Site) -> None:
    directory = site.project("sp-ok", HELLO)
    started = time.time()
    found = site.compile("sp-ok")
    assert found["status"] == "success", found
    pdf = directory / "output.pdf"
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_uid == WWW_DATA
    container = site.inspect(found["name"])
    assert found["name"].startswith("project-sp-ok-") and container["State"]["Status"] == "exited"
    host, labels = container["HostConfig"], container["Config"]["Labels"]
    assert container["Config"]["User"] == f"{WWW_DATA}:{WWW_DATA}"
    assert host["Binds"] == [f"{site.host_compiles}/sp-ok:/compile:rw"]
    assert host["NetworkMode"] == "none" and container["Config"]["NetworkDisabled"] is True
    assert host["ReadonlyRootfs"] is True and set(host["Tmpfs"]) == {"/tmp"}
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert (host["Memory"], host["MemorySwap"], host["PidsLimit"], host["NanoCpus"]) == (
        512 << 20, 512 << 20, 128, 10**9,
    )  # fmt: skip
    assert labels[COMPILE_LABEL] == "1"
    lifetime = max(4 * 10, 10 + IDLE) + 5  # Deadlines.lifetime for a 10 s timeout
    # The label is whole seconds, rounded: up to 0.5 s past the exact expiry.
    assert started < float(labels[EXPIRES_LABEL]) <= time.time() + lifetime + 0.5


def test_a_latex_error_is_failure(site: Site) -> None:
    directory = site.project("sp-broken", BROKEN)
    found = site.compile("sp-broken")
    assert found["status"] == "failure", found
    assert found["error"] is None and found["code"] == 12  # latexmk's own exit, no PDF
    assert "no-such-file" in (directory / "output.log").read_text()


def test_a_loop_ends_at_the_runners_timeout_as_timedout(site: Site) -> None:
    site.project("sp-loop", LOOP)
    started = time.monotonic()
    found = site.compile("sp-loop", timeout_ms=4000)
    took = time.monotonic() - started
    assert found["status"] == "timedout", found
    assert 4 <= took < 30, took
    state = site.inspect(found["name"])["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 137)  # the runner's kill


def test_a_stop_mid_compile_is_terminated(site: Site) -> None:
    site.project("sp-stop", LOOP)
    running = site.runner(
        "compile", "--compiles", str(site.compiles), "--project", "sp-stop", "--timeout-ms", "60000"
    )
    wait_for(lambda: any("sp-stop" in n for n in running_names(site)), 60, "the compile to run")
    running.send_signal(signal.SIGTERM)  # the service's stop: the runner's kill
    out, err = running.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1])["status"] == "terminated", err


def running_names(site: Site) -> list[str]:
    return site.engine.docker("ps", "--format", "{{.Names}}").split()


# -- nothing left ----------------------------------------------------------------------------------


def test_a_project_container_is_reused_soon_after_and_replaced_once_half_idle(site: Site) -> None:
    site.project("sp-reuse", HELLO)
    first = site.compile("sp-reuse")
    first_id = site.inspect(first["name"])["Id"]
    again = site.compile("sp-reuse")  # at once: the same container, started again
    assert again["status"] == "success" and site.inspect(again["name"])["Id"] == first_id
    time.sleep(IDLE / 2 + 0.5)  # past half the idle time: the proxy retires it on inspect
    later = site.compile("sp-reuse")
    assert later["status"] == "success" and later["name"] == first["name"]
    assert site.inspect(later["name"])["Id"] != first_id, site.proxy_log()


def test_nothing_is_left_on_the_engine_after_the_idle_time(site: Site) -> None:
    site.project("sp-idle", HELLO)
    found = site.compile("sp-idle")
    assert found["status"] == "success" and site.containers()
    ended = time.monotonic()
    wait_for(lambda: not site.containers(), IDLE + 20, "no compile container left")
    assert time.monotonic() - ended >= IDLE - 1  # not before: it may be reused till then
    assert "removed" in site.proxy_log() and "(idle)" in site.proxy_log()


def test_a_running_container_past_its_expiry_is_removed(site: Site) -> None:
    """A runner that lost track of its container (the service restarted mid-compile)."""
    body = {
        "Image": TEXLIVE, "User": "33:33", "Cmd": ["sleep", "600"],
        "Labels": {EXPIRES_LABEL: f"{time.time() - 30:.0f}"}, "name": "project-lost-0",
    }  # fmt: skip
    created = proxy_call(site, "POST", "/containers/create", body)  # as dockerode sends it
    proxy_call(site, "POST", f"/containers/{created['Id']}/start")
    assert site.inspect("project-lost-0")["State"]["Running"] is True
    wait_for(lambda: "project-lost-0" not in all_names(site), 30, "the lost container removed")


def all_names(site: Site) -> list[str]:
    return [
        name.lstrip("/") for c in site.engine.get("/containers/json?all=1") for name in c["Names"]
    ]


def proxy_call(site: Site, method: str, target: str, body: Any = None) -> Any:
    from tests.fixtures.overleaf.docker_runner import Engine

    return Engine(str(site.base / "proxy.sock")).call(method, target, body)


def test_what_an_earlier_run_left_goes_when_the_engine_starts_again(site: Site) -> None:
    """The inner engine's readiness check sweeps every compile container when dockerd has
    (re)started (docker-in-docker); the runner's are among them, labelled by the proxy."""
    site.project("sp-left", HELLO)
    found = site.compile("sp-left")
    assert found["name"] in all_names(site)
    done = subprocess.run(
        [PYTHON, "-m", "init.engine.ready", "--socket", str(site.engine.socket),
         "--result", str(site.base / "ready.json"), "--deadline", "20", "--sweep"],
        capture_output=True, text=True, timeout=60, env=CLEAN_ENV, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert found["name"] not in all_names(site)
