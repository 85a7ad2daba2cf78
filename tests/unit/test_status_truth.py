"""Status that tells the truth: whose document it is (this start of the init or an earlier one),
readiness asked of the engine at the moment of the probe, the engine's self-test, and a status
file that cannot be half-written or leave its temporary file behind. Fake /proc trees and a fake
engine on a unix socket; the real faults (SIGSTOP, containerd killed, a read-only dir) are
tests/integration/test_status_faults.py."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from init import status
from init.core import status_file
from init.core.status_file import Boot, StatusDocument
from init.engine import ready
from init.engine.ready import ReadyRequest
from tests.unit.test_engine_client import FakeEngine, json_answer

BOOT_ID = "6a1c0d7e-boot"


class FakeProc:
    """A /proc with the processes a test names: their start time, PID namespace (a file whose
    inode stands for it: hard links are the same namespace) and NSpid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sys" / "kernel" / "random").mkdir(parents=True)
        (root / "sys" / "kernel" / "random" / "boot_id").write_text(BOOT_ID + "\n")
        self.namespaces = root / "namespaces"
        self.namespaces.mkdir()

    def namespace(self, name: str) -> Path:
        path = self.namespaces / name
        path.touch()
        return path

    def process(self, entry: str, start_time: int, namespace: str, nspid: tuple[int, ...]) -> None:
        where = self.root / entry
        (where / "ns").mkdir(parents=True)
        fields = ["S"] + ["0"] * 18 + [str(start_time), "0", "0"]
        # A command name with a space and a parenthesis, as a process may have.
        (where / "stat").write_text(f"{nspid[0]} (weird) name) {' '.join(fields)}\n")
        (where / "status").write_text("Name:\tx\nNSpid:\t" + "\t".join(map(str, nspid)) + "\n")
        os.link(self.namespace(namespace), where / "ns" / "pid")

    def boot(self, entry: str, pid: int) -> Boot:
        start_time = status_file.start_time_of(self.root / entry)
        assert start_time is not None
        inode = os.stat(self.root / entry / "ns" / "pid").st_ino
        return Boot(pid, start_time, inode, BOOT_ID)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def document(boot: Boot | None, pid: int = 1, **extra: object) -> StatusDocument:
    return StatusDocument(pid=pid, phase="running", started_at=1.0, boot=boot, **extra)  # type: ignore[arg-type]


# -- whose document it is -----------------------------------------------------------------------


def test_the_start_time_is_field_22_whatever_the_command_name(proc: FakeProc) -> None:
    proc.process("1", 4711, "container", (1,))
    assert status_file.start_time_of(proc.root / "1") == 4711
    assert status_file.start_time_of(proc.root / "2") is None


def test_the_running_init_s_own_document_is_its_word(proc: FakeProc) -> None:
    proc.process("1", 500, "container", (1,))
    proc.process("self", 900, "container", (40,))  # `docker exec ... status`, same namespace
    os.unlink(proc.root / "self" / "ns" / "pid")
    os.link(proc.root / "1" / "ns" / "pid", proc.root / "self" / "ns" / "pid")
    assert status_file.writer_problem(document(proc.boot("1", 1)), proc.root) == ""


def test_a_document_left_by_an_earlier_start_is_refused(proc: FakeProc) -> None:
    """A restarted container: PID 1 again, same namespace as the reader, another start time."""
    proc.process("1", 500, "container", (1,))
    proc.process("self", 900, "container", (40,))
    os.unlink(proc.root / "self" / "ns" / "pid")
    os.link(proc.root / "1" / "ns" / "pid", proc.root / "self" / "ns" / "pid")
    earlier = proc.boot("1", 1)
    earlier = Boot(1, 123, earlier.pid_namespace, BOOT_ID)  # the last start's PID 1
    why = status_file.writer_problem(document(earlier), proc.root)
    assert why.startswith("the status is from an earlier start of the init (pid 1 is another")


def test_a_document_from_before_the_machine_restarted_is_refused(proc: FakeProc) -> None:
    proc.process("1", 500, "container", (1,))
    proc.process("self", 900, "container", (40,))
    boot = proc.boot("1", 1)
    before_reboot = Boot(1, boot.start_time, boot.pid_namespace, "another-boot")
    why = status_file.writer_problem(document(before_reboot), proc.root)
    assert why == "the status is from an earlier start of the init, before the machine restarted"


