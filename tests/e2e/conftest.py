"""What the end-to-end tests share: a real outer engine, the real app image, the TeX Live image.

The outer engine is Debian trixie's dockerd 26 (`scripts/outer-engine`): bookworm's 20.10 cannot
run `--privileged` on this VM. Its images live in a persistent data root under the cache dir
(locked while an engine uses it; a second run meanwhile gets a throwaway one), so the base, app
and TeX Live images are built once and reused by their content keys (`scripts/build-images`).
The inner engines get the TeX Live image by the init's own means: `load` from a `docker save`
tarball, the one the whole suite shares (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CACHE, LocalImage, provide_all
from tests.integration.conftest import require, wait_for

REPO = Path(__file__).resolve().parents[2]
APP_IMAGE = "sharelatex-init:local"
TEXLIVE_IMAGE = "sharelatex-init/texlive:bookworm"
E2E_LABEL = "sharelatex-init.e2e"
COMPILE_LABEL = "sharelatex-init.compile"
# Where the image's init looks for `docker save` tarballs by default (config.DEFAULT_TARBALL_DIR).
TARBALL_DIR = "/var/lib/sharelatex-init/images"
# Overleaf 5's startup guards as our fixtures have them (tests/fixtures/overleaf/init_scripts).
GUARDS = REPO / "tests" / "fixtures" / "overleaf" / "init_scripts"
# The two generations on the app image: a thin layer each (seconds, cached by the engine), with
# what the init tells them apart by (config.detect_generation). Overleaf 5+: /etc/overleaf and
# the startup guards in /etc/my_init.d, as its images have them. ShareLaTeX 4.x: /etc/sharelatex
# and /var/www/sharelatex, no guards (4.x images have none).
GENERATIONS = {
    "overleaf5": "COPY init_scripts/ /etc/my_init.d/\nRUN mkdir -p /etc/overleaf\n",
    "sharelatex4": "RUN mkdir -p /etc/sharelatex /var/www/sharelatex\n",
}


def _needs() -> None:
    require(os.geteuid() == 0, "needs root")
    for tool in (
        "docker",
        "docker-compose",
        "git",
        "unshare",
        "containerd",
        "runc",
        "apt-get",
        "dpkg-deb",
    ):
        require(shutil.which(tool) is not None, f"needs {tool} (scripts/setup installs it)")


@dataclass
class OuterEngine:
    """The engine the tests' containers run on, as a host's dockerd would."""

    base: Path

    @property
    def socket(self) -> Path:
        return self.base / "d.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.url, *args], capture_output=True, text=True, timeout=timeout
        )

    def docker(self, *args: str, timeout: float = 120) -> str:
        done = self.run(*args, timeout=timeout)
        assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout.strip()


@pytest.fixture(scope="session")
def outer() -> Iterator[OuterEngine]:
    _needs()
    base = Path(tempfile.mkdtemp(prefix="oe-", dir="/tmp"))  # short: socket paths <= 107 bytes
    CACHE.mkdir(parents=True, exist_ok=True)
    start = [str(REPO / "scripts/outer-engine"), "start", "--dir", str(base)]
    done = subprocess.run(
        [*start, "--data-root", str(CACHE / "outer-data")], capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if done.returncode != 0 and "is in use by" in done.stderr:
        # Another run holds the cached images: build into a throwaway data root instead.
        done = subprocess.run(start, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    engine = OuterEngine(base)
    try:
        # Containers a killed earlier run left behind (the data root persists): its sites, and
        # the compile containers of a site killed before it could end them.
        for label in (E2E_LABEL, COMPILE_LABEL):
            for leftover in engine.docker("ps", "-aq", "--filter", f"label={label}").split():
                engine.run("rm", "-f", leftover)
        for network in engine.docker(
            "network", "ls", "-q", "--filter", f"label={E2E_LABEL}"
        ).split():
            engine.run("network", "rm", network)
        yield engine
    finally:
        subprocess.run(
            [str(REPO / "scripts/outer-engine"), "stop", str(base)], capture_output=True, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def images(outer: OuterEngine) -> dict[str, LocalImage]:
    """The app and TeX Live images in the outer engine, built side by side when missing."""
    return {image.kind: image for image in provide_all(outer.url, ["app", "texlive"])}


@pytest.fixture(scope="session")
def app_image(images: dict[str, LocalImage]) -> str:
    """The repo's Dockerfile on the local Debian base (rebuilt only when its sources change)."""
    return images["app"].name


