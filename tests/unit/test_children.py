"""The init's helper children (init.core.children): real `python -m` processes, a real loop."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from init.core import children
from init.core.log import Log
from init.core.loop import EventLoop
from init.errors import SpawnError
from tests.unit.fake_system import FakeSystem, Program

# A module the child runs: prints a line, then writes its result, or dies without one.
HELPER = """
import json, os, sys
result, how = sys.argv[1], sys.argv[2]
print("checking the engine", flush=True)
if how == "report":
    with open(result, "w") as f:
        json.dump({"ok": True, "cwd": os.getcwd()}, f)
elif how == "die":
    os._exit(3)
elif how in ("cleans-up", "ignores-sigterm"):
    import signal, time
    def stop(signum, frame):
        time.sleep(1.5)  # what it made is removed on the way out: a container, say
        with open(result, "w") as f:
            json.dump({"cleaned": True}, f)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop if how == "cleans-up" else signal.SIG_IGN)
    with open(result + ".ready", "w"):
        pass
    time.sleep(60)
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a module the child can import (children pass on the init's environment)."""
    package = tmp_path / "modules"
    package.mkdir()
    (package / "fake_helper.py").write_text(HELPER)
    monkeypatch.setenv("PYTHONPATH", str(package))
    return "fake_helper"


@pytest.fixture
def log() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def loop(log: io.StringIO) -> Iterator[EventLoop]:
    event_loop = EventLoop(Log(log), ())
    yield event_loop
    event_loop.close()


def run_child(loop: EventLoop, module: str, how: str, result: Path) -> dict[str, Any]:
    done: list[dict[str, Any]] = []
    children.start(
        loop, Log(io.StringIO()), "check", module, [str(result), how], result, done.append
    )
    assert loop.run_until(lambda: bool(done), loop.clock() + 20), "the child never ended"
    (document,) = done
    return document


def test_a_child_reports_its_json_result_when_it_ends(
    loop: EventLoop, helper: str, tmp_path: Path
) -> None:
    result = tmp_path / "run" / "check.json"  # its dir is made for it
    document = run_child(loop, helper, "report", result)
    assert document["ok"] is True
    assert document["cwd"] == os.getcwd()  # where the init is: / once it has left its start dir


def test_its_output_reaches_the_log_under_its_name(
    loop: EventLoop, log: io.StringIO, helper: str, tmp_path: Path
) -> None:
    done: list[dict[str, Any]] = []
    result = tmp_path / "check.json"
    children.start(
        loop, Log(log), "engine-check", helper, [str(result), "report"], result, done.append
    )
    assert loop.run_until(lambda: bool(done), loop.clock() + 20)
    assert "engine-check" in log.getvalue() and "checking the engine" in log.getvalue()


@pytest.mark.parametrize("how", ["die", "exit-without-result"])
def test_a_child_that_ends_without_a_result_reports_an_error_saying_how_it_ended(
    loop: EventLoop, helper: str, tmp_path: Path, how: str
) -> None:
    result = tmp_path / "check.json"
    result.write_text(json.dumps({"ok": True}))  # a stale one from an earlier run: not read
    document = run_child(loop, helper, how, result)
    status = 3 if how == "die" else 0
    assert document == {"error": f"{helper} exited with status {status} without a result"}


def test_a_child_that_cannot_start_raises_spawn_error_and_leaks_no_fd(tmp_path: Path) -> None:
    system = FakeSystem()
    system.spawn_fails.add(Path(sys.executable).name)
    loop = EventLoop(Log(io.StringIO()), (), system)
    try:
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(SpawnError):
            children.start(
                loop, Log(io.StringIO()), "check", "m", [], tmp_path / "r.json", lambda d: None
            )
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        loop.close()


@pytest.mark.parametrize("how", ["cleans-up", "ignores-sigterm"])
def test_end_gives_a_child_until_the_deadline_to_clean_up_then_kills_it(
    loop: EventLoop, helper: str, tmp_path: Path, how: str
) -> None:
    """The clean-up takes 1.5 s; the deadline is 4 s away. A child that cleans up ends on its
    own terms, its result written; one that ignores SIGTERM is killed at the deadline."""
    done: list[dict[str, Any]] = []
    result = tmp_path / "check.json"
    log = io.StringIO()
    child = children.start(loop, Log(log), "check", helper, [str(result), how], result, done.append)
    ready, waited = Path(f"{result}.ready"), 0
    while not ready.exists():  # its handler is set: nothing for the loop to hear, so poll
        assert waited < 1000, "the child never got ready"
        loop.run_until(lambda: False, loop.clock() + 0.02)
        waited += 1
    asked = loop.clock()
    ended_in_time = children.end(loop, Log(log), child, asked + 4.0)
    took = loop.clock() - asked
    assert child.ended and len(done) == 1
    if how == "cleans-up":
        assert ended_in_time and done == [{"cleaned": True}]
        assert 1.5 <= took < 4.0, took
    else:
        assert not ended_in_time
        assert done == [{"error": f"{helper} killed by SIGKILL without a result"}]
        assert 4.0 <= took < 6.0, took
        assert "check: warning: still running at the end of the grace period" in log.getvalue()


def test_end_of_a_child_that_has_ended_sends_nothing(tmp_path: Path) -> None:
    system = FakeSystem({Path(sys.executable).name: Program(runs_for=1.0)})
    loop = EventLoop(Log(io.StringIO()), (), system)
    try:
        done: list[dict[str, Any]] = []
        child = children.start(
            loop, Log(io.StringIO()), "check", "m", [], tmp_path / "r.json", done.append
        )
        assert loop.run_until(lambda: bool(done), 5.0)
        assert children.end(loop, Log(io.StringIO()), child, 10.0)
        assert system.signals == []
    finally:
        loop.close()
