"""The engine boundary against canned answers: the light client's HTTP over a unix socket (a fake
engine that answers each request from a table, as docker-py's fake_api does), and the mapping of
the SDK's exceptions into the error tree. The real engine is the integration tests'."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_plus

import docker.errors
import pytest
import requests.exceptions

from init.engine import client
from init.engine.client import (
    ApiError,
    Conflict,
    ContainerGone,
    DockerBackend,
    EngineRefused,
    EngineUnreachable,
    ImageMissing,
    NotFound,
)

Answer = tuple[int, bytes, dict[str, str]]


def json_answer(status: int, document: object) -> Answer:
    return status, json.dumps(document).encode(), {"Content-Type": "application/json"}


@dataclass
class FakeEngine:
    """A unix socket that answers `METHOD path` (without the version prefix or query) from
    `routes`, and records every request it got (method, target, body)."""

    path: Path
    routes: dict[tuple[str, str], Callable[[bytes], Answer]] = field(default_factory=dict)
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)

    def serve(self) -> Iterator[None]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    self._answer(conn)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            listener.close()

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = next(
            (int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k == "Content-Length"),
            0,
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.seen.append((method, target, body))
        path = target.split("?")[0].removeprefix(f"/v{client.API_VERSION}")
        handler = self.routes.get((method, path))
        status, payload, headers = handler(body) if handler else json_answer(404, {"message": "?"})
        if headers.get("Transfer-Encoding") == "chunked":
            framed = b"".join(
                f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (payload[:3], payload[3:])
            )
            payload = framed + b"0\r\n\r\n"
        else:
            headers = {**headers, "Content-Length": str(len(payload))}
        head_out = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        conn.sendall(head_out.encode() + b"\r\n" + payload)


@pytest.fixture
def fake_engine(tmp_path: Path) -> Iterator[FakeEngine]:
    engine = FakeEngine(tmp_path / "d.sock")
    serving = engine.serve()
    next(serving)
    yield engine
    next(serving, None)


def backend(engine: FakeEngine) -> DockerBackend:
    return DockerBackend(f"unix://{engine.path}", exec_timeout=5, expiry_grace=5, environ={})


def test_a_call_decodes_json_and_an_error_answer_is_refused_by_meaning(
    fake_engine: FakeEngine,
) -> None:
    fake_engine.routes[("GET", "/containers/json")] = lambda body: json_answer(200, [{"Id": "a"}])
    assert backend(fake_engine).call("GET", "/containers/json") == [{"Id": "a"}]
    with pytest.raises(ApiError) as caught:
        backend(fake_engine).call("GET", "/nothing")
    assert caught.value.status == 404 and isinstance(caught.value, EngineRefused)


def test_a_chunked_answer_is_joined(fake_engine: FakeEngine) -> None:
    body = json.dumps({"Id": "abcdef"}).encode()
    fake_engine.routes[("GET", "/x")] = lambda _: (200, body, {"Transfer-Encoding": "chunked"})
    assert backend(fake_engine).call("GET", "/x") == {"Id": "abcdef"}


def test_start_removes_a_leftover_of_the_same_name_and_says_when_the_image_is_missing(
    fake_engine: FakeEngine,
) -> None:
    creates: list[int] = []

    def create(body: bytes) -> Answer:
        creates.append(1)
        if len(creates) == 1:
            return json_answer(409, {"message": "name in use"})
        return json_answer(201, {"Id": "c1"})

    fake_engine.routes[("GET", "/containers/json")] = lambda _: json_answer(200, [])
    fake_engine.routes[("POST", "/containers/create")] = create
    fake_engine.routes[("DELETE", "/containers/p1")] = lambda _: (204, b"", {})
    fake_engine.routes[("POST", "/containers/c1/start")] = lambda _: (204, b"", {})
    assert backend(fake_engine).start("p1", {"Image": "tl"}) == "c1"
    methods = [(m, t.split("?")[0]) for m, t, _ in fake_engine.seen]
    assert ("DELETE", f"/v{client.API_VERSION}/containers/p1") in methods
    assert json.loads(fake_engine.seen[-2][2]) == {"Image": "tl"}  # the body as given

    fake_engine.routes[("POST", "/containers/create")] = lambda _: json_answer(
        404, {"message": "No such image: tl:1"}
    )
    with pytest.raises(ImageMissing):
        backend(fake_engine).start("p2", {"Image": "tl:1"})


def test_an_exec_into_a_container_that_is_gone_is_said_so(fake_engine: FakeEngine) -> None:
    fake_engine.routes[("POST", "/containers/c9/exec")] = lambda _: json_answer(
        409, {"message": "container c9 is not running"}
    )
    with pytest.raises(ContainerGone):
        backend(fake_engine).exec("c9", ["true"], "1000:1000", "/w", {})


def test_an_exec_streams_its_frames_then_its_exit_status(fake_engine: FakeEngine) -> None:
    frames = b"".join(struct.pack(">BxxxI", 1, len(p)) + p for p in (b"hello ", b"world\n"))
    fake_engine.routes[("POST", "/containers/c1/exec")] = lambda _: json_answer(201, {"Id": "e1"})
    fake_engine.routes[("POST", "/exec/e1/start")] = lambda _: (200, frames, {})
    fake_engine.routes[("GET", "/exec/e1/json")] = lambda _: json_answer(
        200, {"Running": False, "ExitCode": 12}
    )
    execution = backend(fake_engine).exec("c1", ["latexmk"], "33:33", "/w", {"A": "1"})
    assert b"".join(execution.stream()) == b"hello world\n"
    assert execution.exit_code() == 12
    sent = json.loads(next(b for m, t, b in fake_engine.seen if t.endswith("/containers/c1/exec")))
    assert (sent["User"], sent["WorkingDir"], sent["Env"]) == ("33:33", "/w", ["A=1"])


def test_the_sweep_removes_ended_and_expired_compile_containers_only(
    fake_engine: FakeEngine,
) -> None:
    now = 10_000.0
    listed = [
        {"Id": "ended" + "0" * 59, "State": "exited", "Labels": {}},
        {"Id": "expired" + "0" * 57, "State": "running", "Labels": {client.EXPIRES_LABEL: "100"}},
        {"Id": "alive" + "0" * 59, "State": "running", "Labels": {client.EXPIRES_LABEL: "20000"}},
        {"Id": "starting" + "0" * 56, "State": "created", "Created": now - 5, "Labels": {}},
    ]
    fake_engine.routes[("GET", "/containers/json")] = lambda _: json_answer(200, listed)
    for entry in listed:
        fake_engine.routes[("DELETE", f"/containers/{entry['Id']}")] = lambda _: (204, b"", {})
    removed = backend(fake_engine).sweep_expired(now=now)
    assert removed == ["ended0000000", "expired00000"]
    query = next(t for m, t, _ in fake_engine.seen if m == "GET").split("?", 1)[1]
    assert "sharelatex-init.compile" in query.replace("%22", '"').replace("%2E", ".")


def test_an_ended_containers_events_are_read_once_the_engine_has_seen_the_end(
    fake_engine: FakeEngine,
) -> None:
    """Its agent's stream closed before the engine heard of the OOM kill: the events are read
    only once the engine's wait (condition not-running) has answered."""
    order: list[str] = []

    def wait(body: bytes) -> Answer:
        order.append("wait")
        return json_answer(200, {"StatusCode": 137})

    def events(body: bytes) -> Answer:
        order.append("events")
        return 200, b'{"status":"oom","id":"c1","Action":"oom"}\n', {}

    fake_engine.routes[("POST", "/containers/c1/wait")] = wait
    fake_engine.routes[("GET", "/events")] = events
    end = backend(fake_engine).ended("c1", since=100.0)
    assert end == client.ContainerEnd(oom_event=True, killed=False, status=137)
    assert end.oom_killed and order == ["wait", "events"]
    waited = next(t for m, t, _ in fake_engine.seen if m == "POST")
    assert waited.endswith("/containers/c1/wait?condition=not-running")
    asked = unquote_plus(next(t for m, t, _ in fake_engine.seen if m == "GET"))
    assert '"container": ["c1"]' in asked and '"event": ["oom", "kill"]' in asked
    order.clear()
    assert backend(fake_engine).oom_killed("c1", since=100.0)  # still running: no wait
    assert order == ["events"]


