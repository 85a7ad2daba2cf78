"""WarmContainer and Pool against a fake engine: the test holds the agent's end of a socket
pair and writes the engine's frames. Death noticed, the protocol enforced, cancellation sent,
one compile at a time per project, the global limit, idle retirement on a fake clock, the
sweep by label, and the container's body."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from init.broker import target
from init.broker.multiplex import frame
from init.broker.pool import Pool, PoolLimits
from init.broker.protocol import Answer, Output, ProtocolError, Reason, Request
from init.broker.target import BROKER_LABEL, Target
from init.broker.warm import AgentGone, WarmContainer
from init.compiles.paths import CompileDir
from init.compiles.profile import Job
from init.compiles.settings import Limits
from init.engine.client import COMPILE_LABEL, Attachment, EngineUnreachable

READY = b'{"agent":"ready","version":1,"pid":1}\n'


def line(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode() + b"\n"


def out(request_id: str, data: bytes, fd: int = 1) -> bytes:
    return line({"id": request_id, "fd": fd, "data": base64.b64encode(data).decode()})


def end(request_id: str, exit_status: int = 0) -> bytes:
    return line({"id": request_id, "reason": "exit", "exit": exit_status, "seconds": 0.1})


@dataclass
class FakeBackend:
    """The engine's calls a WarmContainer makes; each container's agent end in `agents`."""

    agents: dict[str, socket.socket] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    listed: list[dict[str, Any]] = field(default_factory=list)
    created: int = 0

    def create(self, name: str, body: Any) -> str:
        self.created += 1
        return f"{name}#{self.created}"

    def attach(self, container: str) -> Attachment:
        ours, theirs = socket.socketpair()
        self.agents[container] = theirs
        return Attachment(ours)

    def start_created(self, container: str) -> None:
        self.agents[container].sendall(frame(1, READY))

    def remove(self, container: str, timeout: float = 30.0) -> None:
        self.removed.append(container)

    def containers(self) -> list[dict[str, Any]]:
        return self.listed


class Agent:
    """Plays a container's agent: answers each request line by a script."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def request(self) -> dict[str, Any]:
        got = self.file.readline()
        assert got, "the broker closed the agent's stdin"
        return dict(json.loads(got))

    def die(self) -> None:
        """The agent's end: the stream closes (shutdown: the makefile holds the fd)."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def send(self, data: bytes, stream: int = 1) -> None:
        self.sock.sendall(frame(stream, data))


def request(request_id: str = "c1", timeout: float = 5) -> Request:
    return Request(request_id, ("latexmk", "main.tex"), "/compile/p", timeout)


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    made = FakeBackend()
    yield made
    for sock in made.agents.values():
        sock.close()


def started(backend: FakeBackend) -> tuple[WarmContainer, Agent]:
    warm = WarmContainer.start(backend, "p", {})  # type: ignore[arg-type]
    return warm, Agent(backend.agents[warm.id])


def in_thread(agent: Agent, script: Any) -> threading.Thread:
    thread = threading.Thread(target=script, args=(agent,), daemon=True)
    thread.start()
    return thread


def test_a_compile_passes_its_output_on_and_returns_its_answer(backend: FakeBackend) -> None:
    warm, agent = started(backend)
    fake = end("c1", 0)  # what a compile prints to forge an answer stays its output

    def script(agent: Agent) -> None:
        assert agent.request()["argv"] == ["latexmk", "main.tex"]
        agent.send(out("c1", b"first\n" + fake))
        agent.send(b"agent: a diagnostic\n", stream=2)
        agent.send(out("c1", b"\xff\x00", fd=2) + end("c1", 12))

    thread = in_thread(agent, script)
    seen: list[Output] = []
    answer = warm.run(request(), seen.append)
    thread.join(5)
    assert answer == Answer("c1", Reason.EXIT, exit=12, seconds=0.1)
    assert seen == [Output("c1", 1, b"first\n" + fake), Output("c1", 2, b"\xff\x00")]
    assert list(warm.diagnostics) == ["agent: a diagnostic"]
    assert warm.alive()


def test_the_agents_end_mid_compile_is_noticed_and_says_it_was_sent(
    backend: FakeBackend,
) -> None:
    warm, agent = started(backend)

    def script(agent: Agent) -> None:
        agent.request()
        agent.send(out("c1", b"partial"))
        agent.send(b"agent: killed\n", stream=2)
        agent.die()

    in_thread(agent, script)
    with pytest.raises(AgentGone) as gone:
        warm.run(request(), lambda o: None)
    assert gone.value.sent
    assert "agent: killed" in str(gone.value)
    assert not warm.alive()
    with pytest.raises(AgentGone):
        warm.run(request("c2"), lambda o: None)


def test_an_agent_that_ended_while_idle_is_seen_without_waiting(backend: FakeBackend) -> None:
    warm, agent = started(backend)
    agent.die()
    began = time.monotonic()
    assert not warm.alive()
    assert time.monotonic() - began < 0.5


def test_a_line_while_idle_or_for_another_compile_breaks_trust(backend: FakeBackend) -> None:
    warm, agent = started(backend)
    agent.send(end("c0"))
    assert not warm.alive()
    other, agent2 = started(backend)

    def script(agent: Agent) -> None:
        agent.request()
        agent.send(end("someone-else"))

    in_thread(agent2, script)
    with pytest.raises(ProtocolError):
        other.run(request(), lambda o: None)
    assert other.ended


def test_junk_on_the_stream_breaks_trust(backend: FakeBackend) -> None:
    warm, agent = started(backend)

    def script(agent: Agent) -> None:
        agent.request()
        agent.sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # not a frame

    in_thread(agent, script)
    with pytest.raises(ProtocolError):
        warm.run(request(), lambda o: None)
    assert not warm.alive()


def test_an_agent_that_never_answers_is_given_up_after_timeout_and_grace(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("init.broker.warm.ANSWER_GRACE", 0.2)
    warm, _agent = started(backend)
    began = time.monotonic()
    with pytest.raises(AgentGone):
        warm.run(request(timeout=0.2), lambda o: None)
    assert 0.35 < time.monotonic() - began < 2
    assert not warm.alive()


def test_a_byte_on_the_cancel_fd_sends_cancel(backend: FakeBackend) -> None:
    warm, agent = started(backend)
    stop_r, stop_w = os.pipe()

    def script(agent: Agent) -> None:
        agent.request()
        os.write(stop_w, b"x")
        assert agent.request() == {"op": "cancel", "id": "c1"}
        agent.send(line({"id": "c1", "reason": "cancelled", "signal": 9}))

    thread = in_thread(agent, script)
    answer = warm.run(request(), lambda o: None, cancel_fd=stop_r)
    thread.join(5)
    assert (answer.reason, answer.status) == (Reason.CANCELLED, 137)
    os.close(stop_r)
    os.close(stop_w)


def test_close_lets_go_and_removes(backend: FakeBackend) -> None:
    warm, agent = started(backend)
    warm.close()
    assert agent.file.readline() == b""  # EOF on the agent's stdin
    assert backend.removed == [warm.id]


# -- the pool ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answering(backend: FakeBackend, hold: threading.Event | None = None) -> None:
    """Every agent the backend starts answers every request (after `hold`, if given)."""

    def serve(agent: Agent) -> None:
        while True:
            try:
                got = agent.request()
            except (AssertionError, OSError, ValueError):
                return
            if hold is not None:
                hold.wait(5)
            try:
                agent.send(end(got["id"]))
            except OSError:
                return

    original = backend.start_created

    def start_created(container: str) -> None:
        original(container)
        in_thread(Agent(backend.agents[container]), serve)

    backend.start_created = start_created  # type: ignore[method-assign]


LIMITS = PoolLimits(slots=2, idle=60, lifetime=600, reuse=100)


def where(project: str, name: str = "") -> Target:
    place = CompileDir(Path(f"/compile/{project}"), Path(f"/compile/{project}"), project, 33, 33)
    return Target(project, name or f"c-{project}", {}, place)


@pytest.fixture(autouse=True)
def shared(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The projects whose dir the pools shared (no dir is there to chmod)."""
    made: list[str] = []
    monkeypatch.setattr("init.broker.pool.share_with_compile", lambda d: made.append(d.project))
    return made


