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
from init.core import status_file as status
from init.core.component import Component, Phase
from init.core.log import Log
from init.core.process import Exit
from init.core.services import ServiceSpec
from init.core.supervisor import Service
from init.engine.side import Installer
from init.texlive.contract import (
    MODULE,
    ImageState,
    ImageStatus,
    InstallerStatus,
    InstallRequest,
    TexLiveStatus,
)

SERVICE_NAME = "texlive"
EXIT_ALL_PRESENT = 0
EXIT_FAILED = 1  # an image cannot be installed (a wrong name, no source): not retried


class TexLiveJob(Installer):
    """The installer's state as the init's status shows it; the per-image detail is the child's."""

    def __init__(
        self,
        log: Log,
        settings: Settings,
        status_file: Path,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.log = log
        self.settings = settings
        self.socket = ""
        self.file = status.texlive_status_path(status_file)
        self.on_done: Callable[[], None] = lambda: None
        self.state = Component(Phase.WAITING, "the engine is not ready yet", on_change)
        self.launched = False
        self.done_seconds: float | None = None
        self._started_at = 0.0
        # A file from an earlier run of the init would show images as present that the
        # engine may no longer hold; the child writes a fresh one as it starts.
        self.file.unlink(missing_ok=True)

    def use_socket(self, socket: str) -> None:
        self.socket = socket

    def request(self) -> InstallRequest:
        s = self.settings
        return InstallRequest(
            socket=Path(self.socket),
            status=self.file,
            images=s.all_texlive_images,
            sources=s.texlive_sources,
            scheme=s.texlive_scheme,
            base_image=s.texlive_base_image or "",
            tarball_dir=s.tarball_dir,
        )

    def spec(self) -> ServiceSpec:
        return ServiceSpec(
            name=SERVICE_NAME,
            directory=Path("/"),
            argv=(sys.executable, "-m", MODULE, *self.request().argv()),
            done_statuses=frozenset({EXIT_ALL_PRESENT, EXIT_FAILED}),
        )

    # -- hooks around each start of the installer ----------------------------------------

    def started(self, service: Service) -> None:
        self.launched = True
        if self._started_at == 0.0:
            self._started_at = time.monotonic()
        self.state.set(Phase.INSTALLING)

    def exited(self, service: Service, exit_: Exit) -> None:
        if exit_.code == EXIT_ALL_PRESENT:
            self.done_seconds = round(time.monotonic() - self._started_at, 3)
            self.state.set(Phase.DONE)
            self.log.info(SERVICE_NAME, f"every compile image is present ({self.done_seconds} s)")
            self.on_done()
        elif exit_.code == EXIT_FAILED:
            self.state.set(Phase.FAILED, self._failure())
            self.log.error(SERVICE_NAME, f"compiles cannot run: {self.state.reason}")
        elif not self.state.is_(Phase.STOPPED):
            self.state.set(Phase.INSTALLING, f"installer {exit_.describe()}; restarting it")

    def mark_stopped(self) -> None:
        if not self.state.is_(Phase.DONE):
            self.state.set(Phase.STOPPED)

    def _failure(self) -> str:
        installer = InstallerStatus.read(self.file)
        if installer is None:
            return "the installer failed without a status file"
        failed = [i for i in installer.images if i.state == ImageState.FAILED.value]
        return "; ".join(f"{i.image}: {i.reason}" for i in failed) or "failed"

    def status(self) -> dict[str, object]:
        """The job's part of the init's status; readers merge the child's file into it
        (`TexLiveStatus.merged`: its readiness and per-image entries win)."""
        waiting = ImageState.WAITING.value
        return TexLiveStatus(
            state=self.state.phase.value,
            default=self.settings.texlive_image,
            images=tuple(ImageStatus(i, waiting) for i in self.settings.all_texlive_images),
            ready=self.state.is_(Phase.DONE),
            reason=self.state.reason,
            since=round(self.state.since, 3),
            status_file=str(self.file),
            done_seconds=self.done_seconds,
        ).to_json()