@pytest.mark.parametrize(
    ("status", "events", "oom_killed"),
    [
        # containerd dropped the OOM event (the cgroup gone first): a SIGKILL nobody sent.
        (137, b"", True),
        (137, b'{"status":"kill","Action":"kill"}\n', False),  # `docker kill`, a stop
        (1, b"", False),
        (0, b"", False),
        (None, b"", False),  # the engine did not say how it ended
        (None, b'{"status":"oom","Action":"oom"}\n', True),
        (137, b"not json\n{}\n[]\n", True),
    ],
)
def test_an_ended_container_was_oom_killed_by_its_event_or_a_sigkill_the_engine_did_not_send(
    fake_engine: FakeEngine, status: int | None, events: bytes, oom_killed: bool
) -> None:
    answer = json_answer(200, {"StatusCode": status}) if status is not None else (404, b"", {})
    fake_engine.routes[("POST", "/containers/c1/wait")] = lambda _: answer
    fake_engine.routes[("GET", "/events")] = lambda _: (200, events, {})
    end = backend(fake_engine).ended("c1", since=100.0)
    assert end.status == status
    assert end.oom_killed is oom_killed


def test_a_wait_the_engine_never_answers_ends_at_its_timeout(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "mute.sock"))
    listener.listen(4)  # accepts, never answers
    try:
        mute = DockerBackend(f"unix://{tmp_path}/mute.sock", 5, 5, environ={})
        began = time.monotonic()
        mute.wait_ended("c1", timeout=0.5)
        assert 0.5 <= time.monotonic() - began < 3.0
    finally:
        listener.close()


