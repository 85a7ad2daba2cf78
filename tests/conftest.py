"""What the whole suite shares: the local images, each made once per content key.

Building the TeX Live image (Debian's packages, ~370 MB) takes a minute or more, the app image
half of one; a `docker load` of either takes seconds. So an engine that needs one gets it the
fastest way there is: present already (its key label matches), else loaded from a `docker save`
tarball cached under the key, else built by `scripts/build-images` and saved for the next
engine. Every engine stays private to its tests (a test that removes an image breaks no other):
only the tarball is shared, across modules and across runs. On a fresh machine the first engine
that needs an image builds it (the end-to-end tests' outer engine, which runs first), the rest load.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from init.texlive.install import tarball_name

REPO = Path(__file__).resolve().parents[1]
BUILD_IMAGES = REPO / "scripts" / "build-images"
# The tests' cache (the end-to-end tests keep their outer engine's data root there too).
CACHE = Path(os.environ.get("OVERLEAF_INIT_E2E_CACHE", "/var/cache/sharelatex-init/e2e"))
TARBALLS = CACHE / "images"
BUILD_TIMEOUT = 900
KEEP = 3  # tarballs kept per image: worktrees with different sources share the cache


@dataclass(frozen=True)
class LocalImage:
    """One of scripts/build-images' images, and where its tarball is cached."""

    kind: str  # build-images' --only: texlive or app
    name: str
    key: str

    @property
    def directory(self) -> Path:
        """Holds the tarball alone, named as the TeX Live installer's `load` looks for it: the
        directory can be mounted as the installer's tarball dir."""
        return TARBALLS / f"{self.kind}-{self.key[:16]}"

    @property
    def tarball(self) -> Path:
        return self.directory / tarball_name(self.name)


@cache
def _build_images() -> ModuleType:
    """scripts/build-images as a module (it has no .py suffix), for its content keys."""
    loader = importlib.machinery.SourceFileLoader("_build_images", str(BUILD_IMAGES))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


@cache
def local_image(kind: str) -> LocalImage:
    """The image `scripts/build-images --only KIND` makes from the sources as they are now."""
    build = _build_images()
    base = build.base_key()
    if kind == "texlive":
        return LocalImage(kind, build.TEXLIVE_IMAGE, build.texlive_key(base, "small"))
    if kind == "app":
        return LocalImage(kind, build.APP_IMAGE, build.app_key(base))
    raise ValueError(f"no local image {kind!r}")


def _docker(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "-H", url, *args], capture_output=True, text=True, timeout=timeout
    )


def _key_in(url: str, image: str) -> str:
    done = _docker(
        url, "image", "inspect", "--format", '{{index .Config.Labels "sharelatex-init.key"}}', image
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def provide(url: str, kind: str) -> LocalImage:
    """Make `kind`'s image present in the engine at `url` and its tarball cached; the image."""
    image = local_image(kind)
    present = _key_in(url, image.name) == image.key
    if not present and image.tarball.exists():
        loaded = _docker(url, "load", "-q", "-i", str(image.tarball), timeout=300)
        present = loaded.returncode == 0 and _key_in(url, image.name) == image.key
        if not present:  # broken, or removed meanwhile by another run's clean-up: build
            shutil.rmtree(image.directory, ignore_errors=True)
    if not present:
        done = subprocess.run(
            [str(BUILD_IMAGES), "--engine", url, "--only", kind],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert _key_in(url, image.name) == image.key, done.stdout[-3000:]
    if not image.tarball.exists():
        _save(url, image)
    return image


def provide_all(url: str, kinds: Sequence[str]) -> list[LocalImage]:
    """`provide` each kind, the builds side by side: on a fresh machine the app's pip and the
    TeX Live image's apt wait on the network at the same time. The base they share first."""
    if not all(_key_in(url, local_image(kind).name) == local_image(kind).key for kind in kinds):
        done = subprocess.run(
            [str(BUILD_IMAGES), "--engine", url, "--only", "base"],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    with ThreadPoolExecutor(len(kinds)) as pool:
        return list(pool.map(lambda kind: provide(url, kind), kinds))


def _save(url: str, image: LocalImage) -> None:
    image.directory.mkdir(parents=True, exist_ok=True)
    # Whole or absent: a run that looks meanwhile (or after a crash) never loads half a file.
    partial = image.directory / f".{image.tarball.name}.{os.getpid()}.partial"
    try:
        saved = _docker(url, "save", "-o", str(partial), image.name, timeout=300)
        assert saved.returncode == 0, f"docker save {image.name}: {saved.stderr.strip()}"
        partial.rename(image.tarball)
    finally:
        partial.unlink(missing_ok=True)
    older = sorted(
        (d for d in TARBALLS.glob(f"{image.kind}-*") if d != image.directory),
        key=_mtime,
        reverse=True,
    )
    for stale in older[KEEP - 1 :]:
        shutil.rmtree(stale, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another run's clean-up took it
        return 0.0
