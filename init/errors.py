"""The one error tree: each error carries the operator's fix, and an exit status by meaning."""

from __future__ import annotations

EX_USAGE = 2
EX_UNAVAILABLE = 69  # sysexits: a service is down (the compile broker)
EX_TEMPFAIL = 75  # sysexits: try again later (TeX Live still installing)
EX_CONFIG = 78  # sysexits: configuration error


class InitError(Exception):
    """Something the operator can fix; printed as one line, never as a traceback."""

    exit_status = 1

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class ConfigError(InitError):
    """One or more configuration problems, each already a full line (variable, value, fix)."""

    exit_status = EX_CONFIG

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StartupError(InitError):
    """A startup script failed, or a step of the boot could not be done."""


class SpawnError(InitError):
    """A program could not be started at all (missing, not executable)."""


class EngineError(InitError):
    """The Docker engine (inner dockerd or the host's socket) is missing or misbehaving."""


class SandboxError(InitError):
    """A compile could not be run in its sandbox."""
