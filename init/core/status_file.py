"""The status file PID 1 keeps: where it is, its schema, written whole in one step.

`StatusDocument` is the one schema of `status.json`: PID 1 writes it (init.core.pid1), and every
reader (`sharelatex-init status`, the probes, the HTTP endpoint, `compile` run by hand, `doctor`)
reads it back with the same class (init.status). The engine's and the TeX Live installer's parts
are typed by their own packages (init.engine.side.EngineStatus, init.texlive.contract.
TexLiveStatus); here they travel as the JSON those classes write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init.config import STATUS_FILE_VARIABLE

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any

DEFAULT_STATUS_FILE = Path("/run/sharelatex-init/status.json")
TEXLIVE_STATUS_NAME = "texlive.json"  # beside the status file: the TeX Live installer's own


def status_path(environ: Mapping[str, str], given: Path | None = None) -> Path:
    """--status-file, else the variable, else the default."""
    if given is not None:
        return given
    return Path(environ.get(STATUS_FILE_VARIABLE) or DEFAULT_STATUS_FILE)


def texlive_status_path(status_file: Path) -> Path:
    """Where the TeX Live installer child keeps its per-image status (its Board)."""
    return status_file.with_name(TEXLIVE_STATUS_NAME)


@dataclass(frozen=True)
class LastExit:
    """How a service last ended, as the status file tells it."""

    code: int | None
    signal: int | None
    description: str
    at: float | None = None


@dataclass(frozen=True)
class ServiceStatus:
    """One service's entry (init.core.supervisor.Service.summary writes it)."""

    name: str
    state: str
    pid: int | None = None
    restarts: int = 0
    quick_exits: int = 0
    since: float = 0.0
    last_exit: LastExit | None = None
    reason: str = ""
    next_start_at: float | None = None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ServiceStatus:
        last = document.get("last_exit")
        return cls(
            name=str(document.get("name", "?")),
            state=str(document.get("state", "?")),
            pid=document.get("pid") if isinstance(document.get("pid"), int) else None,
            restarts=int(document.get("restarts") or 0),
            quick_exits=int(document.get("quick_exits") or 0),
            since=float(document.get("since") or 0.0),
            last_exit=_last_exit(last),
            reason=str(document.get("reason") or ""),
            next_start_at=document.get("next_start_at"),
        )

    def to_json(self) -> dict[str, Any]:
        last = self.last_exit
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "quick_exits": self.quick_exits,
            "since": self.since,
            "last_exit": None if last is None else dict(last.__dict__),
            "reason": self.reason,
            "next_start_at": self.next_start_at,
        }


def _last_exit(document: object) -> LastExit | None:
    if not isinstance(document, dict):
        return None
    return LastExit(
        document.get("code"),
        document.get("signal"),
        str(document.get("description", "")),
        document.get("at"),
    )


@dataclass(frozen=True)
class StatusDocument:
    """The whole status file."""

    pid: int
    phase: str  # starting, running, stopping, stopped
    started_at: float
    message: str = ""
    services: tuple[ServiceStatus, ...] = ()
    engine: Mapping[str, Any] | None = None  # EngineStatus.to_json()
    texlive: Mapping[str, Any] | None = None  # TexLiveStatus.to_json()
    compile_environment: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "phase": self.phase,
            "started_at": round(self.started_at, 3),
            "message": self.message,
            "services": [s.to_json() for s in self.services],
            "engine": None if self.engine is None else dict(self.engine),
            "texlive": None if self.texlive is None else dict(self.texlive),
            "compile_environment": dict(self.compile_environment),
        }

    @classmethod
    def from_json(cls, document: object) -> StatusDocument:
        """ValueError when it is not a status document at all."""
        if not isinstance(document, dict) or not isinstance(document.get("phase"), str):
            raise ValueError("not a sharelatex-init status document")
        services = document.get("services") or []
        if not isinstance(services, list) or not all(isinstance(s, dict) for s in services):
            raise ValueError("its services are not a list of entries")
        environment = document.get("compile_environment")
        engine, texlive = document.get("engine"), document.get("texlive")
        return cls(
            pid=document["pid"] if isinstance(document.get("pid"), int) else 0,
            phase=document["phase"],
            started_at=float(document.get("started_at") or 0.0),
            message=str(document.get("message") or ""),
            services=tuple(ServiceStatus.from_json(s) for s in services),
            engine=engine if isinstance(engine, dict) else None,
            texlive=texlive if isinstance(texlive, dict) else None,
            compile_environment={str(k): str(v) for k, v in environment.items()}
            if isinstance(environment, dict)
            else {},
        )


def write(path: Path, document: StatusDocument) -> None:
    """Replace the status file in one step, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(document.to_json(), indent=1, sort_keys=True).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        # A full or read-only dir: leave no half-written temporary file behind.
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """The file's JSON (OSError, ValueError)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read(path: Path) -> StatusDocument:
    """The init's own status document (OSError, ValueError: not there, not one)."""
    return StatusDocument.from_json(read_json(path))


def pid_alive(pid: object) -> bool:
    """Whether the init that wrote the status still runs (asked from inside its PID namespace)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
