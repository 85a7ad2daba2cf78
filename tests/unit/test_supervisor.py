"""The supervisor: restarts, stops and shares of the grace period, on a fake system and clock."""

from __future__ import annotations

import io
import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from init.core.backoff import Backoff
from init.core.log import Log
from init.core.loop import EventLoop
from init.core.services import ServiceSpec
from init.core.states import State, TransitionError, check_transition
from init.core.supervisor import Supervisor
from tests.unit.fake_system import FakeSystem, Program


@pytest.fixture
def system() -> FakeSystem:
    fake = FakeSystem()
    fake.spawn_fails.update({"web", "a", "b"})
    return fake


@pytest.fixture
def loop(system: FakeSystem) -> Iterator[EventLoop]:
    event_loop = EventLoop(Log(io.StringIO()), (), system)
    yield event_loop
    event_loop.close()


def spec(name: str = "web", start: bool = True) -> ServiceSpec:
    return ServiceSpec(
        name=name, directory=Path("/"), argv=(f"/x/{name}/run",), start_at_boot=start
    )


def test_a_service_that_cannot_be_executed_is_failed_and_retried_with_growing_delays(
    loop: EventLoop, system: FakeSystem
) -> None:
    log = io.StringIO()
    policy = Backoff(first=1.0, factor=2.0, cap=4.0, reset_after=10.0)
    supervisor = Supervisor(loop, Log(log), {}, backoff=policy)
    supervisor.start([spec()])
    (service,) = supervisor.services
    assert service.state is State.FAILED
    assert "No such file" in service.reason
    for _ in range(5):
        system.now += 10.0  # far past any delay: each due timer fires once
        loop.run_once()
    attempts = [when for when, _name in system.failed_spawns]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 6
    assert service.quick_exits == 6
    assert "trying again in 1.0 s" in log.getvalue()
    assert "trying again in 4.0 s" in log.getvalue()
    assert all(gap >= 1.0 for gap in gaps)


def test_retries_wait_for_their_delay(loop: EventLoop, system: FakeSystem) -> None:
    policy = Backoff(first=1.0, factor=2.0, cap=30.0, reset_after=10.0)
    supervisor = Supervisor(loop, Log(io.StringIO()), {}, backoff=policy)
    supervisor.start([spec()])
    system.now += 0.9
    loop.run_once()
    assert len(system.failed_spawns) == 1  # 1.0 s not yet over
    system.now += 0.2
    loop.run_once()
    assert len(system.failed_spawns) == 2
    system.now += 1.9  # the next delay is 2.0 s
    loop.run_once()
    assert len(system.failed_spawns) == 2


def test_a_down_file_keeps_a_service_down(loop: EventLoop, system: FakeSystem) -> None:
    supervisor = Supervisor(loop, Log(io.StringIO()), {})
    supervisor.start([spec("mongo", start=False)])
    assert supervisor.services[0].state is State.DOWN
    assert system.children == []


def test_stop_all_takes_failed_services_down_without_waiting(
    loop: EventLoop, system: FakeSystem
) -> None:
    supervisor = Supervisor(loop, Log(io.StringIO()), {})
    supervisor.start([spec("a"), spec("b")])
    killed = supervisor.stop_all(lambda: system.now + 5)
    assert killed == []
    assert system.now == 0.0
    assert [s.state for s in supervisor.services] == [State.DOWN, State.DOWN]
    system.now += 100
    loop.run_once()
    assert [s.state for s in supervisor.services] == [State.DOWN, State.DOWN]


def test_state_machine_refuses_moves_it_does_not_allow() -> None:
    check_transition(State.DOWN, State.STARTING)
    check_transition(State.UP, State.STOPPING)
    with pytest.raises(TransitionError):
        check_transition(State.DOWN, State.UP)
    with pytest.raises(TransitionError):
        check_transition(State.STOPPING, State.STARTING)


def test_a_job_that_exits_with_a_done_status_is_finished_not_restarted() -> None:
    log = io.StringIO()
    loop = EventLoop(Log(log), ())
    try:
        supervisor = Supervisor(loop, Log(log), {})
        job = ServiceSpec(
            name="job", directory=Path("/"), argv=("/bin/sh", "-c", "exit 1"),
            done_statuses=frozenset({0, 1}),
        )  # fmt: skip
        crash = ServiceSpec(name="crash", directory=Path("/"), argv=("/bin/sh", "-c", "exit 3"))
        supervisor.start([job, crash])
        done, crashed = supervisor.services
        assert loop.run_until(lambda: crashed.restarts >= 1, loop.clock() + 5)
        assert loop.run_until(lambda: done.state is State.DOWN, loop.clock() + 5)
        assert done.restarts == 0 and done.next_start_at is None
        assert done.reason == "finished: exited with status 1"
        assert crashed.state in (State.BACKOFF, State.STARTING)  # the runit service restarts
        assert "job: finished: exited with status 1 after" in log.getvalue()
    finally:
        loop.close()


def test_forwarded_signals_reach_each_running_service_but_not_a_finish_script(
    loop: EventLoop, tmp_path: Path
) -> None:
    finish = tmp_path / "svc" / "web" / "finish"
    finish.parent.mkdir(parents=True)
    finish.write_text("#!/bin/sh\n")
    finish.chmod(0o755)
    system = loop.system
    assert isinstance(system, FakeSystem)
    system.programs = {"web": [Program(runs_for=1.0, status=2)], "web/finish": [Program()]}
    system.spawn_fails.clear()
    supervisor = Supervisor(loop, Log(io.StringIO()), {})
    web = ServiceSpec(
        name="web", directory=finish.parent, argv=(str(finish.parent / "run"),), finish=finish
    )
    supervisor.start([web, spec("db")])
    supervisor.forward(signal.SIGHUP)
    loop.run_until(lambda: system.running("web/finish") is not None, 5.0)
    supervisor.forward(signal.SIGUSR1)
    assert system.signalled(signal.SIGHUP) == [(0.0, "web"), (0.0, "db")]
    assert system.signalled(signal.SIGUSR1) == [(1.0, "db")]  # web is in its finish script


def test_a_finish_script_that_cannot_run_does_not_hold_up_the_restart(
    loop: EventLoop, tmp_path: Path
) -> None:
    finish = tmp_path / "web" / "finish"
    finish.parent.mkdir()
    finish.write_text("#!/bin/sh\n")
    finish.chmod(0o755)
    system = loop.system
    assert isinstance(system, FakeSystem)
    system.programs = {"web": [Program(runs_for=1.0, status=2)]}
    system.spawn_fails = {"web/finish"}
    log = io.StringIO()
    supervisor = Supervisor(loop, Log(log), {})
    web = ServiceSpec(
        name="web", directory=finish.parent, argv=(str(finish.parent / "run"),), finish=finish
    )
    supervisor.start([web])
    loop.run_until(lambda: len(system.starts_of("web")) == 2, 10.0)
    assert system.starts_of("web") == [0.0, 1.5]
    assert "web: error: finish: cannot execute" in log.getvalue()
