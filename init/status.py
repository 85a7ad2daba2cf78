"""The status as its readers see it: `sharelatex-init status`, the probes, the HTTP endpoint.

`read_all` reads the init's status document (init.core.status_file), tells whether its writer is
the init running now (not a document an earlier start left), and merges the TeX Live installer's
own file into its TeX Live part; `check` is the probes' verdict (healthy, ready) and
`format_text` the text a person reads. The parts are typed by their owners: EngineStatus
(init.engine.side), TexLiveStatus (init.texlive.contract).

What the document remembers is not enough for readiness: an engine stopped with SIGSTOP still
reads "ready" there until PID 1's next self-test. So `check ready`, once the document says
ready, asks the engine itself, at the socket the document names, whether it answers `/_ping`
within PING_TIMEOUT (init.engine.ready.ping: no SDK, a probe stays fast).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from init.core.backoff import SERVICE_RESTART
from init.core.component import Phase
from init.core.status_file import (
    Refusal,
    ServiceStatus,
    StatusDocument,
    pid_alive,
    read,
    read_refusals,
    refusals_path,
    status_path,
    texlive_status_path,
    writer_problem,
)
from init.engine import ready as engine_ready
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
    # Why the document is not the running init's word ("" when it is): read_all fills it in.
    stale: str = ""
    refusals: tuple[Refusal, ...] = ()  # what the engine proxy refused lately

    @property
    def recent_refusals(self) -> tuple[Refusal, ...]:
        """The refusals since this start of the init (older ones are another start's)."""
        return tuple(r for r in self.refusals if r.at >= self.document.started_at)

    @classmethod
    def of(
        cls,
        document: StatusDocument,
        installer: InstallerStatus | None = None,
        stale: str = "",
        refusals: tuple[Refusal, ...] = (),
    ) -> Status:
        texlive = TexLiveStatus.from_json(document.texlive)
        return cls(
            document,
            EngineStatus.from_json(document.engine),
            texlive.merged(installer) if texlive is not None else None,
            stale,
            refusals,
        )

    def to_json(self) -> dict[str, object]:
        merged = self.document.to_json()
        if self.texlive is not None:
            merged["texlive"] = self.texlive.to_json()
        if self.engine is not None:
            merged["proxy_refusals"] = [r.__dict__ for r in self.recent_refusals]
        return merged


def read_all(path: Path) -> Status:
    """The init's status with the installer's per-image status merged in (when it has one):
    what `status`, the probes and the HTTP endpoint show. OSError/ValueError if the init's own
    file cannot be read or is not a status document; an installer file not written yet is left
    out. `stale` says when the document is not the running init's (an earlier start's)."""
    document = read(path)
    stale = writer_problem(document)
    installer = None
    if document.texlive and not stale:
        installer = InstallerStatus.read(texlive_status_path(path))
    refusals = read_refusals(refusals_path(path)) if document.engine and not stale else ()
    return Status.of(document, installer, stale, refusals)


# "" when the engine at the socket answers now, else why not; PermissionError: cannot ask.
Ping = Callable[[Path], str]


def crash_looping(service: ServiceStatus, now: float) -> str:
    """Why a running service still counts as crash-looping, or "": it exited quickly before
    and has not yet run as long as the restart backoff forgives (10 s). Between two crashes a
    service is `starting` for a moment; a probe asked then must not say yes."""
    if service.state not in ("starting", "up") or service.quick_exits == 0:
        return ""
    up_for = now - service.since
    if up_for >= SERVICE_RESTART.reset_after:
        return ""
    return (
        f"{service.name} is restarting after {service.quick_exits} quick exits "
        f"(up {up_for:.1f} s of the {SERVICE_RESTART.reset_after:g} s that count as recovered)"
    )


def check(
    status: Status,
    what: str,
    alive: bool = True,
    ping: Ping = engine_ready.ping,
    now: float | None = None,
) -> tuple[bool, str]:
    """For probes: (passes, why). healthy: the init that wrote the status runs and every
    service started is up; ready: healthy, and compiles can run: the engine is ready by the
    document (PID 1's checks and self-tests) and answers `ping` now, when compiles are
    sandboxed. `alive`: whether the writer's pid runs (the caller's older question; `stale`,
    from read_all, is the sharper one)."""
    document = status.document
    if status.stale:
        return False, status.stale
    if not alive:
        return False, f"the init (pid {document.pid}) is not running"
    if document.phase not in ("starting", "running"):
        return False, f"the init is {document.phase}"
    for service in document.services:
        if service.state in ("backoff", "failed"):
            return False, f"{service.name} is {service.state}: {service.reason}"
        restarting = crash_looping(service, now if now is not None else time.time())
        if restarting:
            return False, restarting
    if what == "healthy":
        return True, f"the init is {document.phase}"
    engine = status.engine
    # A refused or failed engine waits for the operator, not for the boot: named at once,
    # before the boot has ended (a refusal during the boot's engine step was "still starting").
    held = engine is not None and engine.state in (Phase.REFUSED.value, Phase.FAILED.value)
    if document.phase != "running" and not held:
        return False, "the init is still starting"
    if engine is not None and not engine.ready:
        why = engine.reason or engine.state
        return False, f"compiles cannot run yet: the {engine.mode} engine is not ready ({why})"
    texlive = status.texlive
    if texlive is not None and not texlive.ready:
        return False, f"compiles cannot run yet: {texlive_not_ready(texlive)}"
    if engine is None:
        return True, "running (compiles not sandboxed)"
    # Last, so that every other answer stays instant: the one question that may wait.
    try:
        why = ping(Path(engine.socket)) if engine.socket.startswith("/") else ""
    except PermissionError:
        # A user outside the socket's group: the engine cannot be asked, PID 1's word stands.
        return True, f"compiles can run (the engine's socket {engine.socket} is not this user's)"
    if why:
        return False, f"compiles cannot run: the {engine.mode} engine {why}"
    return True, "compiles can run"


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
    if status.stale:
        lines.insert(0, f"init: not this start's word: {status.stale}")
    if document.message:
        lines.append(f"init: {document.message}")
    width = max((len(s.name) for s in document.services), default=0)
    for service in document.services:
        lines.append(f"{service.name:<{width}}  {_service_line(service, now)}")
    if not document.services:
        lines.append("(no services)")
    if status.engine is not None:
        lines.append(_engine_line(status.engine))
        refused = status.recent_refusals
        if refused:
            lines.append(
                f"proxy: refused {len(refused)} call(s) since the start; last: {refused[-1].line()}"
            )
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
    if engine.runtimes:
        parts.append(f"compiles under {engine.runtimes}")
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
