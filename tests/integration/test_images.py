"""The local images for real: `scripts/build-images` into a private dockerd, then a compile.

One engine and one cold build (debootstrap, then Debian's TeX Live in scheme basic: the recipe
and the steps of the suite's scheme small, in half the time) serve the whole module; the cache
dir is fresh too, so the debootstrap really runs. The build is the module's slowest set-up, so
it starts early (`EARLY`, tests/conftest.py) and the module takes its result. Every dockerd runs
in its own mount namespace (`unshare --mount --propagation private`), so the data root it mounts
onto itself goes away with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import BACKGROUND, Early, remove_later, renice_tree
from tests.integration.conftest import require, wait_for

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
BUILD_IMAGES = REPO / "scripts" / "build-images"
TOOLS = ("dockerd", "docker", "debootstrap", "unshare")
BASE = "sharelatex-init/debian:bookworm"
TEXLIVE = "sharelatex-init/texlive:bookworm"
ENGINE_ARGS = ("--bridge=none", "--iptables=false", "--ip-masq=false")
# The cold build's scheme: not the suite's image (scheme small, tests/conftest.py), so a
# cold build is always this module's own, and half the work.
SCHEME = ("--scheme", "basic")
UNREACHABLE_MIRROR = "http://127.0.0.1:9/debian"  # the discard port: nothing listens
SANDBOX = ("--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--read-only", "--tmpfs", "/tmp")  # fmt: skip
DOCUMENT = r"""\documentclass{article}
\usepackage{amsmath}
\begin{document}
Sandboxed: $\int_0^1 x\,dx = \tfrac12$.
\end{document}
"""


@dataclass
class Engine:
    """A private dockerd; `proc` is dockerd itself (unshare without --fork execs it)."""

    base: Path
    proc: subprocess.Popen[bytes]
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"unix://{self.base / 'd.sock'}"

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.url, *args], capture_output=True, text=True, timeout=timeout
        )

    def labels(self, image: str) -> dict[str, str]:
        done = self.docker("image", "inspect", "--format", "{{json .Config.Labels}}", image)
        assert done.returncode == 0, done.stderr
        labels: dict[str, str] = json.loads(done.stdout)
        return labels

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"dockerd exited: {self.log()[-2000:]}")
        return self.docker("version", timeout=10).returncode == 0

    def log(self) -> str:
        return (self.base / "dockerd.log").read_text(errors="replace")


@dataclass
class Build:
    code: int
    output: str
    seconds: float


def build_images(
    engine: Engine, cache: Path, *args: str, prefix: Sequence[str] = (), **env: str
) -> Build:
    began = time.monotonic()
    done = subprocess.run(
        [*prefix, str(BUILD_IMAGES), "--engine", engine.url, *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "XDG_CACHE_HOME": str(cache), **env},
    )
    return Build(done.returncode, done.stdout + done.stderr, time.monotonic() - began)


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    """A short base: unix socket paths (containerd's under the exec root) max 107 bytes."""
    require(os.geteuid() == 0, "needs root")
    for tool in TOOLS:
        require(shutil.which(tool) is not None, f"needs {tool} (scripts/setup installs it)")
    path = Path(tempfile.mkdtemp(prefix="sim-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Engines:
    """The module's private dockerds, each under its own dir of `base`."""

    base: Path
    started: list[Engine] = field(default_factory=list)

    def start(self, name: str, prefix: Sequence[str] = ()) -> Engine:
        base = self.base / name
        base.mkdir()
        with (base / "dockerd.log").open("wb") as log:
            proc = subprocess.Popen(
                [*prefix, "unshare", "--mount", "--propagation", "private",
                 "dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
                 "--pidfile", str(base / "d.pid"), "--host", f"unix://{base / 'd.sock'}",
                 *ENGINE_ARGS],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        engine = Engine(base, proc)
        self.started.append(engine)
        wait_for(engine.answers, 30, f"dockerd {name} to answer")
        return engine

    def stop(self) -> None:
        for engine in self.started:
            stop(engine)


def stop(engine: Engine) -> None:
    if engine.stopped:
        return
    engine.stopped = True
    if engine.proc.poll() is None:
        engine.proc.send_signal(signal.SIGTERM)
        try:
            engine.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    # Its session: the containerd it started, should dockerd not have stopped it.
    try:
        os.killpg(engine.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if engine.proc.poll() is None:
        engine.proc.wait(10)


@dataclass
class ColdBuild:
    """The cold build and where it ran: the engines' base dir, engine e1, the fresh cache."""

    engines: Engines
    engine: Engine
    cache: Path
    build: Build


def cold_build(stack: ExitStack) -> ColdBuild:
    base = Path(tempfile.mkdtemp(prefix="sim-", dir="/tmp"))
    stack.callback(remove_later, base)
    engines = Engines(base)
    stack.callback(engines.stop)
    # Niced, engine and debootstrap alike, while the session's other tests run beside it.
    engine = engines.start("e1", prefix=BACKGROUND)
    cache = base / "cache"
    build = build_images(engine, cache, *SCHEME, prefix=BACKGROUND)
    renice_tree(engine.proc.pid)  # the module's own tests hold time bounds
    return ColdBuild(engines, engine, cache, build)


COLD = Early(
    "test_images: the cold build",
    cold_build,
    ready=lambda: os.geteuid() == 0 and all(shutil.which(tool) for tool in TOOLS),
)
EARLY = (COLD,)


@pytest.fixture(scope="module")
def early(short_tmp: Path) -> Iterator[ColdBuild]:
    """The cold build started early (or now, if the session did not start it)."""
    try:
        yield COLD.result()
    finally:
        COLD.close()


@pytest.fixture(scope="module")
def engines(early: ColdBuild) -> Iterator[Engines]:
    """Every engine started is stopped by pid at the module's end, and leaves no mount."""
    yield early.engines
    early.engines.stop()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(early.engines.base) not in mounts, "a test engine left a mount behind"


@pytest.fixture(scope="module")
def engine(engines: Engines, early: ColdBuild) -> Engine:
    return early.engine


@pytest.fixture(scope="module")
def cache(early: ColdBuild) -> Path:
    return early.cache


@pytest.fixture(scope="module")
def cold(engine: Engine, early: ColdBuild) -> Build:
    """The one cold build of both images that every test here looks at."""
    assert early.build.code == 0, early.build.output
    print(early.build.output)
    return early.build


def test_a_cold_build_makes_both_images_step_by_step(cold: Build, cache: Path) -> None:
    lines = cold.output.splitlines()
    assert all(line.startswith("images: ") for line in lines), cold.output
    for step in ("base: debootstrap --variant=minbase bookworm", "base: packed",
                 f"base: imported {BASE}", f"texlive: built {TEXLIVE}", "done in"):  # fmt: skip
        assert any(step in line for line in lines), f"no `{step}` line:\n{cold.output}"
    tarballs = list((cache / "sharelatex-init").glob("debian-bookworm-*.tar.gz"))
    assert len(tarballs) == 1, tarballs
    assert not list((cache / "sharelatex-init").glob("debootstrap-*")), "work dir left behind"


def test_both_images_carry_their_content_keys(cold: Build, engine: Engine, cache: Path) -> None:
    base = engine.labels(BASE)
    texlive = engine.labels(TEXLIVE)
    assert base["sharelatex-init.image"] == "base"
    assert texlive["sharelatex-init.image"] == "texlive"
    assert base["sharelatex-init.suite"] == texlive["sharelatex-init.suite"] == "bookworm"
    assert texlive["sharelatex-init.scheme"] == "basic"
    assert re.fullmatch(r"[0-9a-f]{64}", base["sharelatex-init.key"])
    assert re.fullmatch(r"[0-9a-f]{64}", texlive["sharelatex-init.key"])
    assert base["sharelatex-init.key"] != texlive["sharelatex-init.key"]
    # The debootstrap tarball in the cache is named by the base's key.
    tarball = f"debian-bookworm-{base['sharelatex-init.key'][:16]}.tar.gz"
    assert (cache / "sharelatex-init" / tarball).is_file()


def test_a_sandboxed_compile_makes_a_pdf(cold: Build, engine: Engine, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.tex").write_text(DOCUMENT)
    os.chown(project, 1000, 1000)
    ran = engine.docker(
        "run", "--rm", *SANDBOX, "--user", "1000:1000", "-v", f"{project}:/compile",
        "-w", "/compile", TEXLIVE, "latexmk", "-pdf", "main.tex",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    pdf = project / "main.pdf"
    assert pdf.is_file(), sorted(p.name for p in project.iterdir())
    assert pdf.read_bytes().startswith(b"%PDF")
    assert pdf.stat().st_uid == 1000


def test_the_image_runs_as_a_non_root_user_in_compile(cold: Build, engine: Engine) -> None:
    ran = engine.docker("run", "--rm", TEXLIVE, "sh", "-c", 'id -u; id -g; pwd; echo "$HOME"')
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1000", "1000", "/compile", "/tmp"]


def test_the_image_has_no_compiler_and_no_network_tool(cold: Build, engine: Engine) -> None:
    for tool in ("gcc", "cc", "curl", "wget"):
        ran = engine.docker("run", "--rm", TEXLIVE, "sh", "-c", f"command -v {tool}")
        assert ran.returncode != 0, f"{tool} is in the image: {ran.stdout}"
    # Nor what apt downloaded to install it: indexes, package caches, .debs.
    leftovers = engine.docker("run", "--rm", "--user", "0", TEXLIVE,
                              "find", "/var/lib/apt/lists", "/var/cache/apt", "-type", "f",
                              "!", "-name", "lock")  # fmt: skip
    assert leftovers.returncode == 0, leftovers.stderr
    assert leftovers.stdout == "", leftovers.stdout


def test_a_second_run_is_a_cache_hit(cold: Build, engine: Engine, cache: Path) -> None:
    # No network either: an unreachable mirror changes nothing.
    again = build_images(engine, cache, *SCHEME, DEBIAN_MIRROR=UNREACHABLE_MIRROR)
    assert again.code == 0, again.output
    # The script's own time (its keys, two inspects): under 2 s. The process's wall adds the
    # interpreter's start, seconds on a loaded machine (2.06 s once beside a CPU hog).
    done = re.search(r"^images: done in ([0-9.]+) s$", again.output, re.MULTILINE)
    assert done and float(done[1]) < 2, again.output
    assert again.seconds < 10, again.output
    assert f"base: {BASE} present" in again.output
    assert f"texlive: {TEXLIVE} present (scheme basic" in again.output
    assert "debootstrap" not in again.output and "built" not in again.output


def test_a_fresh_engine_only_imports_the_cached_base(
    cold: Build, engine: Engine, cache: Path, engines: Engines
) -> None:
    fresh = engines.start("e2")
    build = build_images(fresh, cache, "--only", "base", DEBIAN_MIRROR=UNREACHABLE_MIRROR)
    assert build.code == 0, build.output
    assert f"base: imported {BASE}" in build.output
    assert "debootstrap" not in build.output
    assert fresh.labels(BASE) == engine.labels(BASE)
    assert fresh.docker("image", "inspect", TEXLIVE).returncode != 0  # --only base
    stop(fresh)


def test_an_unreachable_mirror_is_named(cold: Build, engine: Engine, cache: Path) -> None:
    # Another scheme is another key, so this run needs the mirror.
    build = build_images(engine, cache, "--scheme", "full", DEBIAN_MIRROR=UNREACHABLE_MIRROR)
    assert build.code == 1, build.output
    assert f"images: error: the Debian mirror {UNREACHABLE_MIRROR} is unreachable" in build.output
    assert "DEBIAN_MIRROR" in build.output
    assert engine.labels(TEXLIVE)["sharelatex-init.scheme"] == "basic"


def test_no_engine_names_the_socket_and_how_to_start_one(short_tmp: Path) -> None:
    socket = short_tmp / "none.sock"
    done = subprocess.run(
        [str(BUILD_IMAGES), "--engine", f"unix://{socket}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stdout.startswith(f"images: error: no Docker engine at unix://{socket}")
    assert "dockerd" in done.stdout and "--engine" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
