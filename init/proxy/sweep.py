"""Compile containers removed once they are idle or past their expiry, while the site runs.

A runner that keeps its containers (Server Pro's DockerRunner.js leaves each `project-*`
container stopped after its compile, to start it again for the next compile of the same
project, and removes it only an hour or two after it was created: services/clsi/app/js/
DockerRunner.js at overleaf/overleaf f461dcc9) would leave them on the engine for hours, and
across restarts of the site. Every container created through the proxy carries the compile
label and an expiry (create.py); here the proxy removes, every `every` seconds:

  - a stopped one idle (since it ended) for longer than OVERLEAF_INIT_COMPILE_IDLE, or past its
    expiry; one never started for longer than that (and at least CREATED_PATIENCE);
  - a running one past its expiry by more than the kill grace (its runner lost track of it).

A stopped one is also retired when its runner asks for it (`inspect`) with half its idle time
spent or too little life left for another compile (`retire_on_inspect`): the proxy removes it
and answers 404, so the runner creates a fresh one. Reuse then never races the sweep (which
waits the whole idle time), and a container is never restarted to outlive its expiry.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from init.compiles.settings import KILL_GRACE
from init.engine import client
from init.engine.client import COMPILE_LABEL, EXPIRES_LABEL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CREATED_PATIENCE = 60.0  # seconds a container may stay created: a runner between create and start
LOOKUP_TIMEOUT = 10.0
RUNNING = frozenset({"running", "paused", "restarting"})
STOPPED = frozenset({"exited", "dead"})


@dataclass(frozen=True)
class Rules:
    """When a compile container is due (seconds)."""

    idle: float  # a stopped one waits this long for its next compile
    reuse: float  # a stopped one is started again only with this much life left
    grace: float = KILL_GRACE

    @property
    def every(self) -> float:
        """How often to look: often enough that nothing outlives its idle time by much."""
        return max(1.0, min(30.0, self.idle / 2))


@dataclass(frozen=True)
class Seen:
    """What the rules need of one container (from the engine's list or inspect)."""

    id: str
    state: str
    created: float  # epoch seconds
    finished: float | None = None  # when it last ended; None: never, or not known
    expires: float | None = None

    @classmethod
    def from_list(cls, document: dict[str, Any]) -> Seen:
        labels = document.get("Labels") or {}
        return cls(
            id=str(document.get("Id", "")),
            state=str(document.get("State", "")),
            created=float(document.get("Created") or 0),
            expires=_number(labels.get(EXPIRES_LABEL)),
        )

    @classmethod
    def from_inspect(cls, document: dict[str, Any]) -> Seen:
        state = document.get("State") or {}
        labels = (document.get("Config") or {}).get("Labels") or {}
        return cls(
            id=str(document.get("Id", "")),
            state=str(state.get("Status", "")),
            created=parse_time(str(document.get("Created", ""))) or 0.0,
            finished=parse_time(str(state.get("FinishedAt", ""))),
            expires=_number(labels.get(EXPIRES_LABEL)),
        )

    @property
    def ended(self) -> float:
        """When it went idle: its end, else (never started) its creation."""
        return self.finished if self.finished is not None else self.created


def due(seen: Seen, now: float, rules: Rules) -> str | None:
    """Why `seen` should go now, or None."""
    expired = seen.expires is not None and now > seen.expires
    if seen.state in RUNNING:
        if seen.expires is not None and now > seen.expires + rules.grace:
            return "running past its expiry"
        return None
    if seen.state == "created":
        if now - seen.created > max(rules.idle, CREATED_PATIENCE):
            return "never started"
        return None
    if seen.state in STOPPED:
        if expired:
            return "past its expiry"
        if now - seen.ended > rules.idle:
            return "idle"
    return None


def retire_on_inspect(seen: Seen, now: float, rules: Rules) -> bool:
    """Whether a stopped container its runner asks for should rather be replaced (see above)."""
    if seen.state not in STOPPED:
        return False
    short_lived = seen.expires is not None and seen.expires - now < rules.reuse
    return short_lived or now - seen.ended > rules.idle / 2


def parse_time(text: str) -> float | None:
    """The engine's RFC 3339 time (nanoseconds, `Z`) as epoch seconds; None for Go's zero."""
    if not text or text.startswith("0001-"):
        return None
    head, dot, rest = text.partition(".")
    zone = rest.lstrip("0123456789") if dot else ""
    if not dot:
        head, zone = text[:19], text[19:]
    fraction = rest[: len(rest) - len(zone)][:6] if dot else ""
    try:
        stamp = datetime.fromisoformat(head + (f".{fraction}" if fraction else "") + zone)
    except ValueError:
        return None
    return stamp.timestamp()


def _number(value: object) -> float | None:
    try:
        return float(str(value)) if value is not None else None
    except ValueError:
        return None


# -- against the engine ---------------------------------------------------------------------


def call(engine: Path, method: str, target: str) -> tuple[int, Any]:
    """One request to the raw engine socket: (status, decoded body or None). OSError when it
    does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(LOOKUP_TIMEOUT)
        sock.connect(str(engine))
        answer = client.request(sock, method, target)
        raw = answer.body()
    try:
        return answer.status, json.loads(raw) if raw else None
    except ValueError:
        return answer.status, None


def remove(engine: Path, container_id: str, force: bool) -> bool:
    """Remove it; whether it is gone (a 404 too). Without `force` a running one stays."""
    query = f"?force={'1' if force else '0'}&v=1"
    status, _ = call(engine, "DELETE", f"/containers/{container_id}{query}")
    return status in (204, 404)


def sweep_once(engine: Path, rules: Rules, now: float) -> list[tuple[str, str]]:
    """Remove every compile container due; (short id, why) of each removed."""
    filters = json.dumps({"label": [COMPILE_LABEL]}).replace(" ", "")
    status, listed = call(engine, "GET", f"/containers/json?all=1&filters={_quote(filters)}")
    if status != 200 or not isinstance(listed, list):
        return []
    removed = []
    for item in listed:
        if not isinstance(item, dict) or (item.get("Labels") or {}).get(COMPILE_LABEL) != "1":
            continue
        seen = Seen.from_list(item)
        if seen.state in STOPPED:  # when it ended is only in its inspect
            status, document = call(engine, "GET", f"/containers/{seen.id}/json")
            if status != 200 or not isinstance(document, dict):
                continue
            seen = Seen.from_inspect(document)
        why = due(seen, now, rules)
        if why is not None and remove(engine, seen.id, force=seen.state in RUNNING):
            removed.append((seen.id[:12], why))
    return removed


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


class Sweeper:
    """`sweep_once` every `rules.every` seconds in a thread of its own, from the start (what an
    earlier run of the site left goes first), until `stop`."""

    def __init__(
        self,
        engine: Path,
        rules: Rules,
        report: Callable[[list[tuple[str, str]]], None],
        fail: Callable[[str], None],
        clock: Callable[[], float],
    ) -> None:
        self.engine = engine
        self.rules = rules
        self.report = report
        self.fail = fail
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proxy-sweep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LOOKUP_TIMEOUT)

    def _run(self) -> None:
        answered = failing = False
        while not self._stop.is_set():
            try:
                removed = sweep_once(self.engine, self.rules, self.clock())
            except (OSError, ValueError) as e:  # no engine, or an answer it could not read
                # Said once an outage; not before the engine first answered (docker-in-docker:
                # the proxy starts while dockerd is still coming up).
                if answered and not failing:
                    self.fail(f"cannot sweep the compile containers: {e}")
                failing = True
            else:
                answered, failing = True, False
                if removed:
                    self.report(removed)
            self._stop.wait(self.rules.every)