def test_a_reader_outside_the_namespace_finds_the_writer_by_its_namespace(
    proc: FakeProc,
) -> None:
    """Root on the host (or a test): the init is pid 30512 here, pid 1 in its namespace."""
    proc.process("30512", 500, "container", (30512, 1))
    proc.process("1", 3, "host", (1,))  # the host's own PID 1
    proc.process("self", 900, "host-reader", (777,))
    writer = proc.boot("30512", 1)
    assert status_file.writer_problem(document(writer), proc.root) == ""
    gone = Boot(1, 500, writer.pid_namespace + 10_000, BOOT_ID)  # its namespace is no more
    why = status_file.writer_problem(document(gone), proc.root)
    assert why.startswith("the init that wrote the status (pid 1) is not running: the status is")


def test_a_document_naming_no_boot_is_taken_on_its_pid(proc: FakeProc) -> None:
    assert status_file.writer_problem(document(None, pid=os.getpid()), proc.root) == ""
    why = status_file.writer_problem(document(None, pid=2**22 + 1), proc.root)
    assert why == f"the init (pid {2**22 + 1}) is not running"


def test_this_process_s_boot_round_trips_through_the_document(tmp_path: Path) -> None:
    boot = Boot.current()
    assert boot is not None and boot.pid == os.getpid() and boot.start_time > 0
    path = tmp_path / "status.json"
    status_file.write(path, document(boot, pid=os.getpid()))
    read = status.read_all(path)
    assert read.document.boot == boot
    assert read.stale == ""


def test_an_earlier_start_s_document_is_neither_healthy_nor_ready_and_the_text_says_so(
    tmp_path: Path,
) -> None:
    boot = Boot.current()
    assert boot is not None
    path = tmp_path / "status.json"
    earlier = Boot(boot.pid, boot.start_time - 1, boot.pid_namespace, boot.kernel_boot_id)
    status_file.write(path, document(earlier, pid=os.getpid()))
    read = status.read_all(path)
    for what in status.CHECKS:
        passes, why = status.check(read, what, alive=True, ping=lambda _: "")
        assert not passes
        assert why.startswith("the status is from an earlier start of the init")
    assert status.format_text(read).startswith("init: not this start's word: the status is from")


# -- readiness asks the engine ------------------------------------------------------------------


def engine_ready(socket_path: str = "/run/docker.sock") -> status.Status:
    engine = {"mode": "dind", "state": "ready", "ready": True, "socket": socket_path}
    return status.Status.of(document(None, engine=engine))


def test_ready_asks_the_engine_at_the_socket_the_document_names() -> None:
    asked: list[Path] = []

    def answers(path: Path) -> str:
        asked.append(path)
        return ""

    assert status.check(engine_ready(), "ready", ping=answers) == (True, "compiles can run")
    assert asked == [Path("/run/docker.sock")]


def test_an_engine_that_does_not_answer_is_not_ready_with_the_reason() -> None:
    def hung(path: Path) -> str:
        return "does not answer /_ping within 2 s (hung or stopped?)"

    passes, why = status.check(engine_ready(), "ready", ping=hung)
    assert not passes
    assert why == (
        "compiles cannot run: the dind engine does not answer /_ping within 2 s (hung or stopped?)"
    )
    # Liveness is not readiness: a hung engine leaves the site healthy, and is not asked.
    assert status.check(engine_ready(), "healthy", ping=hung)[0]


def test_the_engine_is_not_asked_when_the_document_already_says_not_ready() -> None:
    def never(path: Path) -> str:
        raise AssertionError("asked")

    reason = "self-test: the engine answers its ping but cannot run a container"
    not_ready = {
        "mode": "dind",
        "state": "failed",
        "ready": False,
        "socket": "/s",
        "reason": reason,
    }
    passes, why = status.check(
        status.Status.of(document(None, engine=not_ready)), "ready", ping=never
    )
    assert not passes and "cannot run a container" in why


def test_a_user_who_may_not_use_the_socket_gets_pid_1_s_word() -> None:
    def refused(path: Path) -> str:
        raise PermissionError(13, "Permission denied")

    passes, why = status.check(engine_ready(), "ready", ping=refused)
    assert passes and "not this user's" in why


@pytest.fixture
def silent_engine(tmp_path: Path) -> Iterator[Path]:
    """A socket that accepts and never answers: dockerd under SIGSTOP (the kernel still queues
    connections on its listening socket)."""
    path = tmp_path / "hung.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    yield path
    listener.close()


