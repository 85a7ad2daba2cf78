"""What the whole suite shares: the local images, each made once per content key, and how the
session's tests are spread over processes.

Building the TeX Live image (Debian's packages, ~530 MB) takes a minute or more, the app image
half of one; a `docker load` of either takes seconds. So an engine that needs one gets it the
fastest way there is: present already (its key label matches), else loaded from a `docker save`
tarball cached under the key, else built by `scripts/build-images` and saved for the next
engine. Every engine stays private to its tests (a test that removes an image breaks no other):
only the tarball is shared, across modules, processes and runs. An image is built by one process
at a time (a lock file beside its tarball): another that needs it meanwhile waits, then loads.

`scripts/test` runs the tests in pytest-xdist workers, a test module to a worker (its engine is
module-scoped), the end-to-end tests in one (they share the outer engine), the longest modules
first (`SECONDS`, `ModuleScheduling`). A module's slowest set-up (a cold build) is an `Early` job:
it starts in a background lane of the worker as the module begins (at the session's start, in a
single process), while the module's other tests run.
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
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


def script_module(path: Path, name: str) -> ModuleType:
    """A script of scripts/ as a module (it has no .py suffix), loaded afresh."""
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


@cache
def _build_images() -> ModuleType:
    """scripts/build-images as a module, for its content keys."""
    return script_module(BUILD_IMAGES, "_build_images")


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
    if _key_in(url, image.name) == image.key or _loaded(url, image):
        return image
    with _building(image):  # another process building it: wait, then load what it saved
        present = _key_in(url, image.name) == image.key or _loaded(url, image)
        if not present:
            done = subprocess.run(  # niced, as an early job's build: tests run beside it
                [*BACKGROUND, str(BUILD_IMAGES), "--engine", url, "--only", kind],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
            assert _key_in(url, image.name) == image.key, done.stdout[-3000:]
        if not image.tarball.exists():
            _save(url, image)
    return image


@contextmanager
def _building(image: LocalImage) -> Iterator[None]:
    """Held while this process builds and saves `image`: the lock file of its key."""
    TARBALLS.mkdir(parents=True, exist_ok=True)
    with locked(TARBALLS / f".{image.kind}-{image.key[:16]}.lock"):
        yield


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """The lock file `path` held (flock, so a killed holder frees it); another process (another
    worker, another run) that asks for it meanwhile waits."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _loaded(url: str, image: LocalImage) -> bool:
    """Whether `docker load` of the cached tarball put the image in; a broken tarball goes."""
    if not image.tarball.exists():
        return False
    loaded = _docker(url, "load", "-q", "-i", str(image.tarball), timeout=300)
    if loaded.returncode == 0 and _key_in(url, image.name) == image.key:
        return True
    shutil.rmtree(image.directory, ignore_errors=True)  # broken, or another run's clean-up
    return False


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
        key=mtime,
        reverse=True,
    )
    for stale in older[KEEP - 1 :]:
        shutil.rmtree(stale, ignore_errors=True)


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another run's clean-up took it
        return 0.0


# -- early jobs: a module's slowest set-up, started in the background as the module begins -----

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
    `require` skips or fails with the reason as before. One lane a process runs the started
    jobs one after the other: each is a core's worth of work (apt, dpkg), and the tests beside
    them hold time bounds.
    """

    made: list[Early[Any]] = []

    def __init__(
        self, name: str, work: Callable[[ExitStack], T], ready: Callable[[], bool] = lambda: True
    ) -> None:
        self.name = name
        self._work = work
        self._ready = ready
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

    def start(self) -> None:
        global _lane
        with self._lock:
            if self._future is not None or not self._ready():
                return
            if _lane is None:
                _lane = ThreadPoolExecutor(1, thread_name_prefix="early")
            self._future = _lane.submit(self._timed)

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

    def summary(self) -> str | None:
        """How long it ran, when it ended, how long its module waited for it."""
        if self.ran is None:
            return None
        began, ended = self.ran
        return (
            f"early: {self.name}: {ended - began:.0f} s, ended {ended - _session_began:.0f} s "
            f"into the session; its module waited {self.waited:.0f} s"
        )


_session_began = time.monotonic()
_worker_summaries: list[str] = []  # the controller's, from each worker's `workeroutput`


def _early_jobs(module: object) -> Sequence[Early[Any]]:
    return getattr(module, "EARLY", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a single process, the modules with early jobs run last, in their own order: the
    longer their jobs have run in the background by then, the less their first test waits.
    (Modules share nothing but the image tarballs, so their order is free.)"""
    items.sort(key=lambda item: bool(_early_jobs(getattr(item, "module", None))))


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a single process, every selected module's early jobs start now. (A worker collects
    every test but runs its share: there, a module's jobs start as it begins, below.)"""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    for item in session.items:
        for job in _early_jobs(getattr(item, "module", None)):
            job.start()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a module's first test sets up its fixtures, its early jobs start (in a worker)."""
    for job in _early_jobs(getattr(item, "module", None)):
        job.start()  # once: a started job is not started again


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [*_worker_summaries, *filter(None, (job.summary() for job in Early.made))]
    for line in lines:
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for job in Early.made:
        job.close()
    if _lane is not None:
        _lane.shutdown(wait=True)
    _reaper.shutdown(wait=True)
    if hasattr(session.config, "workeroutput"):  # a worker's lines, for the controller's summary
        session.config.workeroutput["early"] = [
            f"{line} (worker {session.config.workerinput['workerid']})"
            for line in filter(None, (job.summary() for job in Early.made))
        ]
        Early.made.clear()
    for base in _short_basetemp if exitstatus == 0 else ():
        shutil.rmtree(base, ignore_errors=True)


