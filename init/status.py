"""The status as its readers see it: `sharelatex-init status`, the probes, the HTTP endpoint.

`read_all` reads the init's status document (init.core.status_file) and merges the TeX Live
installer's own file into its TeX Live part; `check` is the probes' verdict (healthy, ready) and
`format_text` the text a person reads. The parts are typed by their owners: EngineStatus
(init.engine.side), TexLiveStatus (init.texlive.contract).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from init.core.status_file import (
    ServiceStatus,
    StatusDocument,
    pid_alive,
    read,
    status_path,
    texlive_status_path,
)
from init.engine.side import EngineStatus
from init.texlive import progress
from init.texlive.contract import ImageState, InstallerStatus, TexLiveStatus

__all__ = ["CHECKS", "Status", "check", "format_text", "pid_alive", "read_all", "status_path"]

CHECKS = ("healthy", "ready")


@dataclass(frozen=True)
class Status:
    """The init's document with its engine and TeX Live parts typed (and the installer's file
    merged into the latter)."""

    document: StatusDocument
    engine: EngineStatus | None
    texlive: TexLiveStatus | None

    @classmethod
    def of(cls, document: StatusDocument, installer: InstallerStatus | None = None) -> Status:
        texlive = TexLiveStatus.from_json(document.texlive)
        return cls(
            document,
            EngineStatus.from_json(document.engine),
            texlive.merged(installer) if texlive is not None else None,
        )

    def to_json(self) -> dict[str, object]:
        merged = self.document.to_json()
        if self.texlive is not None:
            merged["texlive"] = self.texlive.to_json()
        return merged


def read_all(path: Path) -> Status:
    """The init's status with the installer's per-image status merged in (when it has one):
    what `status`, the probes and the HTTP endpoint show. OSError/ValueError if the init's own
    file cannot be read or is not a status document; an installer file not written yet is left
    out."""
    document = read(path)
    installer = InstallerStatus.read(texlive_status_path(path)) if document.texlive else None
    return Status.of(document, installer)


def check(status: Status, what: str, alive: bool = True) -> tuple[bool, str]:
    """For probes: (passes, why). healthy: the init runs and every service started is up;
    ready: healthy, and compiles can run (the engine answers, when compiles are sandboxed)."""
    document = status.document
    if not alive:
        return False, f"the init (pid {document.pid}) is not running"
    if document.phase not in ("starting", "running"):
        return False, f"the init is {document.phase}"
    for service in document.services:
        if service.state in ("backoff", "failed"):
            return False, f"{service.name} is {service.state}: {service.reason}"
    if what == "healthy":
        return True, f"the init is {document.phase}"
    if document.phase != "running":
        return False, "the init is still starting"
    engine = status.engine
    if engine is not None and not engine.ready:
        why = engine.reason or engine.state
        return False, f"compiles cannot run yet: the {engine.mode} engine is not ready ({why})"
    texlive = status.texlive
    if texlive is not None and not texlive.ready:
        return False, f"compiles cannot run yet: {texlive_not_ready(texlive)}"
    return True, "compiles can run" if engine is not None else "running (compiles not sandboxed)"


def texlive_not_ready(texlive: TexLiveStatus) -> str:
    """Why the default compile image cannot be used yet."""
    entry = texlive.entry(texlive.default)
    if texlive.state == "failed" and (entry is None or entry.state != ImageState.FAILED.value):
        return f"the TeX Live installer failed: {texlive.reason}"
    return progress.still_installing(texlive.default, entry)


def format_text(status: Status, now: float | None = None) -> str:
    """The status as a person reads it: the init's phase, then one line per service."""
    now = time.time() if now is None else now
    document = status.document
    started = document.started_at or now
    lines = [f"init: {document.phase}, pid {document.pid}, up {_duration(now - started)}"]
    if document.message:
        lines.append(f"init: {document.message}")
    width = max((len(s.name) for s in document.services), default=0)
    for service in document.services:
        lines.append(f"{service.name:<{width}}  {_service_line(service, now)}")
    if not document.services:
        lines.append("(no services)")
    if status.engine is not None:
        lines.append(_engine_line(status.engine))
    texlive = status.texlive
    if texlive is not None:
        width = max((len(i.image) for i in texlive.images), default=0)
        for entry in texlive.images:
            default = " (default)" if entry.image == texlive.default else ""
            lines.append(f"texlive: {entry.image:<{width}}  {progress.image_line(entry)}{default}")
        if texlive.state == "failed" and texlive.reason:
            lines.append(f"texlive: {texlive.reason}")
    return "\n".join(lines)


def _engine_line(engine: EngineStatus) -> str:
    parts = [f"engine: {engine.mode} {engine.state}"]
    if engine.driver:
        parts.append(f"storage driver {engine.driver}")
    if engine.host_dir_compiles:
        parts.append(f"host compile dir {engine.host_dir_compiles}")
    if engine.reason:
        parts.append(engine.reason)
    if engine.fix:
        parts.append(f"fix: {engine.fix}")
    return ", ".join(parts)


def _service_line(service: ServiceStatus, now: float) -> str:
    state = service.state
    parts = [state]
    if service.pid:
        parts.append(f"pid {service.pid}")
    if state in ("up", "starting"):
        parts.append(f"for {_duration(now - service.since)}")
    if service.restarts:
        parts.append(f"{service.restarts} restarts")
    if service.quick_exits >= 3 and state in ("backoff", "failed"):
        parts.append("crash loop")
    if service.next_start_at and state in ("backoff", "failed"):
        parts.append(f"next start in {_duration(max(0.0, service.next_start_at - now))}")
    if service.last_exit is not None:
        parts.append(f"last {service.last_exit.description}")
    if service.reason and state == "failed":
        parts.append(service.reason)
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
