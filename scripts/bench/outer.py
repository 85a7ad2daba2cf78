"""What `start` and `docker-stop` share: the outer engine (scripts/outer-engine, trixie's
dockerd 26: bookworm's cannot run `--privileged` here), the app and TeX Live images built into
it (scripts/build-images, cached by content), the TeX Live `docker save` tarball the init loads,
and timing a container until `sharelatex-init status --check ready` passes."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/sharelatex-init/e2e")  # shared with tests/e2e
APP = "sharelatex-init:local"
TEXLIVE = "sharelatex-init/texlive:bookworm"
TARBALL_DIR = "/var/lib/sharelatex-init/images"  # the init's default `load` dir


def say(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


class Engine:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.url = f"unix://{base / 'd.sock'}"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.url, *args], capture_output=True, text=True, timeout=timeout
        )

    def docker(self, *args: str, timeout: float = 300) -> str:
        done = self.run(*args, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"bench: docker {' '.join(args[:3])}: {done.stderr.strip()}")
        return done.stdout.strip()

    def ready(self, container: str) -> bool:
        argv = ("exec", container, "sharelatex-init", "status", "--check", "ready")
        return self.run(*argv, timeout=30).returncode == 0

    def running(self, container: str) -> bool:
        return self.run("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true"

    def time_to_ready(self, argv: Sequence[str], timeout: float = 600) -> tuple[str, float]:
        """`docker run -d ARGV`; the container and the seconds until it says ready."""
        began = time.monotonic()
        container = self.docker("run", "-d", *argv)
        while not self.ready(container):
            if time.monotonic() - began > timeout or not self.running(container):
                log = self.run("logs", container).stdout[-2000:]
                raise SystemExit(f"bench: {container[:12]} never ready:\n{log}")
            time.sleep(0.05)
        return container, time.monotonic() - began


@contextmanager
def outer_engine(keep: bool = False) -> Iterator[Engine]:
    """The outer engine for the block; `keep` leaves it running (scripts/demo --keep)."""
    base = Path(tempfile.mkdtemp(prefix="oeb-", dir="/tmp"))
    script = str(REPO / "scripts/outer-engine")
    CACHE.mkdir(parents=True, exist_ok=True)
    start = [script, "start", "--dir", str(base)]
    done = subprocess.run([*start, "--data-root", str(CACHE / "outer-data")],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 and "is in use by" in done.stderr:
        say("the cached outer data root is in use: a throwaway one (images build from scratch)")
        done = subprocess.run(start, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    engine = Engine(base)
    try:
        say(engine.docker("version", "--format", "outer engine: dockerd {{.Server.Version}}"))
        yield engine
    finally:
        if not keep:
            subprocess.run([script, "stop", str(base)], capture_output=True)
            shutil.rmtree(base, ignore_errors=True)


def build(engine: Engine, only: str) -> None:
    done = subprocess.run(
        [str(REPO / "scripts/build-images"), "--engine", engine.url, "--only", only],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    say(done.stdout.strip().splitlines()[-2])


def texlive_tarballs(engine: Engine) -> Path:
    """The dir tests/e2e also uses: TeX Live saved under its content key."""
    template = '{{index .Config.Labels "sharelatex-init.key"}}'
    key = engine.docker("image", "inspect", "--format", template, TEXLIVE)
    directory = CACHE / "tarballs" / key[:16]
    tarball = directory / (TEXLIVE.replace("/", "_").replace(":", "_") + ".tar")
    if not tarball.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".{tarball.name}.partial"
        engine.docker("save", "-o", str(partial), TEXLIVE)
        partial.rename(tarball)
    return directory


def summary(values: Sequence[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s, min {min(values):.2f} s, "
        f"max {max(values):.2f} s (n={len(values)})"
    )