def test_a_project_reuses_its_container_until_it_is_idle(backend: FakeBackend) -> None:
    answering(backend)
    clock = Clock()
    pool = Pool(backend, LIMITS, clock=clock)  # type: ignore[arg-type]
    for n in range(3):
        assert pool.run(where("a"), request(f"c{n}"), lambda o: None).status == 0
        clock.now += 10
    assert backend.created == 1
    assert pool.next_retirement() == 1030 + 60 - 10
    clock.now += 30
    assert pool.retire_idle() == []
    clock.now += 30
    assert pool.retire_idle() == ["c-a"]
    assert pool.next_retirement() is None
    pool.run(where("a"), request("c9"), lambda o: None)
    assert backend.created == 2


def test_a_container_near_its_lifetime_or_of_another_profile_is_replaced(
    backend: FakeBackend,
) -> None:
    answering(backend)
    clock = Clock()
    pool = Pool(backend, LIMITS, clock=clock)  # type: ignore[arg-type]
    pool.run(where("a"), request("c1"), lambda o: None)
    clock.now += 600 - 100  # `reuse` left: not enough for a whole compile
    pool.run(where("a"), request("c2"), lambda o: None)
    pool.run(where("a", "c-a-other-image"), request("c3"), lambda o: None)
    assert backend.created == 3
    assert len(backend.removed) == 2


