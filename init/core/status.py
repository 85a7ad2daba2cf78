"""The status file PID 1 keeps (atomic replace) and `sharelatex-init status` reads."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any

DEFAULT_STATUS_FILE = Path("/run/sharelatex-init/status.json")
STATUS_FILE_VARIABLE = "SHARELATEX_INIT_STATUS_FILE"
TEXLIVE_STATUS_NAME = "texlive.json"  # beside the status file: the TeX Live installer's own


def status_path(environ: Mapping[str, str], given: Path | None = None) -> Path:
    """--status-file, else $SHARELATEX_INIT_STATUS_FILE, else the default."""
    if given is not None:
        return given
    return Path(environ.get(STATUS_FILE_VARIABLE) or DEFAULT_STATUS_FILE)


def texlive_status_path(status_file: Path) -> Path:
    """Where the TeX Live installer child keeps its per-image status (init.texlive.install's Board)."""
    return status_file.with_name(TEXLIVE_STATUS_NAME)


def write(path: Path, document: Mapping[str, Any]) -> None:
    """Replace the status file in one step, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        document: dict[str, Any] = json.load(f)
    return document


def read_all(path: Path) -> dict[str, Any]:
    """The init's status with the installer's per-image status under "texlive" (when it has
    one): what `status`, the probes and the HTTP endpoint show. OSError/ValueError if the init's
    own file cannot be read; an installer file not written yet is simply left out."""
    document = read(path)
    texlive = document.get("texlive")
    if isinstance(texlive, dict):
        try:
            texlive.update(read(texlive_status_path(path)))
        except (OSError, ValueError):
            pass
    return document


def pid_alive(pid: object) -> bool:
    """Whether the init that wrote the status still runs (asked from inside its PID namespace)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


CHECKS = ("healthy", "ready")


def check(document: Mapping[str, Any], what: str, pid_alive: bool = True) -> tuple[bool, str]:
    """For probes: (passes, why). healthy: the init runs and every service started is up;
    ready: healthy, and compiles can run (the engine answers, when compiles are sandboxed)."""
    if not pid_alive:
        return False, f"the init (pid {document.get('pid')}) is not running"
    phase = document.get("phase")
    if phase not in ("starting", "running"):
        return False, f"the init is {phase}"
    for service in document.get("services", []):
        if service["state"] in ("backoff", "failed"):
            return False, f"{service['name']} is {service['state']}: {service.get('reason', '')}"
    if what == "healthy":
        return True, f"the init is {phase}"
    if phase != "running":
        return False, "the init is still starting"
    engine = document.get("engine")
    if engine is not None and not engine.get("ready"):
        why = engine.get("reason") or engine.get("state")
        return (
            False,
            f"compiles cannot run yet: the {engine.get('mode')} engine is not ready ({why})",
        )
    texlive = document.get("texlive")
    if texlive is not None and not texlive.get("ready"):
        return False, f"compiles cannot run yet: {texlive_not_ready(texlive)}"
    return True, "compiles can run" if engine is not None else "running (compiles not sandboxed)"


def texlive_not_ready(texlive: Mapping[str, Any]) -> str:
    """Why the default compile image cannot be used yet, from the merged "texlive" part."""
    from init.texlive import progress

    default = texlive.get("default", "?")
    entries = [i for i in texlive.get("images", []) if i.get("image") == default]
    entry: Mapping[str, Any] = entries[0] if entries else {}
    if texlive.get("state") == "failed" and entry.get("state") != "failed":
        return f"the TeX Live installer failed: {texlive.get('reason', '')}"
    return progress.still_installing(default, entry)


def format_text(document: Mapping[str, Any], now: float | None = None) -> str:
    """The status as a person reads it: the init's phase, then one line per service."""
    now = time.time() if now is None else now
    lines = [
        f"init: {document.get('phase', '?')}, pid {document.get('pid', '?')}, "
        f"up {_duration(now - float(document.get('started_at', now)))}"
    ]
    if document.get("message"):
        lines.append(f"init: {document['message']}")
    services = document.get("services", [])
    width = max((len(s["name"]) for s in services), default=0)
    for service in services:
        lines.append(f"{service['name']:<{width}}  {_service_line(service, now)}")
    if not services:
        lines.append("(no services)")
    engine = document.get("engine")
    if engine:
        lines.append(_engine_line(engine))
    texlive = document.get("texlive")
    if texlive:
        from init.texlive import progress

        images = texlive.get("images", [])
        width = max((len(i["image"]) for i in images), default=0)
        for entry in images:
            default = " (default)" if entry["image"] == texlive.get("default") else ""
            lines.append(
                f"texlive: {entry['image']:<{width}}  {progress.image_line(entry)}{default}"
            )
        if texlive.get("state") == "failed" and texlive.get("reason"):
            lines.append(f"texlive: {texlive['reason']}")
    return "\n".join(lines)


def _engine_line(engine: Mapping[str, Any]) -> str:
    parts = [f"engine: {engine.get('mode')} {engine.get('state')}"]
    if engine.get("driver"):
        parts.append(f"storage driver {engine['driver']}")
    if engine.get("host_dir_compiles"):
        parts.append(f"host compile dir {engine['host_dir_compiles']}")
    if engine.get("reason"):
        parts.append(str(engine["reason"]))
    if engine.get("fix"):
        parts.append(f"fix: {engine['fix']}")
    return ", ".join(parts)


def _service_line(service: Mapping[str, Any], now: float) -> str:
    state = service["state"]
    parts = [state]
    if service.get("pid"):
        parts.append(f"pid {service['pid']}")
    if state in ("up", "starting"):
        parts.append(f"for {_duration(now - float(service['since']))}")
    if service.get("restarts"):
        parts.append(f"{service['restarts']} restarts")
    if service.get("quick_exits", 0) >= 3 and state in ("backoff", "failed"):
        parts.append("crash loop")
    if service.get("next_start_at") and state in ("backoff", "failed"):
        parts.append(f"next start in {_duration(max(0.0, service['next_start_at'] - now))}")
    last = service.get("last_exit")
    if last:
        parts.append(f"last {last['description']}")
    if service.get("reason") and state == "failed":
        parts.append(service["reason"])
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
