"""What the whole suite shares: the local images, each made once per content key.

Building the TeX Live image (Debian's packages, ~370 MB) takes a minute or more, the app image
half of one; a `docker load` of either takes seconds. So an engine that needs one gets it the
fastest way there is: present already (its key label matches), else loaded from a `docker save`
tarball cached under the key, else built by `scripts/build-images` and saved for the next
engine. Every engine stays private to its tests (a test that removes an image breaks no other):
only the tarball is shared, across modules and across runs. On a fresh machine the first engine
that needs an image builds it (the end-to-end tests' outer engine, which runs first), the rest load;
the TeX Live image there is test_images' cold build, which the outer engine waits for rather than
build the same image beside it (`PRODUCERS`).

And the session's slowest set-ups start early: a test module lists them in `EARLY` (`Early`
jobs); once the session's tests are collected, those of the modules that have a selected test
start in a background lane, one after the other, while the end-to-end and the other tests run
(those modules run last). The module's fixture then takes the job's result (waiting if it is
not done yet).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import pytest

from init.texlive.install import tarball_name

REPO = Path(__file__).resolve().parents[1]
BUILD_IMAGES = REPO / "scripts" / "build-images"
# The tests' cache (the end-to-end tests keep their outer engine's data root there too).
CACHE = Path(os.environ.get("OVERLEAF_INIT_E2E_CACHE", "/var/cache/sharelatex-init/e2e"))
TARBALLS = CACHE / "images"
BUILD_TIMEOUT = 900
KEEP = 3  # tarballs kept per image: worktrees with different sources share the cache
T = TypeVar("T")


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
    present = _key_in(url, image.name) == image.key or _loaded(url, image)
    if not present and not image.tarball.exists() and kind in PRODUCERS:
        # An early job is building this very image (same key) and will save it: wait for it
        # rather than build it twice side by side. Its failure is its own tests' to report;
        # here, build instead.
        PRODUCERS[kind].wait()
        present = _loaded(url, image)
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


def _loaded(url: str, image: LocalImage) -> bool:
    """Whether `docker load` of the cached tarball put the image in; a broken tarball goes."""
    if not image.tarball.exists():
        return False
    loaded = _docker(url, "load", "-q", "-i", str(image.tarball), timeout=300)
    if loaded.returncode == 0 and _key_in(url, image.name) == image.key:
        return True
    shutil.rmtree(image.directory, ignore_errors=True)  # broken, or another run's clean-up
    return False


def save_if_missing(url: str, kind: str) -> None:
    """Cache the engine's `kind` image as the suite's tarball when none is cached yet and the
    engine's carries the key the sources give now: an image a test built for its own reasons
    (test_images' cold build) then spares the session building it again."""
    image = local_image(kind)
    if not image.tarball.exists() and _key_in(url, image.name) == image.key:
        _save(url, image)


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


# -- early jobs: the slowest set-ups, started in the background once the tests are collected ----

PRODUCERS: dict[str, Early[Any]] = {}  # kind -> the started job that will cache its tarball
_lane: ThreadPoolExecutor | None = None
_reaper = ThreadPoolExecutor(1, thread_name_prefix="reap")


# What an early job runs its heavy processes under: an engine started so passes it on to its
# containerd and its containers (a build's apt and dpkg). The tests beside the job hold time
# bounds; the job takes the CPU they leave.
BACKGROUND = ("nice", "-n", "10")


def renice_tree(pid: int, value: int = 0) -> None:
    """Every thread of `pid` and of its descendants to nice `value` (Linux's nice is per
    thread): an early job's engine, once its build is done, serves its tests at full speed."""
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        for task in Path(f"/proc/{process.pid}/task").glob("*"):
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), value)
            except (ProcessLookupError, ValueError):
                continue


def remove_later(path: Path) -> None:
    """Remove a tree in the background; the session's end waits for it. An engine's data root
    with the TeX Live image in it is ~32k files: seconds of unlinking (12 s at a load of 10)
    that the next module need not wait for."""
    _reaper.submit(shutil.rmtree, path, True)


