"""The init's lifecycle as scripted histories, on a fake system: no processes, no waiting.

Each test lays out real startup, shutdown and service dirs under tmp_path (the init discovers
them as it would in a container), says how each program behaves and what happens when (a
child exits with status S at time T, a SIGTERM arrives), runs `Init.run()` to its end, and
reads what the fake recorded: what was spawned, where, what was signalled, and when.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from init.core import children, container_env
from init.core.docker_side import DockerSide
from init.core.log import Log
from init.core.loop import EventLoop
from init.core.pid1 import BootOptions, Init, Shutdown
from init.core.supervisor import Supervisor
from tests.unit.fake_system import Deadlock, FakeSystem, Program

if TYPE_CHECKING:
    from init.core.pid1 import SideFactory

TERM, KILL, CONT = signal.SIGTERM, signal.SIGKILL, signal.SIGCONT
IGNORES_TERM = Program(ends_on=frozenset())


def quick(status: int = 1, after: float = 0.1) -> Program:
    return Program(runs_for=after, status=status)


class Tree:
    """The init's dirs under one base: startup, pre/post shutdown, services, env, status."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.startup = base / "my_init.d"
        self.pre = base / "my_init.pre_shutdown.d"
        self.post = base / "my_init.post_shutdown.d"
        self.services = base / "service"
        self.status_file = base / "run" / "status.json"
        for d in (self.startup, self.pre, self.post, self.services):
            d.mkdir(parents=True)

    def script(self, directory: Path, name: str, executable: bool = True) -> Path:
        path = directory / name
        path.write_text("#!/bin/sh\n")  # never run: the fake system plays it
        if executable:
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return path

    def service(self, name: str, finish: bool = False) -> Path:
        directory = self.services / name
        directory.mkdir()
        self.script(directory, "run")
        if finish:
            self.script(directory, "finish")
        return directory

    def options(self, grace: float = 8.0) -> BootOptions:
        return BootOptions(
            startup_dir=self.startup,
            pre_shutdown_dir=self.pre,
            post_shutdown_dir=self.post,
            service_dir=self.services,
            env_files=container_env.EnvFiles(self.base / "container_environment"),
            status_file=self.status_file,
            shutdown=Shutdown(grace=grace, kill_all=1.0),
        )

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.status_file.read_text())
        return document

    def service_status(self, name: str) -> dict[str, Any]:
        (entry,) = [s for s in self.status()["services"] if s["name"] == name]
        return dict(entry)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path / "init")