def build_generation(outer: OuterEngine, app: str, generation: str) -> str:
    """The app image as `generation`'s image (GENERATIONS): `sharelatex-init:e2e-GENERATION`."""
    name = f"sharelatex-init:e2e-{generation}"
    with tempfile.TemporaryDirectory(prefix="generation-") as tmp:
        context = Path(tmp)
        shutil.copytree(GUARDS, context / "init_scripts")
        (context / "Dockerfile").write_text(f"FROM {app}\n{GENERATIONS[generation]}")
        done = subprocess.run(
            ["docker", "build", "-q", "--rm", "--force-rm", "--network", "none", "-t", name,
             str(context)],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "DOCKER_HOST": outer.url, "DOCKER_BUILDKIT": "0"},
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return name


@pytest.fixture(scope="session")
def overleaf5_image(outer: OuterEngine, app_image: str) -> str:
    """The app image as an Overleaf 5+ image: its startup guards in place."""
    return build_generation(outer, app_image, "overleaf5")


@pytest.fixture(scope="session")
def sharelatex4_image(outer: OuterEngine, app_image: str) -> str:
    """The app image as a ShareLaTeX 4.x image: /var/lib/sharelatex, no guards."""
    return build_generation(outer, app_image, "sharelatex4")


@pytest.fixture(scope="session")
def texlive_image(images: dict[str, LocalImage]) -> str:
    """The TeX Live image in the outer engine: sibling mode compiles with it there."""
    return images["texlive"].name


@pytest.fixture(scope="session")
def texlive_tarballs(images: dict[str, LocalImage]) -> Path:
    """A dir with `docker save` of the TeX Live image named as the installer's `load` wants it,
    cached under the image's content key (tests/conftest.py)."""
    return images["texlive"].directory


# A `docker stop` is held within half Docker's 10 s grace (never SIGKILLed), and the init's own
# share of it (from "SIGTERM received" on) under OWN_STOP_WITHIN: 0.17 s on a quiet machine,
# 0.50 s seen with the session's image builds beside it on the two cores; a wait in it (a
# service's grace, a poll, a child's timeout) would be seconds. The whole stop, with the
# engine's and the CLI's share, is a figure of scripts/bench/docker-stop, not a test's bound.
STOP_WITHIN = 5.0
OWN_STOP_WITHIN = 1.5


@dataclass
class Container:
    engine: OuterEngine
    id: str
    started: float

    def logs(self) -> str:
        done = self.engine.run("logs", self.id)
        return done.stdout + done.stderr

    def logs_once_with(self, *needles: str, timeout: float = 10) -> str:
        """Its log, once a line holds every needle. A line the TeX Live installer prints reaches
        the log through PID 1's relay and the engine's log copier: after the installer's own
        status file, which the ready probe reads, may already say so."""
        wait_for(lambda: lines_with(self.logs(), *needles), timeout, f"a line with {needles}")
        return self.logs()

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.engine.run("exec", self.id, *argv, timeout=timeout)

    def probe(self, what: str) -> tuple[int, str]:
        done = self.exec("sharelatex-init", "status", "--check", what)
        return done.returncode, (done.stdout + done.stderr).strip()

    def state(self, template: str) -> str:
        return self.engine.docker("inspect", "--format", template, self.id)

    def running(self) -> bool:
        return self.state("{{.State.Running}}") == "true"

    def exit_code(self) -> int:
        return int(self.state("{{.State.ExitCode}}"))

    def wait_exit(self, timeout: float) -> int:
        wait_for(lambda: not self.running(), timeout, f"{self.id[:12]} to exit")
        return self.exit_code()

    def wait_ready(self, timeout: float) -> float:
        """Seconds from `docker run` until `status --check ready` passes."""

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"the container exited; log:\n{self.logs()[-4000:]}")
            return self.probe("ready")[0] == 0

        try:
            # Half a second between probes: each is a `docker exec` of the init's CLI in the
            # container (a Python start there, two engine calls here), a probe every 0.6 s
            # back to back; a start takes seconds to a minute and a half.
            wait_for(ready, timeout, "ready", every=0.5)
        except AssertionError as error:
            raise AssertionError(f"{error}; last probe: {self.probe('ready')[1]}; log:\n"
                                 f"{self.logs()[-4000:]}") from None  # fmt: skip
        return time.monotonic() - self.started

    def stop(self, timeout: int = 10) -> float:
        began = time.monotonic()
        self.engine.docker("stop", "-t", str(timeout), self.id, timeout=timeout + 60)
        return time.monotonic() - began

    def seconds_between(self, first: str, last: str) -> float:
        """From the log line holding `first` to the one holding `last`, by the engine's
        timestamps of them (`docker logs -t`): what the init itself took, without the engine's
        and the CLI's share of a `docker stop`."""
        lines = self.engine.run("logs", "-t", self.id).stdout.splitlines()

        def when(text: str) -> float:
            (stamp,) = [line.split()[0] for line in lines if text in line]
            clock = stamp.rstrip("Z").split("T")[1]
            hours, minutes, seconds = clock.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)

        return when(last) - when(first)


