"""The verdict every preflight and `doctor` check returns: a status, what was found, the fix."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


# Padded to one width so a column of checks lines up; upper case where the operator must look.
_LABELS = {Status.OK: "ok  ", Status.WARN: "WARN", Status.FAIL: "FAIL"}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""

    def line(self) -> str:
        """One operator line: `ok   storage: /var/lib/docker is ext4; ...`, the fix last."""
        text = f"{_LABELS[self.status]} {self.name}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "status": self.status.value,
            "message": self.message,
            "fix": self.fix,
        }

    @classmethod
    def from_dict(cls, document: dict[str, object]) -> Check:
        """A check as `as_dict` wrote it (an unknown status reads as a failure)."""
        try:
            status = Status(document.get("status"))
        except ValueError:
            status = Status.FAIL
        return cls(
            str(document.get("name", "?")),
            status,
            str(document.get("message", "")),
            str(document.get("fix", "")),
        )