def test_an_engine_that_is_not_there_is_unreachable(tmp_path: Path) -> None:
    gone = DockerBackend(f"unix://{tmp_path}/none.sock", 5, 5, environ={})
    with pytest.raises(EngineUnreachable) as caught:
        gone.call("GET", "/_ping")
    assert "did not answer GET /_ping" in str(caught.value) and caught.value.fix
    long_id = "0123456789ab" + "f" * 52
    with pytest.raises(EngineUnreachable) as caught:
        gone.remove(long_id)
    # Which call, its id as `docker ps` shows it (a full run's "did not answer: timed out"
    # after a runsc fork bomb could not say which).
    said = str(caught.value)
    assert "did not answer DELETE /containers/0123456789ab: " in said and long_id not in said


def test_plain_tcp_is_refused_and_only_unix_or_tls_is_taken() -> None:
    from init.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        client.connector("tcp://10.0.0.1:2375", {})
    assert "DOCKER_TLS_VERIFY=1" in caught.value.problems[0]
    with pytest.raises(ConfigError):
        client.connector("ssh://host", {})


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (docker.errors.ImageNotFound("No such image"), ImageMissing),
        (docker.errors.NotFound("No such container"), NotFound),
        (docker.errors.APIError("in use", response=None), EngineRefused),
        (requests.exceptions.ConnectionError("refused"), EngineUnreachable),
        (OSError(28, "No space left on device"), EngineUnreachable),
    ],
)
def test_the_sdks_errors_are_mapped_once_by_meaning(
    raised: Exception, expected: type[Exception]
) -> None:
    with pytest.raises(expected) as caught, client.mapped("inspect of x"):
        raise raised
    assert str(caught.value).startswith("inspect of x: ")


def test_a_409_from_the_sdk_is_a_conflict() -> None:
    class Answer409:
        status_code = 409
        reason = "Conflict"
        url = "http://docker/containers/x"

        def json(self) -> dict[str, str]:
            return {"message": "removal in progress"}

    with pytest.raises(Conflict), client.mapped("removal of x"):
        raise docker.errors.APIError("conflict", response=Answer409())  # type: ignore[arg-type]


def test_connect_error_tells_a_dead_socket_from_a_live_one(tmp_path: Path) -> None:
    import errno

    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    assert client.connect_error(path) is None
    listener.close()  # the file stays, nobody listens: what a killed engine leaves
    assert client.connect_error(path) == errno.ECONNREFUSED
    assert client.connect_error(tmp_path / "missing.sock") == errno.ENOENT