def pytest_testnodedown(node: Any, error: object) -> None:
    _worker_summaries.extend(getattr(node, "workeroutput", {}).get("early", ()))


# -- the workers: a module to one, the end-to-end tests together, the longest first ------------

_short_basetemp: list[Path] = []  # the controller's, made below


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """With workers, a short base for the tests' tmp dirs: a worker's is `BASE/popen-gwN`, and
    the tests make unix sockets under theirs (at most 107 bytes a path), where pytest's own
    base, /tmp/pytest-of-root/pytest-N, would leave 10 bytes fewer. Removed after a run that
    passed; kept after one that failed, to look at."""
    workers = config.getoption("numprocesses", None)
    if workers and config.option.basetemp is None and not hasattr(config, "workerinput"):
        _short_basetemp.append(Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp")))
        config.option.basetemp = str(_short_basetemp[0])


# Seconds each module took in a quiet four-worker run of 359b729 (junit's times, its early job's
# included), rounded: the scheduler hands out the longest first, so that no long module starts
# last. A module not listed counts as `UNLISTED` seconds. The end-to-end tests count as one
# (`unit`).
SECONDS = {
    "tests/integration/test_images.py": 280,
    "tests/e2e": 230,
    "tests/integration/test_sandbox.py": 200,
    "tests/integration/test_texlive.py": 175,
    "tests/integration/test_broker_agent.py": 85,
    "tests/integration/test_docker_runner.py": 70,
    "tests/integration/test_status_faults.py": 65,
    "tests/integration/test_dind.py": 65,
    "tests/integration/test_identity.py": 60,
    "tests/integration/test_compile_api_hostile.py": 50,
    "tests/integration/test_compile_api.py": 40,
    "tests/integration/test_sibling_init.py": 36,
    "tests/integration/test_sibling.py": 35,
    "tests/integration/test_compile_budget.py": 26,
    "tests/integration/test_clsi_local.py": 24,
    "tests/integration/test_pid1.py": 20,
    "tests/integration/test_broker_service.py": 19,
    "tests/integration/test_shim.py": 19,
    "tests/integration/test_compile_disk.py": 17,
    "tests/integration/test_compiles_fs.py": 16,
    "tests/integration/test_proxy.py": 12,
    "tests/unit/test_runtime.py": 10,
    "tests/integration/test_wrap.py": 8,
}
UNLISTED = 1


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's hook: the workers get `ModuleScheduling`'s units."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """A test module is a unit (its engine is module-scoped), the end-to-end tests one
        unit; a worker low on work gets the longest unit left."""

        def __init__(self, config: pytest.Config, log: Any) -> None:
            super().__init__(config, log)
            self.workqueue = _LongestFirst()

        def _split_scope(self, nodeid: str) -> str:
            return unit(nodeid)

    return ModuleScheduling(config, log)


def unit(nodeid: str) -> str:
    """The scheduling unit of a test: its module, or `tests/e2e` for an end-to-end test."""
    path = nodeid.split("::", 1)[0]
    return "tests/e2e" if path.startswith("tests/e2e/") else path


class _LongestFirst(dict[str, Any]):
    """xdist's queue of units (it takes one with `popitem(last=False)`), giving the longest."""

    def popitem(self, last: bool = True) -> tuple[str, Any]:  # type: ignore[override]
        longest = max(self, key=lambda name: SECONDS.get(name, UNLISTED))
        return longest, self.pop(longest)
