"""Restart delays as a named policy value, computed without clocks or sleeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential delay after each quick exit, capped; a long enough run resets it."""

    first: float
    factor: float
    cap: float
    reset_after: float

    def delay(self, quick_exits: int) -> float:
        """Seconds to wait before the next start after `quick_exits` exits in a row (>= 1)."""
        if quick_exits <= 0:
            return 0.0
        return min(self.cap, self.first * self.factor ** (quick_exits - 1))

    def is_quick(self, uptime: float) -> bool:
        """An exit after `uptime` seconds counts toward the backoff unless it ran long enough."""
        return uptime < self.reset_after


# runit restarts at once and sleeps a second after a quick exit; we back off further so a
# crash-looping service costs nothing, and forgive it once it stays up ten seconds.
SERVICE_RESTART = Backoff(first=0.5, factor=2.0, cap=30.0, reset_after=10.0)
