"""A service's state machine: the states and the moves allowed between them."""

from __future__ import annotations

import enum


class State(enum.Enum):
    DOWN = "down"  # not running and not meant to be (down file, or stopped)
    STARTING = "starting"  # running, not yet up long enough to count as up
    UP = "up"
    BACKOFF = "backoff"  # exited; a restart is scheduled
    FAILED = "failed"  # could not be executed at all; a retry is scheduled
    STOPPING = "stopping"  # stop signal sent, waiting for it to exit


_ALLOWED: dict[State, frozenset[State]] = {
    State.DOWN: frozenset({State.STARTING, State.FAILED}),
    # -> DOWN straight from running: a job that finished (ServiceSpec.done_statuses).
    State.STARTING: frozenset({State.UP, State.BACKOFF, State.STOPPING, State.DOWN}),
    State.UP: frozenset({State.BACKOFF, State.STOPPING, State.DOWN}),
    State.BACKOFF: frozenset({State.STARTING, State.FAILED, State.DOWN}),
    State.FAILED: frozenset({State.STARTING, State.FAILED, State.DOWN}),
    State.STOPPING: frozenset({State.DOWN}),
}


class TransitionError(RuntimeError):
    """A move the state machine does not allow: a bug in the supervisor, never user input."""


def check_transition(current: State, new: State) -> None:
    if new not in _ALLOWED[current]:
        raise TransitionError(f"{current.value} -> {new.value}")