@dataclass
class Site:
    """One test's dirs on the outer engine's host, and the containers it ran there."""

    engine: OuterEngine
    image: str
    base: Path
    containers: list[Container] = field(default_factory=list)

    def dir(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def data_dir(self) -> Path:
        """The ShareLaTeX data dir with the compile and output dirs its startup scripts make."""
        data = self.dir("sharelatex_data")
        for sub in ("data/compiles", "data/output"):
            (data / sub).mkdir(parents=True, exist_ok=True)
            os.chown(data / sub, 33, 33)  # www-data's, as ShareLaTeX's startup scripts do
        return data

    def run(self, *options: str, env: dict[str, str] | None = None, **kwargs: Any) -> Container:
        """`docker run -d` of the app image; no network (no registry here: pulls fail fast)."""
        argv = ["run", "-d", "--network", "none", "--label", E2E_LABEL, *options]
        for name, value in (env or {}).items():
            argv += ["-e", f"{name}={value}"]
        began = time.monotonic()
        container = Container(self.engine, self.engine.docker(*argv, self.image), began)
        self.containers.append(container)
        return container


@contextmanager
def removed_on_failure(container: Container) -> Iterator[Container]:
    """`container`, removed if the block fails while it may run. A docker-in-docker site left
    running keeps its engine's data root: the next site on that volume would find its engine's
    containerd waiting forever on the first one's lock, and its test would fail for that."""
    try:
        yield container
    except BaseException:
        container.engine.run("rm", "-f", container.id)
        raise


@contextmanager
def new_site(outer: OuterEngine, image: str) -> Iterator[Site]:
    """A Site whose containers are removed and dirs deleted at the end (on the host's disk:
    /tmp may be a tmpfs, where the inner engine's overlay2 is not what users run)."""
    made = Site(outer, image, Path(tempfile.mkdtemp(prefix="e2e-", dir="/var/tmp")))
    try:
        yield made
    finally:
        for container in made.containers:
            outer.run("rm", "-f", container.id)
        shutil.rmtree(made.base, ignore_errors=True)


@pytest.fixture
def site(outer: OuterEngine, overleaf5_image: str) -> Iterator[Site]:
    """The app image with Overleaf 5's startup guards: every documented configuration must get
    past them."""
    with new_site(outer, overleaf5_image) as made:
        yield made


def lines_with(log: str, *needles: str) -> list[str]:
    return [line for line in log.splitlines() if all(n in line for n in needles)]


DOCUMENT = r"""\documentclass{article}
\begin{document}
Hello from a sandboxed compile, end to end.
\end{document}
"""
# What the compile service gets posted (rootfs/etc/service/compile-api), from inside the site.
POST_COMPILE = (
    "import sys, urllib.request\n"
    "r = urllib.request.Request('http://127.0.0.1:8090/compile', data=sys.stdin.buffer.read(),"
    " headers={'Content-Type': 'text/x-tex'})\n"
    "sys.stdout.buffer.write(urllib.request.urlopen(r, timeout=170).read())\n"
)


# A project as the compile service makes it, inside the site (in docker-in-docker the compiles
# root is a filesystem of the site's own, init.engine.compiles_fs: the host's side of the data
# mount no longer shows it): the dir and main.tex www-data's, then the first bytes of a file.
MAKE_PROJECT = (
    "import os, pathlib, sys\n"
    "d = pathlib.Path(sys.argv[1]); d.mkdir(); (d / 'main.tex').write_text(sys.argv[2])\n"
    "for p in (d, d / 'main.tex'): os.chown(p, 33, 33)\n"
)
HEAD = "import sys; sys.stdout.write(open(sys.argv[1], 'rb').read(4).decode('latin-1'))"
PYTHON = "/opt/sharelatex-init/bin/python"


def compile_project(
    container: Container, data: Path, project: str, data_root: str = "/var/lib/overleaf"
) -> dict[str, Any]:
    """A document compiled as the compile service's `latexmk` shim does it: `sharelatex-init
    compile DIR` (issue 6) in the site, for a project dir the site made under the data dir
    mounted at `data_root` (www-data's: compiles run as a uid of the project's in its group);
    the PDF is asserted inside the site. Its JSON result. (`data`: the host's side of the
    mount, which sibling mode's compiles root is.)"""
    directory = f"{data_root}/data/compiles/{project}"
    made = container.exec(PYTHON, "-c", MAKE_PROJECT, directory, DOCUMENT)
    assert made.returncode == 0, made.stderr
    # A compile takes about a second: its own limit at 60 s (not the site's 180 s, the same as
    # this wait's) ends one stuck in TeX with its output, well before the wait gives up on one
    # stuck anywhere else.
    compile_ = ("sharelatex-init", "compile", directory, "--json", "--timeout", "60")
    try:
        done = container.exec(*compile_, timeout=180)
    except subprocess.TimeoutExpired:
        # Seen under load (the dind sites after a restart on their volume): what the site
        # said meanwhile.
        raise AssertionError(
            f"the compile of {project} did not end in 180 s\n{site_report(container)}"
        ) from None
    if done.returncode != 0:
        raise AssertionError(f"{done.stdout}{done.stderr}\n{site_report(container)}")
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["status"] == "ok", result
    head = container.exec(PYTHON, "-c", HEAD, f"{directory}/output.pdf")
    assert head.stdout == "%PDF", head.stdout + head.stderr
    return result


# Each process of the site: pid, parent, state, what it waits in, its command line.
PROCESSES = (
    "import os\n"
    "for pid in sorted(int(p) for p in os.listdir('/proc') if p.isdigit()):\n"
    "    try:\n"
    "        stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
    "        wchan = open(f'/proc/{pid}/wchan').read()\n"
    "        argv = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ')\n"
    "    except OSError:\n"
    "        continue\n"
    "    print(pid, stat[1], stat[0], wchan or '-', argv.decode(errors='replace')[:160])\n"
)


def site_report(container: Container) -> str:
    """What a site says of itself, for a failure that is a hang: its status, its processes,
    the inner engine's containers (docker-in-docker), and its log without the inner dockerd's
    chatter (whose last lines are kept)."""
    parts = []
    for title, argv in (
        ("status", ["sharelatex-init", "status"]),
        ("processes (pid ppid state wchan argv)", [PYTHON, "-c", PROCESSES]),
        ("inner engine's containers", ["docker", "ps", "-a", "--no-trunc"]),
    ):
        try:
            done = container.exec(*argv, timeout=30)
            parts.append(f"{title}:\n{done.stdout}{done.stderr}")
        except subprocess.TimeoutExpired:
            parts.append(f"{title}: no answer in 30 s")
    lines = container.logs().splitlines()
    engine = [line for line in lines if line.startswith("dockerd |")]
    ours = [line for line in lines if not line.startswith("dockerd |")]
    parts.append("log, but the inner dockerd:\n" + "\n".join(ours[-150:]))
    parts.append("the inner dockerd's last lines:\n" + "\n".join(engine[-25:]))
    return "\n".join(parts)


def post_compile(container: Container) -> None:
    """A document posted to the site's compile service, as an operator or the demo does it."""
    posted = subprocess.run(
        ["docker", "-H", container.engine.url, "exec", "-i", container.id,
         "/opt/sharelatex-init/bin/python", "-c", POST_COMPILE],
        input=DOCUMENT.encode(), capture_output=True, timeout=180,
    )  # fmt: skip
    assert posted.returncode == 0, posted.stderr.decode(errors="replace")
    assert posted.stdout.startswith(b"%PDF")


# --- the compose examples, run for real ---------------------------------------------------------

EXAMPLES = REPO / "examples"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
READYZ_PORT = 8089


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Compose:
    """An example compose file brought up on the outer engine with Debian's docker-compose, an
    override file beside it (compose merges volumes by their container path, environment by
    name): the app image, this test's host dirs, and the published port on loopback."""

    engine: OuterEngine
    example: Path
    override: dict[str, Any]
    directory: Path
    project: str = field(default_factory=lambda: f"e2e{os.getpid()}{time.monotonic_ns() % 10**6}")
    port: int = field(default_factory=free_port)  # published on 127.0.0.1; nothing forwards it

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        override = self.directory / "override.yml"
        override.write_text(json.dumps(self.override))  # JSON is YAML
        env = {
            **os.environ,
            "DOCKER_HOST": self.engine.url,
            # The example's own port variables (compose's, the container never sees them).
            "OVERLEAF_LISTEN_IP": "127.0.0.1",
            "OVERLEAF_PORT": str(self.port),
        }
        return subprocess.run(
            ["docker-compose", "--project-name", self.project, "--project-directory",
             str(self.directory), "-f", str(self.example), "-f", str(override), *args],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip

    def up(self) -> Container:
        began = time.monotonic()
        done = self.run("up", "-d")
        assert done.returncode == 0, done.stdout + done.stderr
        (cid,) = self.engine.docker(
            "ps", "-q", "--no-trunc", "--filter", f"label={COMPOSE_PROJECT_LABEL}={self.project}"
        ).split()
        return Container(self.engine, cid, began)

    def wait_readyz(self, container: Container, timeout: float) -> float:
        """Seconds from `up` until the init's /readyz answers 200, asked from the host on the
        project's network, as a load balancer would."""
        address = self.engine.docker(
            "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container.id,
        )  # fmt: skip
        assert address, "the service has no address on the project's network"
        url = f"http://{address}:{READYZ_PORT}/readyz"
        last = ""

        def ready() -> bool:
            nonlocal last
            if not container.running():
                raise AssertionError(f"the service exited; log:\n{container.logs()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=3) as answer:
                    return bool(answer.status == 200)
            except urllib.error.HTTPError as error:
                last = f"{error.code} {error.read().decode(errors='replace')[:300]}"
            except OSError as error:
                last = str(error)
            return False

        try:
            wait_for(ready, timeout, f"{url} to answer 200")
        except AssertionError as error:
            raise AssertionError(f"{error}; last answer: {last}; log:\n"
                                 f"{container.logs()[-4000:]}") from None  # fmt: skip
        return time.monotonic() - container.started

    def down(self) -> float:
        began = time.monotonic()
        done = self.run("down", "-v", "--remove-orphans", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return time.monotonic() - began

    def leftovers(self) -> dict[str, str]:
        """What the engine still holds of this project, by kind (empty: nothing)."""
        label = f"label={COMPOSE_PROJECT_LABEL}={self.project}"
        found = {
            "containers": self.engine.docker("ps", "-aq", "--filter", label),
            "networks": self.engine.docker("network", "ls", "-q", "--filter", label),
            "volumes": self.engine.docker("volume", "ls", "-q", "--filter", label),
        }
        return {kind: ids for kind, ids in found.items() if ids}


def override(image: str, volumes: list[str], environment: dict[str, str]) -> dict[str, Any]:
    """The example's one service with this test's image, host dirs and settings; labelled, so
    that what a killed run leaves is swept by the next (the outer fixture)."""
    service = {
        "image": image,
        "labels": {E2E_LABEL: ""},
        "volumes": volumes,
        "environment": {"OVERLEAF_INIT_HTTP_ADDRESS": f"0.0.0.0:{READYZ_PORT}", **environment},
    }
    return {
        "services": {"sharelatex": service},
        "networks": {"default": {"labels": {E2E_LABEL: ""}}},
    }


@contextmanager
def compose_site(
    engine: OuterEngine, example: str, directory: Path, changes: dict[str, Any]
) -> Iterator[Compose]:
    """A Compose whose project is taken down (with its volumes) at the end, whatever happened."""
    made = Compose(engine, EXAMPLES / example, changes, directory)
    try:
        yield made
    finally:
        made.run("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180)
