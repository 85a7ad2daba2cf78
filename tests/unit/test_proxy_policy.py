"""The allow-list: the calls compile runners make, on compile containers only."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from init.engine.client import COMPILE_LABEL
from init.proxy import answers
from init.proxy.binds import Root
from init.proxy.decision import Answer, Forward, Missing, Refused
from init.proxy.policy import Container, Facts, decide
from init.proxy.route import parse
from init.proxy.settings import ProxyConfig

COMPILE = "c" * 64
SITE = "5" * 64
CONTAINERS = {
    "proj": Container(COMPILE, True),
    COMPILE: Container(COMPILE, True),
    "ccc": Container(COMPILE, True),
    "site": Container(SITE, False),
    SITE: Container(SITE, False),
}
EXECS = {"e1": COMPILE, "e2": SITE}


class FakeFacts(Facts):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def container(self, name: str) -> Container | None:
        self.asked.append(name)
        return CONTAINERS.get(name)

    def exec_container(self, exec_id: str) -> str | None:
        return EXECS.get(exec_id)


@pytest.fixture
def config(tmp_path: Path) -> ProxyConfig:
    return ProxyConfig(
        listen=tmp_path / "p.sock",
        engine=tmp_path / "d.sock",
        images=("busybox:test",),
        roots=(Root(PurePosixPath(tmp_path), PurePosixPath(tmp_path)),),
    )


def call(
    config: ProxyConfig, method: str, target: str, payload: bytes = b"", upgrade: bool = False
) -> Forward:
    return decide(parse(method, target), payload, upgrade, config, FakeFacts())


def refused(config: ProxyConfig, method: str, target: str, payload: bytes = b"") -> Refused:
    with pytest.raises(Refused) as caught:
        call(config, method, target, payload)
    return caught.value


@pytest.mark.parametrize(
    ("method", "target", "sent", "answer"),
    [
        ("HEAD", "/_ping", "/_ping", Answer.PASS),
        ("GET", "/v1.41/version", "/v1.41/version", Answer.PASS),
        ("GET", "/v1.41/info?x=1", "/v1.41/info", Answer.TRIM_INFO),
        (
            "GET",
            "/v1.41/images/json?all=1&evil=1",
            "/v1.41/images/json?all=1",
            Answer.FILTER_IMAGES,
        ),
        ("GET", "/images/busybox:test/json", "/images/busybox:test/json", Answer.PASS),
        ("GET", "/containers/json?all=1", "/containers/json?all=1", Answer.FILTER_CONTAINERS),
        ("GET", "/containers/proj/json", f"/containers/{COMPILE}/json", Answer.RETIRE_STALE),
        ("POST", "/v1.41/containers/ccc/start", f"/v1.41/containers/{COMPILE}/start", Answer.PASS),
        (
            "POST",
            "/containers/proj/wait?condition=next-exit",
            f"/containers/{COMPILE}/wait?condition=next-exit",
            Answer.PASS,
        ),
        (
            "GET",
            "/containers/proj/logs?stdout=1&follow=1",
            f"/containers/{COMPILE}/logs?stdout=1&follow=1",
            Answer.PASS,
        ),
        (
            "POST",
            "/containers/proj/kill?signal=KILL",
            f"/containers/{COMPILE}/kill?signal=KILL",
            Answer.PASS,
        ),
        ("POST", "/containers/proj/stop?t=1", f"/containers/{COMPILE}/stop?t=1", Answer.PASS),
        (
            "DELETE",
            "/containers/proj?force=1&v=1",
            f"/containers/{COMPILE}?force=1&v=1",
            Answer.PASS,
        ),
        ("GET", "/exec/e1/json", "/exec/e1/json", Answer.PASS),
    ],
)
def test_the_calls_of_compile_runners_pass(
    config: ProxyConfig, method: str, target: str, sent: str, answer: Answer
) -> None:
    forward = call(config, method, target)
    assert (forward.method, forward.target, forward.answer) == (method, sent, answer)


def test_a_container_is_addressed_by_its_full_id_once_looked_up(config: ProxyConfig) -> None:
    facts = FakeFacts()
    forward = decide(
        parse("POST", "/containers/proj/attach?stream=1&stdout=1"), b"", True, config, facts
    )
    assert forward.target == f"/containers/{COMPILE}/attach?stream=1&stdout=1"
    assert forward.stream and forward.upgrade and forward.body is None
    assert facts.asked == ["proj"]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/images/create?fromImage=alpine"),
        ("POST", "/build"),
        ("POST", "/images/load"),
        ("POST", "/images/busybox:test/tag?repo=x"),
        ("DELETE", "/images/busybox:test"),
        ("POST", "/volumes/create"),
        ("GET", "/volumes"),
        ("POST", "/networks/create"),
        ("POST", "/plugins/pull?remote=evil"),
        ("POST", "/swarm/init"),
        ("POST", "/secrets/create"),
        ("GET", "/configs"),
        ("POST", "/containers/proj/update"),
        ("POST", "/containers/proj/rename?name=x"),
        ("PUT", "/containers/proj/archive?path=/"),
        ("GET", "/containers/proj/archive?path=/"),
        ("GET", "/containers/proj/export"),
        ("POST", "/commit?container=proj"),
        ("POST", "/containers/prune"),
        ("POST", "/session"),
        ("GET", "/containers/proj/start"),  # the right path, the wrong method
        ("POST", "/Containers/create"),
        ("GET", "/system/df"),
        ("POST", "/auth"),
        ("GET", "/distribution/alpine/json"),
    ],
)
def test_everything_else_is_refused(config: ProxyConfig, method: str, target: str) -> None:
    assert "is not a call compile runners make" in refused(config, method, target).reason


def test_images_other_than_the_allowed_are_not_inspected(config: ProxyConfig) -> None:
    assert "not an allowed" in refused(config, "GET", "/images/alpine/json").reason


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/containers/site/json"),
        ("POST", "/containers/site/attach?stdin=1&stream=1"),
        ("DELETE", f"/containers/{SITE}?force=1"),
        ("POST", "/containers/site/kill"),
        ("GET", "/containers/site/logs?stdout=1"),
        ("POST", "/containers/site/exec"),
        ("POST", "/exec/e2/start"),
        ("GET", '/events?filters={"container":["site"]}'),
    ],
)
def test_other_containers_are_out_of_reach(config: ProxyConfig, method: str, target: str) -> None:
    assert "is not a compile container" in refused(config, method, target, b"{}").reason


def test_a_missing_container_or_exec_is_the_engines_404(config: ProxyConfig) -> None:
    for method, target in (("GET", "/containers/nope/json"), ("POST", "/exec/nope/start")):
        with pytest.raises(Missing) as missing:
            call(config, method, target)
        assert missing.value.status == 404 and missing.value.message().startswith("No such")


def test_a_start_with_a_body_is_refused(config: ProxyConfig) -> None:
    body = json.dumps({"HostConfig": {"Privileged": True}}).encode()
    assert "takes no body" in refused(config, "POST", "/containers/proj/start", body).reason
    assert call(config, "POST", "/containers/proj/start", b"{}").body is None


@pytest.mark.parametrize(
    ("exec_body", "why"),
    [
        ({"Cmd": ["sh"], "Privileged": True}, "privileged exec"),
        ({"Cmd": ["sh"], "User": "root"}, "is root"),
        ({"Cmd": ["sh"], "User": "0"}, "is root"),
        ({"Cmd": ["sh"], "privileged": True}, "privileged exec"),
        ({"Cmd": ["sh"], "Frob": 1}, "not allowed in an exec"),
    ],
)
def test_exec_bodies_are_checked(
    config: ProxyConfig, exec_body: dict[str, object], why: str
) -> None:
    assert (
        why
        in refused(config, "POST", "/containers/proj/exec", json.dumps(exec_body).encode()).reason
    )


def test_an_exec_into_a_compile_container_passes_rewritten(config: ProxyConfig) -> None:
    sent = {"cmd": ["latexmk"], "User": "33:33", "AttachStdout": True, "Privileged": False}
    forward = call(config, "POST", "/containers/proj/exec", json.dumps(sent).encode())
    assert forward.target == f"/containers/{COMPILE}/exec"
    assert json.loads(forward.body or b"") == {
        "Cmd": ["latexmk"],
        "User": "33:33",
        "AttachStdout": True,
    }
    assert forward.answer is Answer.REMEMBER_EXEC
    start = call(config, "POST", "/exec/e1/start", b'{"Detach": false, "Tty": false}', upgrade=True)
    assert (
        start.stream
        and start.upgrade
        and json.loads(start.body or b"") == {"Detach": False, "Tty": False}
    )


def test_events_only_for_named_compile_containers(config: ProxyConfig) -> None:
    filters = json.dumps({"container": ["proj"], "event": ["oom"]})
    forward = call(config, "GET", f"/events?since=1&until=2&filters={filters}")
    query = parse("GET", forward.target).param("filters") or ""
    assert json.loads(query) == {"container": [COMPILE], "event": ["oom"]}
    assert "named compile containers" in refused(config, "GET", "/events").reason
    assert (
        "named compile containers"
        in refused(config, "GET", '/events?filters={"type":["container"]}').reason
    )


def test_create_is_held_to_the_profile(config: ProxyConfig) -> None:
    sent = {"Image": "busybox:test", "User": "1000", "HostConfig": {"NetworkMode": "bridge"}}
    forward = call(
        config, "POST", "/v1.41/containers/create?name=x&evil=1", json.dumps(sent).encode()
    )
    assert forward.target == "/v1.41/containers/create?name=x"
    assert forward.answer is Answer.REMEMBER_CONTAINER
    assert json.loads(forward.body or b"")["HostConfig"]["NetworkMode"] == "none"
    assert "NetworkMode bridge -> none" in forward.rewritten
    assert refused(config, "POST", "/containers/create", b"").status == 400


# -- what callers see of the listings -------------------------------------------------------------


def test_info_is_trimmed_of_the_host() -> None:
    info = {
        "ServerVersion": "20.10",
        "Name": "prod-host-7",
        "Labels": ["secret"],
        "NCPU": 4,
        "DockerRootDir": "/var/lib/docker",
        "Runtimes": {"runc": {"path": "/usr/bin/runc"}},
        "Swarm": {"NodeID": "x"},
        "RegistryConfig": {},
        "HttpProxy": "http://u:p@proxy",
    }
    assert answers.trim_info(info) == {
        "ServerVersion": "20.10",
        "NCPU": 4,
        "Runtimes": {"runc": {}},
    }


def test_only_allowed_images_and_compile_containers_are_listed() -> None:
    images = [
        {
            "Id": "a",
            "RepoTags": ["busybox:test", "busybox:other"],
            "RepoDigests": ["busybox@sha256:1", "x@sha256:2"],
        },
        {"Id": "b", "RepoTags": ["overleaf/sharelatex:5"], "RepoDigests": []},
    ]
    assert answers.filter_images(images, ("busybox:test",)) == [
        {"Id": "a", "RepoTags": ["busybox:test"], "RepoDigests": ["busybox@sha256:1"]}
    ]
    listed = [{"Id": "a", "Labels": {COMPILE_LABEL: "1"}}, {"Id": "b", "Labels": None}, {"Id": "c"}]
    assert answers.filter_containers(listed) == [{"Id": "a", "Labels": {COMPILE_LABEL: "1"}}]