class Run:
    """One init run: its exit status and log, and the fake that played it."""

    def __init__(
        self,
        tree: Tree,
        system: FakeSystem,
        grace: float = 8.0,
        docker_side: SideFactory | None = None,
    ) -> None:
        self.system = system
        self.log = io.StringIO()
        options = dataclasses.replace(tree.options(grace), docker_side=docker_side)
        self.init = Init(options, Log(self.log), {"PATH": "/bin"}, system)
        self.status: int | None = None

    def __call__(self) -> int:
        self.status = self.init.run()
        return self.status


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Every run made, so each loop is closed (its signal handlers put back) after the test."""
    made: list[Run] = []
    yield made
    for run in made:
        run.init.loop.close()


def make(runs: list[Run], tree: Tree, system: FakeSystem, grace: float = 8.0) -> Run:
    run = Run(tree, system, grace)
    runs.append(run)
    return run


def not_cont(system: FakeSystem) -> list[tuple[float, str, int]]:
    """The signals sent, without the SIGCONT that follows each stop signal."""
    return [(round(when, 6), who, s) for when, who, s in system.signals if s != CONT]


# -- boot -------------------------------------------------------------------------------------


def test_boot_runs_startup_scripts_in_name_order_then_services_in_name_order(
    tree: Tree, runs: list[Run]
) -> None:
    for name in ("20-second", "10-first"):
        tree.script(tree.startup, name)
    tree.script(tree.startup, "15-not-executable", executable=False)
    for name in ("web", "mongo", "redis"):
        tree.service(name)
    system = FakeSystem({"10-first": quick(0, 1.0), "20-second": quick(0, 2.0)})
    system.at(10.0, signal_init=TERM)
    run = make(runs, tree, system)
    assert run() == 0
    assert system.started() == ["10-first", "20-second", "mongo", "redis", "web"]
    assert [c.started for c in system.children] == [0.0, 1.0, 3.0, 3.0, 3.0]


def test_the_init_leaves_its_start_dir_yet_scripts_start_there_and_services_in_their_own(
    tree: Tree, runs: list[Run]
) -> None:
    tree.script(tree.startup, "10-setup")
    tree.script(tree.post, "90-after")
    web = tree.service("web")
    system = FakeSystem({"10-setup": quick(0)}, start_dir=Path("/srv/caller"))
    system.at(5.0, signal_init=TERM)
    assert make(runs, tree, system)() == 0
    assert system.moved_to == ["/"]
    cwd = {c.name: c.spec.cwd for c in system.children}
    assert cwd == {"10-setup": Path("/srv/caller"), "web": web, "90-after": Path("/srv/caller")}


def test_relative_paths_are_taken_from_the_start_dir_before_the_init_leaves_it(
    tree: Tree, runs: list[Run]
) -> None:
    tree.service("web")
    system = FakeSystem(start_dir=tree.base)
    system.at(1.0, signal_init=TERM)
    run = make(runs, tree, system)
    relative = BootOptions(
        startup_dir=Path("my_init.d"),
        pre_shutdown_dir=Path("my_init.pre_shutdown.d"),
        post_shutdown_dir=Path("my_init.post_shutdown.d"),
        service_dir=Path("service"),
        env_files=container_env.EnvFiles(Path("container_environment")),
        status_file=Path("run/status.json"),
    )
    run.init.options = relative
    assert run() == 0
    assert system.started() == ["web"]
    assert run.init.options.status_file == tree.status_file
    assert tree.status()["phase"] == "stopped"


def test_a_failing_startup_script_stops_the_boot_with_status_1(tree: Tree, runs: list[Run]) -> None:
    for name in ("10-ok", "20-bad", "30-never"):
        tree.script(tree.startup, name)
    tree.script(tree.pre, "10-pre")
    tree.script(tree.post, "10-post")
    tree.service("web")
    system = FakeSystem({"10-ok": quick(0, 1.0), "20-bad": quick(2, 0.5), "10-post": quick(0)})
    run = make(runs, tree, system)
    assert run() == 1
    # No pre-shutdown script: no service ran. The post-shutdown ones always run.
    assert system.started() == ["10-ok", "20-bad", "10-post"]
    assert "20-bad exited with status 2" in tree.status()["message"]
    assert tree.status()["phase"] == "stopped"
    assert "not starting the services" in run.log.getvalue()


def test_a_startup_script_that_cannot_be_executed_stops_the_boot(
    tree: Tree, runs: list[Run]
) -> None:
    tree.script(tree.startup, "10-broken")
    tree.service("web")
    system = FakeSystem()
    system.spawn_fails.add("10-broken")
    run = make(runs, tree, system)
    assert run() == 1
    assert system.started() == []
    assert "exited with status 127" in tree.status()["message"]


def test_sigterm_during_a_startup_script_ends_it_and_no_service_starts(
    tree: Tree, runs: list[Run]
) -> None:
    tree.script(tree.startup, "10-slow")
    tree.script(tree.pre, "10-pre")
    tree.service("web")
    system = FakeSystem({"10-slow": Program(stops_in=0.2)})
    system.at(2.0, signal_init=TERM)
    run = make(runs, tree, system)
    assert run() == 0
    assert system.started() == ["10-slow"]
    assert not_cont(system) == [(2.0, "10-slow", TERM)]
    assert system.children[0].ended == pytest.approx(2.2)
    assert "ending" in run.log.getvalue() and "the init is stopping" in run.log.getvalue()


def test_a_startup_script_that_ignores_sigterm_is_killed_at_the_end_of_the_grace(
    tree: Tree, runs: list[Run]
) -> None:
    tree.script(tree.startup, "10-stubborn")
    system = FakeSystem({"10-stubborn": IGNORES_TERM})
    system.at(2.0, signal_init=TERM)
    assert make(runs, tree, system, grace=3.0)() == 0
    assert not_cont(system) == [(2.0, "10-stubborn", TERM), (5.0, "10-stubborn", KILL)]


# -- restarts ---------------------------------------------------------------------------------


def gaps_after_exits(system: FakeSystem, name: str) -> list[float]:
    """Seconds from each exit of `name` to its next start."""
    runs_of = [c for c in system.children if c.name == name]
    return [
        round(later.started - (earlier.ended or 0.0), 6)
        for earlier, later in itertools.pairwise(runs_of)
    ]


def test_restarts_back_off_0_5_1_2_up_to_30_s_and_reset_after_10_s_up(
    tree: Tree, runs: list[Run]
) -> None:
    tree.service("crash")
    history = [quick()] * 8 + [quick(after=12.0), quick(), quick()]
    system = FakeSystem({"crash": history})
    system.at(200.0, signal_init=TERM)
    assert make(runs, tree, system)() == 0
    gaps = gaps_after_exits(system, "crash")
    assert gaps[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # The ninth run lasted 12 s: counted as up, so its exit starts the backoff over.
    assert gaps[8:11] == [0.5, 1.0, 2.0]


def test_a_crash_loop_shows_in_the_status_document(tree: Tree, runs: list[Run]) -> None:
    tree.service("crash")
    system = FakeSystem({"crash": quick(status=1)})
    seen: list[dict[str, Any]] = []
    # Starts at 0, 0.6, 1.7, 3.8; exits 0.1 s after each; the next start is due at 7.9.
    system.at(4.0, call=lambda: seen.append(tree.service_status("crash")))
    system.at(4.5, signal_init=TERM)
    run = make(runs, tree, system)
    assert run() == 0
    (crash,) = seen
    assert crash["state"] == "backoff"
    assert crash["restarts"] == 4 and crash["quick_exits"] == 4
    assert crash["reason"] == "exited with status 1 after 0.1 s"
    assert crash["last_exit"]["code"] == 1
    assert crash["next_start_at"] == pytest.approx(system.epoch + 7.9)
    assert "restarting in 4.0 s (crash loop)" in run.log.getvalue()
    # Stopping cancels the pending start: it ends down, not restarted.
    assert system.starts_of("crash") == pytest.approx([0.0, 0.6, 1.7, 3.8])
    assert tree.service_status("crash")["state"] == "down"


def test_a_service_that_stays_up_is_up_and_not_restarted(tree: Tree, runs: list[Run]) -> None:
    tree.service("web")
    system = FakeSystem()
    seen: list[dict[str, Any]] = []
    system.at(0.5, call=lambda: seen.append(tree.service_status("web")))
    system.at(1.5, call=lambda: seen.append(tree.service_status("web")))
    system.at(60.0, signal_init=TERM)
    assert make(runs, tree, system)() == 0
    assert [s["state"] for s in seen] == ["starting", "up"]
    assert system.started() == ["web"]


# -- finish -----------------------------------------------------------------------------------


def test_finish_runs_after_each_exit_with_runits_arguments_before_the_restart(
    tree: Tree, runs: list[Run]
) -> None:
    web = tree.service("web", finish=True)
    system = FakeSystem({"web/finish": quick(0, 0.5)})
    system.at(1.0, exit=("web", 3))
    system.at(5.0, signal_init=TERM)
    assert make(runs, tree, system)() == 0
    finishes = [c for c in system.children if c.name == "web/finish"]
    assert [c.spec.argv[1:] for c in finishes] == [("3", "0"), ("-1", str(int(TERM)))]
    assert [c.started for c in finishes] == [1.0, 5.0]
    assert all(c.spec.cwd == web for c in finishes)
    # The restart waits for finish (ended at 1.5), then its backoff of 0.5 s.
    assert system.starts_of("web") == [0.0, 2.0]


# -- shutdown ---------------------------------------------------------------------------------


def test_shutdown_stops_services_in_reverse_order_each_within_its_share_of_the_grace(
    tree: Tree, runs: list[Run]
) -> None:
    for name in ("a", "b", "c"):
        tree.service(name)
    tree.script(tree.pre, "10-pre")
    system = FakeSystem(
        {"a": Program(stops_in=1.0), "b": IGNORES_TERM, "c": Program(), "10-pre": quick(0, 1.0)}
    )
    system.at(5.0, signal_init=TERM)
    run = make(runs, tree, system, grace=9.0)
    assert run() == 0
    # Grace: 5 -> 14. The pre-shutdown script takes 1 s; c stops at once; b ignores SIGTERM and
    # is killed at the end of its share, (14 - 6) / 2 = 4 s; a still gets the 4 s left, in
    # which it stops by itself (1 s): b's ignoring SIGTERM cost only its own share.
    assert not_cont(system) == [
        (6.0, "c", TERM),
        (6.0, "b", TERM),
        (10.0, "b", KILL),
        (10.0, "a", TERM),
    ]
    assert system.running("a") is None and system.children[0].ended == 11.0
    assert "killed after the grace period: b" in run.log.getvalue()
    assert [s["state"] for s in tree.status()["services"]] == ["down", "down", "down"]


def test_a_second_sigterm_cuts_the_grace_period_short(tree: Tree, runs: list[Run]) -> None:
    tree.service("slow")
    system = FakeSystem({"slow": IGNORES_TERM})
    system.at(5.0, signal_init=TERM)
    system.at(6.0, signal_init=TERM)
    run = make(runs, tree, system, grace=30.0)
    assert run() == 0
    assert not_cont(system) == [(5.0, "slow", TERM), (6.0, "slow", KILL)]
    assert "cutting the grace period short" in run.log.getvalue()


def test_as_pid1_what_is_left_gets_sigterm_then_sigkill(tree: Tree, runs: list[Run]) -> None:
    tree.service("web")
    system = FakeSystem(pid=1)
    orphan = system.adopt("daemonized", IGNORES_TERM)
    system.at(5.0, signal_init=TERM)
    run = make(runs, tree, system)
    assert run() == 0
    assert [(when, s) for when, who, s in system.signals if who == "all"] == [
        (5.0, TERM),
        (5.0, CONT),
        (6.0, KILL),  # the kill-all timeout, 1 s
    ]
    assert orphan.reaped
    assert "processes left after 1.0 s; killing them" in run.log.getvalue()


class HelperSide(DockerSide):
    """A Docker side that starts one helper child of its own (as the sibling check's proof
    again does, init.engine.host) and ends it when asked, through init.core.children."""

    def __init__(self, loop: EventLoop, log: Log, result: Path) -> None:
        self.loop, self.log, self.result = loop, log, result
        self.helper: children.Child | None = None
        self.asked: list[tuple[float, float]] = []  # (when, the deadline given)

    def start(self, supervisor: Supervisor) -> None:
        self.helper = children.start(
            self.loop, self.log, "proof", "a.module", [], self.result, lambda document: None
        )

    def end_children(self, deadline: float) -> None:
        self.asked.append((self.loop.clock(), deadline))
        assert self.helper is not None
        children.end(self.loop, self.log, self.helper, deadline)


HELPER = Path(sys.executable).name  # what the fake calls a helper child (`python -m ...`)


def run_with_helper(
    tree: Tree, runs: list[Run], helper: Program, grace: float
) -> tuple[Run, HelperSide]:
    tree.service("web")
    tree.script(tree.pre, "10-pre")
    system = FakeSystem({HELPER: helper, "10-pre": quick(0, 0.5)}, pid=1)
    system.at(5.0, signal_init=TERM)
    sides: list[HelperSide] = []

    def side(loop: EventLoop, log: Log, on_change: object) -> HelperSide:
        sides.append(HelperSide(loop, log, tree.base / "helper.json"))
        return sides[0]

    run = Run(tree, system, grace, docker_side=side)
    runs.append(run)
    assert run() == 0
    return run, sides[0]


def test_a_helper_child_gets_the_grace_to_clean_up_before_the_services_stop(
    tree: Tree, runs: list[Run]
) -> None:
    """The helper takes 3 s to clean up after SIGTERM (a proof container to remove on a
    slow engine): longer than the 1 s the kill-all gives what is left, well inside the grace."""
    run, side = run_with_helper(tree, runs, Program(stops_in=3.0), grace=8.0)
    assert side.asked == [(5.0, 13.0)]  # at the stop signal, with the grace period's deadline
    assert not_cont(run.system) == [
        (5.0, HELPER, TERM),
        (8.5, "web", TERM),  # after it had ended (8.0), then the pre-shutdown script (0.5 s)
    ]
    assert run.system.children[0].ended == 8.0  # it ended by itself: never killed


def test_a_helper_child_that_ignores_sigterm_is_killed_at_the_end_of_the_grace(
    tree: Tree, runs: list[Run]
) -> None:
    run, side = run_with_helper(tree, runs, IGNORES_TERM, grace=4.0)
    assert side.asked == [(5.0, 9.0)]
    assert not_cont(run.system)[:2] == [(5.0, HELPER, TERM), (9.0, HELPER, KILL)]
    log = run.log.getvalue()
    assert "proof: warning: still running at the end of the grace period; killing it" in log
    assert run.system.running(HELPER) is None


def test_the_fake_refuses_to_wait_forever(tree: Tree, runs: list[Run]) -> None:
    tree.service("web")
    with pytest.raises(Deadlock):
        make(runs, tree, FakeSystem())()  # nothing in the script ever stops it


# -- the status file ----------------------------------------------------------------------------


def test_a_status_dir_that_cannot_be_written_is_written_again_within_5_s_once_it_can(
    tree: Tree, runs: list[Run]
) -> None:
    """A read-only or full status dir for 4 s, during which web dies and is restarted: the init
    supervises on, and the file then says what is true (web's new pid), not what was."""
    tree.service("web")
    tree.status_file.parent.write_text("not a dir")  # every write fails: ENOTDIR
    system = FakeSystem()
    system.at(1.0, exit=("web", 3))
    system.at(4.0, call=lambda: tree.status_file.parent.unlink())
    written_at: list[float] = []

    def look() -> None:
        if not written_at and tree.status_file.exists():
            written_at.append(system.now)
            (web,) = tree.status()["services"]
            assert web["pid"] == system.running("web").pid  # type: ignore[union-attr]
            assert web["restarts"] == 1

    for tick in range(200):
        system.at(4.0 + tick * 0.05, call=look)
    system.at(20.0, signal_init=TERM)
    run = make(runs, tree, system)
    assert run() == 0
    assert system.starts_of("web") == pytest.approx([0.0, 1.5])  # supervised throughout
    # Retries at 0.5, 1.5, 3.5, 7.5 s after the first failure (0.5 s doubling, at most 5 s).
    assert written_at and 4.0 < written_at[0] <= 4.0 + 5.0
    assert written_at[0] == pytest.approx(7.5, abs=0.051)  # looked at every 0.05 s
    log = run.log.getvalue()
    assert log.count("cannot write") == 1  # once an outage, not once a change
    assert "written again, 7.5 s after it could not be" in log
    assert [p.name for p in tree.status_file.parent.iterdir()] == ["status.json"]  # no .tmp


def test_the_first_write_clears_what_an_earlier_start_left(tree: Tree, runs: list[Run]) -> None:
    run_dir = tree.status_file.parent
    run_dir.mkdir()
    earlier = {"pid": 1, "phase": "running", "started_at": 1.0, "services": []}
    tree.status_file.write_text(json.dumps(earlier))
    for name in ("texlive.json", "engine-check.json", ".status.json.1.tmp"):
        (run_dir / name).write_text("{}")
    system = FakeSystem()
    system.at(1.0, signal_init=TERM)
    run = make(runs, tree, system)
    assert run() == 0
    assert [p.name for p in run_dir.iterdir()] == ["status.json"]
    boot = tree.status()["boot"]
    assert boot["pid"] == os.getpid() and boot["start_time"] > 0  # this start's, not pid 1's
    assert "removed" in run.log.getvalue() and "left by an earlier start" in run.log.getvalue()
