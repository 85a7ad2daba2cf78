"""The compile queue: a number of compiles at once over every runner and shim process of this
user, and one at a time per project, as flock files in the run dir; beside them, the runner's
note of each project's container.

flock, not a daemon: a process that dies (SIGKILL included) lets go of its locks with its
files, so there is nothing to recover.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from init import config
from init.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from typing import Any


class Queue:
    """flock files in the run dir, shared by every runner and shim process of this user."""

    def __init__(self, run_dir: Path, slots: int) -> None:
        self.run_dir = run_dir
        self.slots = slots

    def prepare(self) -> None:
        given = f"{config.COMPILE_RUN_DIR}={self.run_dir}"
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.run_dir)
        except OSError as e:
            raise ConfigError(
                [f"{given}: cannot make it ({e.strerror}); give a writable dir"]
            ) from e
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError([f"{given} is not a dir of this user; give a dir it owns"])

    @contextlib.contextmanager
    def turn(self, project: str) -> Iterator[None]:
        """Wait for the project's own turn, then for a free slot."""
        self.prepare()
        with self._lock(self.run_dir / f"project-{project}.lock", block=True):
            for slot in range(self.slots):
                lock = self._lock(self.run_dir / f"slot-{slot}.lock", block=False)
                try:
                    lock.__enter__()
                except BlockingIOError:
                    continue
                try:
                    yield
                finally:
                    lock.__exit__(None, None, None)
                return
            # All busy: queue on one (spread by pid), as flock wakes waiters in turn.
            with self._lock(self.run_dir / f"slot-{os.getpid() % self.slots}.lock", block=True):
                yield

    @staticmethod
    @contextlib.contextmanager
    def _lock(path: Path, block: bool) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)

    def record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"


def read_record(path: Path) -> dict[str, Any]:
    """The runner's note of a project's container (its expiry); {} when none or unreadable."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def write_record(path: Path, document: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)
