"""The state of one part of the init the status shows (the engine, the TeX Live installer).

Each such part moves through a few states, says why it is where it is, since when, and how to
fix it when it cannot go on. `Component` holds that once, for all of them; what each part adds
(the storage driver, the host dirs) it reports beside it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any


class Phase(enum.Enum):
    """Where a part of the init is. Not every part uses every phase."""

    WAITING = "waiting"  # for something else first (the installer waits for the engine)
    CHECKING = "checking"  # being checked (the host's engine at boot)
    STARTING = "starting"  # started, not yet answering
    INSTALLING = "installing"
    READY = "ready"
    DONE = "done"  # finished its job (the installer: every image present)
    DOWN = "down"  # ended; being restarted
    FAILED = "failed"  # cannot go on by itself; `reason` says why
    REFUSED = "refused"  # will not run as configured; `fix` says what to change
    STOPPED = "stopped"  # the init is shutting down


class Component:
    """One part's phase, reason, fix and since; every change calls `on_change` (the status)."""

    def __init__(
        self,
        phase: Phase,
        reason: str = "",
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.phase = phase
        self.reason = reason
        self.fix = ""
        self.clock = clock
        self.since = clock()
        self.on_change = on_change

    def set(self, phase: Phase, reason: str = "", fix: str = "") -> None:
        self.phase = phase
        self.reason = reason
        self.fix = fix
        self.since = self.clock()
        self.on_change()

    def is_(self, *phases: Phase) -> bool:
        return self.phase in phases

    def summary(self) -> dict[str, Any]:
        """The common part of a component's entry in the status document."""
        return {
            "state": self.phase.value,
            "reason": self.reason,
            "fix": self.fix,
            "since": round(self.since, 3),
        }