def test_a_dir_removed_and_made_again_gets_a_fresh_container(
    backend: FakeBackend, tmp_path: Path
) -> None:
    """A warm container's bind holds the dir it was started with: the site's "recompile from
    scratch" removes the project's dir and makes it again, and the next compile must see the
    new one."""
    answering(backend)
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    directory = tmp_path / "a"
    directory.mkdir()
    place = CompileDir(directory, directory, "a", 33, 33)
    target = Target("a", "c-a", {}, place)
    pool.run(target, request("c1"), lambda o: None)
    pool.run(target, request("c2"), lambda o: None)
    assert backend.created == 1
    directory.rmdir()
    directory.mkdir()
    pool.run(target, request("c3"), lambda o: None)
    assert backend.created == 2 and len(backend.removed) == 1


def test_an_agent_that_ended_while_idle_is_replaced(backend: FakeBackend) -> None:
    answering(backend)
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    pool.run(where("a"), request("c1"), lambda o: None)
    first = next(iter(backend.agents))
    Agent(backend.agents[first]).die()  # idle end, lifetime, the engine restarted it
    assert pool.run(where("a"), request("c2"), lambda o: None).status == 0
    assert backend.created == 2 and backend.removed == [first]


def test_an_engine_too_slow_to_remove_the_container_leaves_the_compiles_end_as_it_was(
    backend: FakeBackend,
) -> None:
    """A full run's runsc fork bomb was reported as an engine down: the removal of its container,
    in its turn after its end, passed the call's 30 s on a starved host. What the compile came
    to stands; the removal's failure is the broker's log line."""
    answering(backend)
    said: list[str] = []
    pool = Pool(backend, LIMITS, log=said.append)  # type: ignore[arg-type]

    def slow(container: str, timeout: float) -> None:
        raise EngineUnreachable(f"the Docker engine did not answer DELETE /containers/{container}")

    backend.remove = slow  # type: ignore[method-assign]
    answer = pool.run(where("a"), request("c1"), lambda o: None, finish=lambda a, c: True)
    assert answer.status == 0
    # The project's next compile comes after the removal (its turn is the removal's).
    assert pool.run(where("a"), request("c1b"), lambda o: None).status == 0
    (line,) = said
    assert line.startswith("a: its container was not removed after its compile: ")
    assert "did not answer DELETE /containers/c-a#1" in line

    # An agent that ends under its compile (gVisor's OOM kill takes the sandbox): that end is
    # what the compile came to, not the removal's failure after it.
    dying = FakeBackend()
    dying.remove = slow  # type: ignore[method-assign]
    original = dying.start_created

    def start_dying(container: str) -> None:
        original(container)
        in_thread(Agent(dying.agents[container]), lambda agent: (agent.request(), agent.die()))

    dying.start_created = start_dying  # type: ignore[method-assign]
    pool = Pool(dying, LIMITS, log=said.append)  # type: ignore[arg-type]
    try:
        with pytest.raises(AgentGone) as caught:
            pool.run(where("b"), request("c2"), lambda o: None)
    finally:
        for sock in dying.agents.values():
            sock.close()
    assert caught.value.sent and dying.created == 1 and len(said) == 2


