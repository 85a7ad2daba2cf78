"""The TeX Live installer as PID 1 sees it: one of the init's own services, started once the
engine answers, never a library in PID 1.

The work is `python -m init.texlive.install` (the Docker SDK, in its own process): it makes every
compile image present, retrying by itself, and keeps its per-image status in a file beside the
init's (`status.texlive_status_path`). PID 1 only starts it (dind: when dockerd first answers;
sibling: at boot), restarts it with the services' backoff if it crashes, stops it first at
shutdown (a SIGTERM mid-pull leaves the finished layers for next time), and learns from its
exit that every image is there (0) or that one cannot be installed (1: the file says why).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from init.config import Settings
from init.core import status
from init.core.log import Log
from init.core.process import Exit
from init.core.services import ServiceSpec
from init.core.supervisor import Service, ServiceHooks

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any

SERVICE_NAME = "texlive"
EXIT_ALL_PRESENT = 0
EXIT_FAILED = 1  # an image cannot be installed (a wrong name, no source): not retried


class TexLiveJob(ServiceHooks):
    """The installer's state as the init's status shows it; the per-image detail is the child's."""

    def __init__(
        self,
        log: Log,
        settings: Settings,
        socket: str,
        status_file: Path,
        on_change: Callable[[], None] = lambda: None,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.log = log
        self.settings = settings
        self.socket = socket
        self.file = status.texlive_status_path(status_file)
        self.on_change = on_change
        self.on_done = on_done
        self.state = "waiting"  # for the engine; then installing, done, failed, stopped
        self.reason = "the engine is not ready yet"
        self.since = time.time()
        self.launched = False
        self.done_seconds: float | None = None
        self._started_at = 0.0
        # A file from an earlier run of the init would show images as present that the
        # engine may no longer hold; the child writes a fresh one as it starts.
        self.file.unlink(missing_ok=True)

    def spec(self) -> ServiceSpec:
        s = self.settings
        argv = [
            sys.executable, "-m", "init.texlive.install",
            "--socket", self.socket,
            "--status", str(self.file),
            "--images", ",".join(s.all_texlive_images),
            "--source", ",".join(s.texlive_sources),
            "--scheme", s.texlive_scheme,
        ]  # fmt: skip
        if s.texlive_base_image is not None:
            argv += ["--base-image", s.texlive_base_image]
        if s.tarball_dir is not None:
            argv += ["--tarball-dir", str(s.tarball_dir)]
        return ServiceSpec(
            name=SERVICE_NAME,
            directory=Path("/"),
            argv=tuple(argv),
            done_statuses=frozenset({EXIT_ALL_PRESENT, EXIT_FAILED}),
        )

    # -- hooks around each start of the installer ----------------------------------------

    def started(self, service: Service) -> None:
        self.launched = True
        if self._started_at == 0.0:
            self._started_at = time.monotonic()
        self._set("installing", "")

    def exited(self, service: Service, exit_: Exit) -> None:
        if exit_.code == EXIT_ALL_PRESENT:
            self.done_seconds = round(time.monotonic() - self._started_at, 3)
            self._set("done", "")
            self.log.info(SERVICE_NAME, f"every compile image is present ({self.done_seconds} s)")
            self.on_done()
        elif exit_.code == EXIT_FAILED:
            self._set("failed", self._failure())
            self.log.error(SERVICE_NAME, f"compiles cannot run: {self.reason}")
        elif self.state != "stopped":
            self._set("installing", f"installer {exit_.describe()}; restarting it")

    def mark_stopped(self) -> None:
        if self.state != "done":
            self._set("stopped", "")

    def _failure(self) -> str:
        try:
            document = status.read(self.file)
        except (OSError, ValueError):
            return "the installer failed without a status file"
        failed = [i for i in document.get("images", []) if i.get("state") == "failed"]
        return "; ".join(f"{i['image']}: {i.get('reason', '')}" for i in failed) or "failed"

    def _set(self, state: str, reason: str) -> None:
        self.state = state
        self.reason = reason
        self.since = time.time()
        self.on_change()

    def summary(self) -> dict[str, Any]:
        """The job's part of the init's status; `status.read_all` adds the child's file to it
        (its "ready" and per-image entries win over the ones here)."""
        return {
            "state": self.state,
            "ready": self.state == "done",
            "reason": self.reason,
            "default": self.settings.texlive_image,
            "images": [{"image": i, "state": "waiting"} for i in self.settings.all_texlive_images],
            "status_file": str(self.file),
            "since": round(self.since, 3),
            "done_seconds": self.done_seconds,
        }
