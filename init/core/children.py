"""The init's own helper children: Python processes that may use libraries PID 1 never imports.

Each runs `python -m init.<module> ...` in its own session, its output in the log under a name,
and reports back through a JSON file and its exit; PID 1 learns of its end from the loop. A
child that is still running when the init stops is ended with `end`, which gives its clean-up
(a container it made on an engine) until the grace period's deadline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from init.core.log import Log
from init.core.loop import EventLoop
from init.core.output import OutputPipe
from init.core.process import Exit, SpawnSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any


@dataclass
class Child:
    """A helper child as its starter holds it: its name in the log, its pid (the leader of its
    own session), and whether it has ended (been reaped)."""

    name: str
    pid: int
    ended: bool = False


def start(
    loop: EventLoop,
    log: Log,
    name: str,
    module: str,
    args: Sequence[str],
    result: Path,
    on_done: Callable[[dict[str, Any]], None],
) -> Child:
    """Run `python -m module args`; call `on_done(its JSON result)` when it ends.

    SpawnError if it cannot start. A child that ends without writing its result reports
    `{"error": ...}` with how it ended.
    """
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    output = OutputPipe(loop, log, name)
    stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = loop.system.spawn(
            SpawnSpec(
                argv=(sys.executable, "-m", module, *args),
                env=dict(os.environ),
                new_session=True,
                stdin=stdin,
                stdout=output.write_fd,
                stderr=output.write_fd,
            )
        )
    except BaseException:
        output.close()
        raise
    finally:
        os.close(stdin)
    output.parent_side_started()
    child = Child(name, pid)

    def ended(exit_: Exit) -> None:
        child.ended = True
        output.close()
        try:
            document: dict[str, Any] = json.loads(result.read_text())
        except (OSError, ValueError):
            document = {"error": f"{module} {exit_.describe()} without a result"}
        on_done(document)

    loop.watch_child(pid, ended)
    return child


def end(loop: EventLoop, log: Log, child: Child, deadline: float) -> bool:
    """Ask `child` to stop (SIGTERM to its session) and wait for it until `deadline`, then
    SIGKILL it: its own clean-up gets that long. True when it ended before the deadline (its
    `on_done` has run either way once this returns)."""
    if child.ended:
        return True
    loop.system.signal_group(child.pid, signal.SIGTERM)
    if loop.run_until(lambda: child.ended, deadline):
        return True
    log.warning(child.name, "still running at the end of the grace period; killing it")
    loop.system.signal_group(child.pid, signal.SIGKILL)
    loop.run_until(lambda: child.ended)
    return False