def test_an_agent_that_ends_under_its_compile_is_asked_about_before_its_container_goes(
    backend: FakeBackend,
) -> None:
    """The engine can say how a container ended (the OOM killer's SIGKILL, or its own kill)
    only until the broker removes it: a forced removal is a kill of its own. So `gone` comes
    first; a `gone` that fails still leaves the container retired."""
    order: list[str] = []
    backend.remove = lambda container, timeout=30.0: order.append(f"removed {container}")  # type: ignore[method-assign]
    original = backend.start_created

    def start_dying(container: str) -> None:
        original(container)
        in_thread(Agent(backend.agents[container]), lambda agent: (agent.request(), agent.die()))

    backend.start_created = start_dying  # type: ignore[method-assign]
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    with pytest.raises(AgentGone):
        pool.run(
            where("a"), request("c1"), lambda o: None, gone=lambda c: order.append(f"gone {c}")
        )
    assert order == ["gone c-a#1", "removed c-a#1"]

    def failing(container: str) -> None:
        raise OSError("the engine went away")

    with pytest.raises(OSError):
        pool.run(where("a"), request("c2"), lambda o: None, gone=failing)
    assert order[-1] == "removed c-a#2"
    with pytest.raises(AgentGone):  # a fresh container for the project's next compile
        pool.run(where("a"), request("c3"), lambda o: None)
    assert order[-1] == "removed c-a#3"
    pool.close()


def held_removals(backend: FakeBackend, order: list[str]) -> threading.Event:
    """Each removal waits for the event returned, then says so in `order`."""
    release = threading.Event()

    def remove(container: str, timeout: float) -> None:
        assert release.wait(10), "the removal was never let through"
        order.append(f"removed {container} within {timeout:g} s")

    backend.remove = remove  # type: ignore[method-assign]
    return release


def test_a_retired_container_is_removed_after_the_answer_before_the_projects_next_compile(
    backend: FakeBackend,
) -> None:
    """Under gVisor a fork bomb's sandbox took over 30 s to remove on a starved host, after
    its agent had answered (every process of the compile reaped): the client has its answer at
    once; the project's next compile waits for the removal, another project's does not."""
    answering(backend)
    order: list[str] = []
    release = held_removals(backend, order)
    create = backend.create

    def created(name: str, body: Any) -> str:
        order.append(f"created {name}")
        return create(name, body)

    backend.create = created  # type: ignore[method-assign]
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    # Answered while its container's removal waits.
    assert pool.run(where("a"), request("c1"), lambda o: None, finish=lambda a, c: True).status == 0
    again = threading.Thread(target=pool.run, args=(where("a"), request("c2"), lambda o: None))
    again.start()
    assert pool.run(where("b"), request("c3"), lambda o: None).status == 0
    release.set()
    again.join(10)
    assert not again.is_alive()
    # Behind the answer, the engine may take longer than a call's usual 30 s to remove it.
    assert order == ["created c-a", "created c-b", "removed c-a#1 within 120 s", "created c-a"]


def test_the_pools_close_waits_for_a_removal_behind_an_answer(backend: FakeBackend) -> None:
    """The broker's stop leaves no container of its own, one still being removed included."""
    answering(backend)
    order: list[str] = []
    release = held_removals(backend, order)
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    assert pool.run(where("a"), request("c1"), lambda o: None, finish=lambda a, c: True).status == 0
    closing = threading.Thread(target=lambda: (pool.close(), order.append("closed")))
    closing.start()
    release.set()
    closing.join(10)
    assert order == ["removed c-a#1 within 120 s", "closed"]


def test_a_stopped_compiles_container_is_removed_before_its_answer(backend: FakeBackend) -> None:
    """Its stop's caller goes on to the dir (or the broker to its end) at once."""
    order: list[str] = []
    start_created = backend.start_created

    def started(container: str) -> None:
        start_created(container)

        def stopped(agent: Agent) -> None:  # as the agent answers a cancel
            got = agent.request()
            agent.send(line({"id": got["id"], "reason": "cancelled", "signal": 15}))

        in_thread(Agent(backend.agents[container]), stopped)

    def finish(answer: Answer, container: str) -> bool:
        order.append(f"finished: {answer.reason.value}")
        return True

    backend.start_created = started  # type: ignore[method-assign]
    backend.remove = lambda c, timeout: order.append(f"removed {c}")  # type: ignore[method-assign]
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    pool.run(where("a"), request("c1"), lambda o: None, finish=finish)
    order.append("answered")
    assert order == ["finished: cancelled", "removed c-a#1", "answered"]