def test_ping_of_a_hung_engine_ends_at_its_timeout(silent_engine: Path) -> None:
    began = time.monotonic()
    why = ready.ping(silent_engine, timeout=0.3)
    took = time.monotonic() - began
    assert why == "does not answer /_ping within 0.3 s (hung or stopped?)"
    assert 0.3 <= took < 0.6


def test_ping_of_a_socket_nobody_listens_on_says_so(tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # bound, then closed: the file stays, nothing listens
    assert ready.ping(dead) == f"does not listen on {dead} (not running?)"
    assert (
        ready.ping(tmp_path / "none.sock")
        == f"does not listen on {tmp_path}/none.sock (not running?)"
    )


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[FakeEngine]:
    engine = FakeEngine(tmp_path / "d.sock")
    engine.routes[("GET", "/_ping")] = lambda _: (200, b"OK", {"Content-Type": "text/plain"})
    serving = engine.serve()
    next(serving)
    yield engine
    next(serving, None)


def test_ping_of_an_answering_engine_passes(fake_engine: FakeEngine) -> None:
    assert ready.ping(fake_engine.path) == ""


# -- the self-test ---------------------------------------------------------------------------------

NAME = ready.SELF_TEST_NAME


def self_test(engine: FakeEngine, tmp_path: Path, image: str = "texlive:2024") -> ready.ReadyResult:
    request = ReadyRequest(engine.path, tmp_path / "r.json", 5.0, self_test=True, image=image)
    return ready.self_test(request)


def working(engine: FakeEngine) -> None:
    routes = engine.routes
    routes[("DELETE", f"/containers/{NAME}")] = lambda _: json_answer(404, {"message": "none"})
    routes[("POST", "/containers/create")] = lambda _: json_answer(201, {"Id": "c0ffee"})
    routes[("POST", f"/containers/{NAME}/start")] = lambda _: (204, b"", {})
    routes[("POST", f"/containers/{NAME}/wait")] = lambda _: json_answer(200, {"StatusCode": 0})


def test_the_self_test_runs_one_container_of_its_own_and_touches_nothing_else(
    fake_engine: FakeEngine, tmp_path: Path
) -> None:
    working(fake_engine)
    result = self_test(fake_engine, tmp_path)
    assert result.ready, result.error
    seen = [(m, t.split("?")[0].removeprefix("/v1.41")) for m, t, _ in fake_engine.seen]
    assert seen == [
        ("GET", "/_ping"),
        ("DELETE", f"/containers/{NAME}"),  # its own leftover, by its own name
        ("POST", "/containers/create"),
        ("POST", f"/containers/{NAME}/start"),
        ("POST", f"/containers/{NAME}/wait"),
        ("DELETE", f"/containers/{NAME}"),
    ]
    created = json.loads(next(b for m, t, b in fake_engine.seen if t.endswith(f"name={NAME}")))
    assert created["Image"] == "texlive:2024"
    assert created["Labels"] == {ready.SELF_TEST_LABEL: "1"}  # not the compile label: no sweep
    assert created["HostConfig"] == {"NetworkMode": "none"}


def test_an_engine_that_answers_its_ping_but_cannot_start_a_container_fails_the_self_test(
    fake_engine: FakeEngine, tmp_path: Path
) -> None:
    working(fake_engine)
    message = (
        'connection error: desc = "transport: Error while dialing dial unix '
        '/run/docker/containerd/containerd.sock: connect: connection refused": unavailable'
    )
    fake_engine.routes[("POST", f"/containers/{NAME}/start")] = lambda _: json_answer(
        500, {"message": message}
    )
    result = self_test(fake_engine, tmp_path)
    assert not result.ready
    assert result.error == (
        f"the engine answers its ping but cannot run a container (start: {message})"
    )
    assert fake_engine.seen[-1][:2] == ("DELETE", f"/v1.41/containers/{NAME}?force=1&v=1")


def test_an_image_not_there_yet_is_not_the_engine_s_fault(
    fake_engine: FakeEngine, tmp_path: Path
) -> None:
    working(fake_engine)
    fake_engine.routes[("POST", "/containers/create")] = lambda _: json_answer(
        404, {"message": "No such image: texlive:2024"}
    )
    assert self_test(fake_engine, tmp_path).ready


def test_a_hung_engine_fails_the_self_test_at_the_ping(silent_engine: Path, tmp_path: Path) -> None:
    request = ReadyRequest(silent_engine, tmp_path / "r.json", 0.3, self_test=True, image="x")
    result = ready.self_test(request)
    assert not result.ready
    assert result.error == "the engine does not answer /_ping within 0.3 s (hung or stopped?)"


def test_a_self_test_never_sweeps() -> None:
    request = ReadyRequest(Path("/s"), Path("/r"), 10, self_test=True, image="tl")
    assert ReadyRequest.from_argv(request.argv()) == request
    with pytest.raises(SystemExit):
        ReadyRequest.from_argv(["--socket", "/s", "--result", "/r", "--self-test", "--sweep"])


# -- the file itself -----------------------------------------------------------------------------


def test_a_failed_write_leaves_no_temporary_file_and_the_old_status_stands(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    status_file.write(path, document(None, pid=7))
    blocked = tmp_path / "blocked" / "status.json"
    blocked.mkdir(parents=True)  # a directory where the file goes: the replace fails
    (blocked / "x").touch()
    with pytest.raises(OSError):
        status_file.write(blocked, document(None, pid=8))
    assert sorted(p.name for p in blocked.parent.iterdir()) == ["status.json"]
    assert status_file.read(path).pid == 7


def test_clear_earlier_removes_an_earlier_start_s_files_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    left = ["texlive.json", "engine-check.json", "engine-self-test.json", "sibling-check.json",
            ".status.json.1.tmp", ".status.json.37.tmp"]  # fmt: skip
    kept = ["status.json", "shim", "notes.json", ".other.1.tmp"]
    for name in left + kept:
        (tmp_path / name).touch()
    removed = status_file.clear_earlier(path)
    assert sorted(p.name for p in removed) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert status_file.clear_earlier(tmp_path / "none" / "status.json") == []


def test_a_write_that_takes_part_of_the_data_writes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nearly full disk: write(2) takes a part without an error; the rest must follow."""
    real_write = os.write

    def a_little_at_a_time(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", a_little_at_a_time)
    path = tmp_path / "status.json"
    status_file.write(path, document(None, pid=9, message="x" * 100))
    monkeypatch.undo()
    assert status_file.read(path).message == "x" * 100


def test_the_http_probe_answers_as_the_cli_does(tmp_path: Path) -> None:
    from init.httpd import status as http_status

    boot = Boot.current()
    assert boot is not None
    path = tmp_path / "status.json"
    earlier = Boot(boot.pid, boot.start_time + 1, boot.pid_namespace, boot.kernel_boot_id)
    status_file.write(path, document(earlier, pid=os.getpid()))
    read, error = http_status.load(path)
    passes, why = http_status.probe(read, error, "ready")
    assert not passes and why.startswith("the status is from an earlier start of the init")


def test_a_probe_is_bounded_by_the_ping_timeout(silent_engine: Path, tmp_path: Path) -> None:
    """The whole `check ready` against a hung engine: the reason within PING_TIMEOUT (2 s)."""
    path = tmp_path / "status.json"
    engine = {"mode": "dind", "state": "ready", "ready": True, "socket": str(silent_engine)}
    status_file.write(path, document(Boot.current(), pid=os.getpid(), engine=engine))
    began = time.monotonic()
    passes, why = status.check(status.read_all(path), "ready")
    took = time.monotonic() - began
    assert not passes
    assert why.endswith("does not answer /_ping within 2 s (hung or stopped?)")
    assert ready.PING_TIMEOUT <= took < ready.PING_TIMEOUT + 0.5


def test_a_containerd_that_does_not_accept_fails_the_self_test_before_any_container(
    fake_engine: FakeEngine, tmp_path: Path
) -> None:
    working(fake_engine)
    gone = tmp_path / "containerd.sock"
    request = ReadyRequest(
        fake_engine.path, tmp_path / "r.json", 5.0, self_test=True, image="tl", containerd=gone
    )
    result = ready.self_test(request)
    assert not result.ready
    assert result.error == (
        "the engine answers its ping but its containerd does not accept connections on "
        f"{gone} (No such file or directory)"
    )
    assert [m for m, _, _ in fake_engine.seen] == ["GET"]  # no container was made
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(gone))
        listening.listen(1)
        assert ready.self_test(request).ready