class Early(Generic[T]):
    """A module's slow set-up (a cold build, say), started before the module's first test.

    `work(stack)` makes what the module needs and registers the clean-up of each thing it
    makes on `stack` at once (an engine's stop, a dir's removal). `ready()` says whether it can
    run here at all (root, the tools): if not, it is not started, and the module's fixtures'
    `require` skips or fails with the reason as before. One lane runs the started jobs one after
    the other: each is a core's worth of work (apt, dpkg), and the tests beside them hold time
    bounds. `produces` names the local image whose tarball the work caches when none is yet
    (see `save_if_missing`).
    """

    made: list[Early[Any]] = []

    def __init__(
        self,
        name: str,
        work: Callable[[ExitStack], T],
        ready: Callable[[], bool] = lambda: True,
        produces: str | None = None,
    ) -> None:
        self.name = name
        self._work = work
        self._ready = ready
        self._produces = produces
        self._future: Future[T] | None = None
        self._stack = ExitStack()
        self._lock = threading.Lock()
        self.ran: tuple[float, float] | None = None  # (began, ended), time.monotonic()
        self.waited = 0.0  # how long its module's fixture waited for it
        Early.made.append(self)

    def _timed(self) -> T:
        began = time.monotonic()
        try:
            return self._work(self._stack)
        finally:
            self.ran = (began, time.monotonic())

    def start(self, lane: ThreadPoolExecutor) -> None:
        with self._lock:
            if self._future is not None or not self._ready():
                return
            if self._produces is not None and not local_image(self._produces).tarball.exists():
                PRODUCERS[self._produces] = self
            self._future = lane.submit(self._timed)

    def result(self) -> T:
        """The work's value (or its exception), waiting for it; run here and now if it was
        not started, or is still queued behind another job."""
        began = time.monotonic()
        with self._lock:
            if self._future is not None and self._future.cancel():
                self._future = None
            if self._future is None:
                future: Future[T] = Future()
                try:
                    future.set_result(self._timed())
                except BaseException as error:
                    future.set_exception(error)
                self._future = future
            future = self._future
        try:
            return future.result()
        finally:
            self.waited = time.monotonic() - began

    def wait(self) -> None:
        """Until the work has ended, if it was started; its outcome is `result()`'s."""
        with self._lock:
            future = self._future
        if future is not None:
            try:
                future.exception()
            except BaseException:  # cancelled
                pass

    def close(self) -> None:
        """Clean up what the work made. Normally the work has ended (its module took the
        result). When the session ends before that (-x, ^C), stopping what it made (its engine)
        ends the work too; what it makes meanwhile is cleaned up once it has ended."""
        with self._lock:
            future = self._future
        if future is not None and not future.cancel():
            self._stack.close()  # callbacks are idempotent: stops by pid, rmtree
            try:
                future.exception(timeout=120)
            except BaseException:
                pass
        self._stack.close()


_session_began = time.monotonic()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long each early job ran, when it ended, and how long its module waited for it."""
    for job in Early.made:
        if job.ran is not None:
            began, ended = job.ran
            terminalreporter.write_line(
                f"early: {job.name}: {ended - began:.0f} s, ended {ended - _session_began:.0f} s "
                f"into the session; its module waited {job.waited:.0f} s"
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with early jobs run last, in their own order: the longer their jobs have
    run in the background by then, the less their first test waits. (Modules share nothing
    but the image tarballs, so their order is free.)"""
    items.sort(key=lambda item: bool(getattr(getattr(item, "module", None), "EARLY", ())))


def pytest_collection_finish(session: pytest.Session) -> None:
    global _lane
    if session.config.option.collectonly:
        return
    jobs: list[Early[Any]] = []
    for item in session.items:
        for job in getattr(getattr(item, "module", None), "EARLY", ()):
            if job not in jobs:
                jobs.append(job)
    if jobs:
        _lane = ThreadPoolExecutor(1, thread_name_prefix="early")
        for job in jobs:
            job.start(_lane)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for job in Early.made:
        job.close()
    if _lane is not None:
        _lane.shutdown(wait=True)
    _reaper.shutdown(wait=True)