def test_one_compile_at_a_time_per_project_and_slots_overall(backend: FakeBackend) -> None:
    hold = threading.Event()
    answering(backend, hold)
    pool = Pool(backend, PoolLimits(slots=2, idle=60, lifetime=600, reuse=100))  # type: ignore[arg-type]
    running = threading.Semaphore(0)
    done: list[str] = []

    def compile_in(project: str, n: int) -> None:
        running.release()
        pool.run(where(project), request(f"{project}{n}"), lambda o: None)
        done.append(project)

    threads = [threading.Thread(target=compile_in, args=(p, n))
               for p, n in (("a", 1), ("a", 2), ("b", 1), ("c", 1))]  # fmt: skip
    for t in threads:
        t.start()
    for _ in threads:
        running.acquire()
    deadline = time.monotonic() + 5
    while backend.created < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # room for a third to start, were the limits not held
    assert backend.created == 2  # two slots: two containers, not four; a's second waits
    hold.set()
    for t in threads:
        t.join(10)
    assert sorted(done) == ["a", "a", "b", "c"]
    assert backend.created == 3  # a's two compiles shared its container


def test_the_sweep_takes_the_brokers_containers_only(backend: FakeBackend) -> None:
    backend.listed = [
        {"Id": "a" * 64, "Labels": {COMPILE_LABEL: "1", BROKER_LABEL: "1"}},
        {"Id": "b" * 64, "Labels": {COMPILE_LABEL: "1"}},  # today's runner's: not ours
    ]
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    assert pool.sweep() == ["a" * 12]
    assert backend.removed == ["a" * 64]


def test_the_containers_body_is_the_profile_with_the_agent(tmp_path: Path) -> None:
    place = CompileDir(tmp_path, tmp_path, "proj", 33, 33)
    job = Job(place, ("latexmk", "main.tex"), "texlive:img", {"SOURCE_DATE_EPOCH": "1"})
    limits = Limits(idle=30)
    made = target.target(job, limits, seccomp=None, now=0)
    body = dict(made.body)
    assert made.project == "proj" and made.name.endswith("-agent")
    assert body["Entrypoint"][:2] == ["perl", "-e"] and "not_dumpable" in body["Entrypoint"][2]
    assert body["Cmd"] == [f"{30 + 5:g}", f"{limits.deadlines.lifetime:g}"]
    assert (body["OpenStdin"], body["StdinOnce"], body["AttachStdin"]) == (True, True, True)
    assert body["Labels"][BROKER_LABEL] == "1" and body["Labels"][COMPILE_LABEL] == "1"
    host = body["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] and host["NetworkMode"] == "none"
    assert body["User"] == f"{place.compile_uid}:33"  # the project's own uid, the dir's group
    sent = target.request(job, limits)
    assert sent.argv == job.command and sent.cwd == str(tmp_path)
    assert sent.env["SOURCE_DATE_EPOCH"] == "1" and sent.env["HOME"] == "/tmp"
    assert sent.timeout == limits.timeout
    # Before and after, the agent's tidy hands back what the compile made in its own dir.
    assert sent.tidy == str(tmp_path)
    assert made.directory == place


def test_the_dir_is_shared_before_each_compile_is_sent(
    backend: FakeBackend, shared: list[str]
) -> None:
    sent_after: list[list[str]] = []
    original = backend.start_created

    def start_created(container: str) -> None:
        original(container)
        agent = Agent(backend.agents[container])

        def serve(agent: Agent) -> None:
            while True:
                try:
                    got = agent.request()
                except (AssertionError, OSError, ValueError):
                    return  # the pool let go
                sent_after.append(list(shared))
                agent.send(end(got["id"]))

        in_thread(agent, serve)

    backend.start_created = start_created  # type: ignore[method-assign]
    pool = Pool(backend, LIMITS)  # type: ignore[arg-type]
    pool.run(where("a"), request("c1"), lambda o: None)
    pool.run(where("b"), request("c2"), lambda o: None)
    pool.run(where("a"), request("c3"), lambda o: None)
    assert sent_after == [["a"], ["a", "b"], ["a", "b", "a"]]
