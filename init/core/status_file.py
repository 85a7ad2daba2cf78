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
# What else an earlier start of the init leaves beside the status file: the installer's status
# and the helper children's results (init.engine.dind, init.engine.host). The status dir is on
# the container's own layer, which a restart keeps: a new start clears them before its first
# status is written, so that nothing of the last boot is read as this one's.
EARLIER_FILES = (
    TEXLIVE_STATUS_NAME, "engine-check.json", "engine-self-test.json",
    "sibling-check.json", "sibling-proof.json",
)  # fmt: skip
PROC = Path("/proc")


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
class Boot:
    """Which start of the init wrote a document. A container restarted keeps its status dir
    and its new PID 1 has the same pid 1: what tells the two apart is the process's start time
    (clock ticks after the kernel booted, /proc/<pid>/stat field 22), its PID namespace (a new
    one each container start) and the kernel's boot id (the ticks start again at a reboot)."""

    pid: int
    start_time: int
    pid_namespace: int  # the inode of /proc/<pid>/ns/pid
    kernel_boot_id: str

    @classmethod
    def current(cls, proc: Path = PROC) -> Boot | None:
        """This process: what PID 1 writes into its document (None without a /proc)."""
        start_time = start_time_of(proc / "self")
        if start_time is None:
            return None
        return cls(os.getpid(), start_time, _namespace(proc / "self"), _kernel_boot_id(proc))

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, document: object) -> Boot | None:
        if not isinstance(document, dict):
            return None
        pid, start, namespace = (document.get(k) for k in ("pid", "start_time", "pid_namespace"))
        if not all(isinstance(v, int) for v in (pid, start, namespace)):
            return None
        return cls(pid, start, namespace, str(document.get("kernel_boot_id") or ""))  # type: ignore[arg-type]


def start_time_of(process: Path) -> int | None:
    """Field 22 of `process`/stat (/proc/<pid>): when it started, in clock ticks after the
    kernel booted; None when there is no such process."""
    try:
        stat = (process / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses: count
    # the fields after the last ")". starttime is field 22, the 20th after it.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _namespace(process: Path) -> int:
    """The inode of `process`'s PID namespace; 0 when it cannot be read (another user's)."""
    try:
        return os.stat(process / "ns" / "pid").st_ino
    except OSError:
        return 0


def _kernel_boot_id(proc: Path) -> str:
    try:
        return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class StatusDocument:
    """The whole status file."""

    pid: int
    phase: str  # starting, running, stopping, stopped
    started_at: float
    message: str = ""
    boot: Boot | None = None  # which start of the init wrote it (None: an older init)
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
            "boot": None if self.boot is None else self.boot.to_json(),
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
            boot=Boot.from_json(document.get("boot")),
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
            # A nearly full disk takes part of a write without an error: write the rest, so that
            # the full one fails (ENOSPC) rather than a truncated file replacing the status.
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        # A full or read-only dir: leave no half-written temporary file behind. (A dir made
        # read-only after the file was made keeps it: the next write under the same name
        # replaces it, and clear_earlier removes any other.)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def clear_earlier(path: Path) -> list[Path]:
    """Remove what an earlier start of the init left beside the status file `path` (its
    installer's status, its children's results, temporary files of a write cut short); what was
    removed. The status file itself stays until this start's first document replaces it: a
    reader refuses it meanwhile (`writer_problem`)."""
    directory = path.parent
    try:
        found = [directory / name for name in EARLIER_FILES]
        found += [p for p in directory.glob(".*.tmp") if p.name.startswith(f".{path.name}.")]
    except OSError:
        return []
    removed = []
    for leftover in found:
        try:
            leftover.unlink()
        except OSError:
            continue
        removed.append(leftover)
    return removed


def read_json(path: Path) -> Any:
    """The file's JSON (OSError, ValueError)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read(path: Path) -> StatusDocument:
    """The init's own status document (OSError, ValueError: not there, not one)."""
    return StatusDocument.from_json(read_json(path))


def writer_problem(document: StatusDocument, proc: Path = PROC) -> str:
    """Why `document` is not the word of the init running now ("" when it is): its writer is
    not running, or it is from an earlier start of the init (a restarted container's status dir
    keeps the last start's file until the new init writes its own). A reader in the init's PID
    namespace (`docker exec`, a HEALTHCHECK, the HTTP endpoint) reads the writer's start time
    at its pid; one outside (root on the host) finds the process by its namespace. A document
    naming no boot (an older init, one written by hand) is taken on its pid alone."""
    boot = document.boot
    if boot is None:
        return "" if pid_alive(document.pid) else f"the init (pid {document.pid}) is not running"
    if boot.kernel_boot_id and boot.kernel_boot_id != _kernel_boot_id(proc):
        return "the status is from an earlier start of the init, before the machine restarted"
    if _namespace(proc / "self") == boot.pid_namespace:
        start_time = start_time_of(proc / str(boot.pid))
    else:
        start_time = _start_time_in_namespace(boot, proc)
    if start_time is None:
        return (
            f"the init that wrote the status (pid {boot.pid}) is not running: the status is from "
            "an earlier start of the init, or the init has stopped"
        )
    if start_time != boot.start_time:
        return (
            f"the status is from an earlier start of the init (pid {boot.pid} is another "
            "process now); the init running now has not written its own yet"
        )
    return ""


def _start_time_in_namespace(boot: Boot, proc: Path) -> int | None:
    """The start time of the process that is pid `boot.pid` inside PID namespace
    `boot.pid_namespace`, seen from outside it (the last entry of its NSpid is its pid there)."""
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        if _namespace(proc / entry) != boot.pid_namespace:
            continue
        try:
            nspid = _nspid(proc / entry / "status")
        except OSError:
            continue
        if nspid == boot.pid:
            return start_time_of(proc / entry)
    return None


def _nspid(status: Path) -> int | None:
    for line in status.read_text().splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[-1]) if fields and fields[-1].isdigit() else None
    return None


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


# -- what the engine proxy refused lately (written by init.proxy, shown by status and doctor) --

REFUSALS_NAME = "proxy-refusals.json"  # beside the status file
REFUSALS_KEPT = 20


def refusals_path(status_file: Path) -> Path:
    return status_file.with_name(REFUSALS_NAME)


@dataclass(frozen=True)
class Refusal:
    """One call the engine proxy refused: when, whose (the caller's uid), what, and why."""

    at: float
    uid: int
    what: str
    reason: str
    repeats: int = 0  # the same refusal of the same uid since, counted not logged

    def line(self) -> str:
        more = f" (and {self.repeats} more like it)" if self.repeats else ""
        return f"uid {self.uid}: {self.what}: {self.reason}{more}"


def write_refusals(path: Path, refusals: tuple[Refusal, ...]) -> None:
    """The last refusals, replaced whole (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps([r.__dict__ for r in refusals[-REFUSALS_KEPT:]]))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def read_refusals(path: Path) -> tuple[Refusal, ...]:
    """The proxy's last refusals; none when it has refused nothing (or the file is not one)."""
    try:
        entries = json.loads(path.read_text())
        return tuple(
            Refusal(float(e["at"]), int(e["uid"]), str(e["what"]), str(e["reason"]),
                    int(e.get("repeats", 0)))
            for e in entries
        )  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError):
        return ()
