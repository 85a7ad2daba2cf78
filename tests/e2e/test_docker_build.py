"""`docker build --build-arg BASE_IMAGE=… .` from a clean clone, as a Server Pro admin starts:
no requirements.txt, deps/ or wheels/ staged by scripts/build-images, pip from PyPI in the
Dockerfile's builder stage, then the image boots.

The outer engine has no bridge (scripts/outer-engine: `--bridge=none`), so the build runs with
`--network host`: the host reaches Debian's archive and PyPI. The docker CLI here has no buildx,
so this is the classic builder, which every engine has (BuildKit builds the same Dockerfile).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUILD_IMAGES
from tests.e2e.conftest import REPO, OuterEngine

CLEAN_IMAGE = "sharelatex-init:clean-clone"
BUILD_TIMEOUT = 900
# CAs this host added to its own store (here: a TLS-intercepting egress proxy's). A base image
# trusts only Debian's, so pip there cannot verify PyPI through such a proxy: then, and only
# then, the build is told to trust PyPI's two hosts by name (pip's PIP_TRUSTED_HOST build arg).
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
PYPI_HOSTS = "pypi.org files.pythonhosted.org"


def _dangling(outer: OuterEngine) -> set[str]:
    return set(outer.docker("images", "-q", "--no-trunc", "--filter", "dangling=true").split())


@pytest.fixture
def clean_clone() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="clean-clone-", dir="/var/tmp") as tmp:
        clone = Path(tmp) / "sharelatex-init"
        # What is committed, nothing else: no venv, no caches, no staged context.
        done = subprocess.run(
            ["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        yield clone


def test_docker_build_from_a_clean_clone_boots(
    outer: OuterEngine, app_image: str, clean_clone: Path
) -> None:
    """`app_image` first: its build leaves the Dockerfile's system stage (the base's apt step,
    the same on this base) in the engine's cache; this build makes the rest."""
    for staged in ("requirements.txt", "deps", "wheels"):
        assert not (clean_clone / staged).exists(), staged
    done = subprocess.run(
        [str(BUILD_IMAGES), "--engine", outer.url, "--only", "base"],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    base_image = "sharelatex-init/debian:bookworm"
    trust = []
    if any(LOCAL_CAS.glob("*.crt")):
        trust = ["--build-arg", f"PIP_TRUSTED_HOST={PYPI_HOSTS}"]
    before = _dangling(outer)
    began = time.monotonic()
    build = subprocess.run(
        ["docker", "build", "--network", "host", "--rm", "--force-rm",
         "--build-arg", f"BASE_IMAGE={base_image}", *trust, "-t", CLEAN_IMAGE, str(clean_clone)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        env={**os.environ, "DOCKER_HOST": outer.url, "DOCKER_BUILDKIT": "0"},
    )  # fmt: skip
    took = time.monotonic() - began
    try:
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        version = outer.run("run", "--rm", "--network", "none", CLEAN_IMAGE, "--version")
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"sharelatex-init {_project_version()}"
        doctor = outer.run("run", "--rm", "--network", "none", CLEAN_IMAGE, "doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "ok   config:" in doctor.stdout and "Traceback" not in doctor.stderr
        # Nothing of the build in the image: no sources, no wheels, no build venv.
        leftovers = outer.run(
            "run", "--rm", "--network", "none", "--entrypoint", "sh", CLEAN_IMAGE, "-c",
            "ls -d /src /wheels /tmp/build /tmp/sharelatex-init 2>/dev/null; true",
        )  # fmt: skip
        assert leftovers.stdout.strip() == "", leftovers.stdout
        labels = outer.docker(
            "image", "inspect", "--format",
            '{{index .Config.Labels "org.opencontainers.image.base.name"}}', CLEAN_IMAGE,
        )  # fmt: skip
        assert labels == base_image
    finally:
        # The image and this build's own intermediate images (its stages), so that the next run
        # builds again from PyPI; the shared system stage stays cached under the app image.
        outer.run("rmi", "-f", CLEAN_IMAGE)
        for image in _dangling(outer) - before:
            outer.run("rmi", image)
    print(f"docker build from a clean clone: {took:.1f} s")


def _project_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])
