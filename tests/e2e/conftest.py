"""What the end-to-end tests share: a real outer engine, the real app image, the TeX Live image.

The outer engine is Debian trixie's dockerd 26 (`scripts/outer-engine`): bookworm's 20.10 cannot
run `--privileged` on this VM. Its images live in a persistent data root under the cache dir
(locked while an engine uses it; a second run meanwhile gets a throwaway one), so the base, app
and TeX Live images are built once and reused by their content keys (`scripts/build-images`).
The inner engines get the TeX Live image by the init's own means: `load` from a `docker save`
tarball, the one the whole suite shares (tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
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


def _needs() -> None:
    require(os.geteuid() == 0, "needs root")
    for tool in ("docker", "unshare", "containerd", "runc", "apt-get", "dpkg-deb"):
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
        # the compile containers of a sibling-mode site removed with `rm -f` before its init
        # could clean up (the sibling tests assert the engine has no compile container).
        for label in (E2E_LABEL, COMPILE_LABEL):
            for leftover in engine.docker("ps", "-aq", "--filter", f"label={label}").split():
                engine.run("rm", "-f", leftover)
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


@pytest.fixture(scope="session")
def texlive_image(images: dict[str, LocalImage]) -> str:
    """The TeX Live image in the outer engine: sibling mode compiles with it there."""
    return images["texlive"].name


@pytest.fixture(scope="session")
def texlive_tarballs(images: dict[str, LocalImage]) -> Path:
    """A dir with `docker save` of the TeX Live image named as the installer's `load` wants it,
    cached under the image's content key (tests/conftest.py)."""
    return images["texlive"].directory


@dataclass
class Container:
    engine: OuterEngine
    id: str
    started: float

    def logs(self) -> str:
        done = self.engine.run("logs", self.id)
        return done.stdout + done.stderr

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
            wait_for(ready, timeout, "ready")
        except AssertionError as error:
            raise AssertionError(f"{error}; last probe: {self.probe('ready')[1]}; log:\n"
                                 f"{self.logs()[-4000:]}") from None  # fmt: skip
        return time.monotonic() - self.started

    def stop(self, timeout: int = 10) -> float:
        began = time.monotonic()
        self.engine.docker("stop", "-t", str(timeout), self.id, timeout=timeout + 60)
        return time.monotonic() - began


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
def site(outer: OuterEngine, app_image: str) -> Iterator[Site]:
    with new_site(outer, app_image) as made:
        yield made


def lines_with(log: str, *needles: str) -> list[str]:
    return [line for line in log.splitlines() if all(n in line for n in needles)]
