"""What the policy decides about one request: forward it (as rewritten), or refuse it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

PREFIX = "sharelatex-init proxy"


class Refused(Exception):
    """A request the proxy will not forward: the status and the one-line reason the caller gets
    (`{"message": "sharelatex-init proxy: <reason>"}`)."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def message(self) -> str:
        return f"{PREFIX}: {self.reason}"


class Answer(enum.Enum):
    """What becomes of the engine's answer before the caller sees it."""

    PASS = "pass"  # as the engine sent it, streamed (attach, logs, wait included)
    TRIM_INFO = "trim-info"  # /info: only what a runner needs, nothing of the host
    FILTER_IMAGES = "filter-images"  # /images/json: the allowed images only
    FILTER_CONTAINERS = "filter-containers"  # /containers/json: compile containers only
    REMEMBER_CONTAINER = "remember-container"  # create: its id is a compile container's
    REMEMBER_EXEC = "remember-exec"  # exec create: its id is an exec in a compile container
    # inspect: a stopped compile container too old to start again is removed and reported
    # missing, so that its runner creates a fresh one (sweep.retire_on_inspect)
    RETIRE_STALE = "retire-stale"


@dataclass(frozen=True)
class Forward:
    """Send `method target` with `body` (None: no body) to the engine. `stream`: the engine
    may hijack the connection for this call (attach, exec start): its answer is spliced both
    ways; `upgrade`: the caller asked for that with `Upgrade: tcp`, passed on."""

    method: str
    target: str
    body: bytes | None = None
    answer: Answer = Answer.PASS
    stream: bool = False
    upgrade: bool = False
    rewritten: tuple[str, ...] = ()  # what was changed, for the debug log


class Missing(Refused):
    """The object named does not exist: the engine's own 404 answer, given by the proxy (the
    caller's runner acts on it: Server Pro's creates the container it did not find)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 404)

    def message(self) -> str:
        return self.reason
