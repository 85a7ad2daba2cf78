"""The calls of the compile service's own docker runner, as dockerode puts them on the wire
(tests/fixtures/overleaf/docker_runner.py), pass the proxy's policy: a create whose every
option is repeated in the query and whose body names it, an attach whose options come as a
body too. What the engine gets is still what was judged."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from init.proxy.binds import Root
from init.proxy.decision import Answer, Refused
from init.proxy.policy import Container, Facts, decide
from init.proxy.route import parse
from init.proxy.settings import ProxyConfig
from tests.fixtures.overleaf.docker_runner import DockerRunner, RunnerSettings, node_querystring

COMPILE = "c" * 64
IMAGE = "sharelatex-init/texlive:bookworm"


class CompileFacts(Facts):
    def container(self, name: str) -> Container | None:
        return Container(COMPILE, True)

    def exec_container(self, exec_id: str) -> str | None:
        return None


@pytest.fixture
def config(tmp_path: Path) -> ProxyConfig:
    (tmp_path / "compiles" / "p1").mkdir(parents=True)
    root = PurePosixPath(tmp_path / "compiles")
    return ProxyConfig(
        listen=tmp_path / "p.sock", engine=tmp_path / "d.sock", images=(IMAGE,),
        roots=(Root(root, root),),
    )  # fmt: skip


def runner_options(config: ProxyConfig) -> dict[str, object]:
    settings = RunnerSettings.from_env(
        {
            "SANDBOXED_COMPILES": "true",
            "SANDBOXED_COMPILES_HOST_DIR_COMPILES": str(config.roots[0].host),
            "TEXLIVE_IMAGE": IMAGE,
            "TEXLIVE_IMAGE_USER": "33:33",
        }
    )
    volumes = {f"{config.roots[0].host}/p1": "/compile"}
    options = DockerRunner(settings).options(
        ["latexmk", "-cd", "/compile/main.tex"], IMAGE, volumes, 60000, {}, "standard"
    )
    return {**options, "name": "project-p1-0123"}


def test_the_runners_create_passes_with_only_the_name_forwarded_in_the_query(
    config: ProxyConfig,
) -> None:
    options = runner_options(config)
    query = node_querystring(options)
    assert query.count("Cmd=") == 3 and query.count("Env=") == 3  # one key per item
    forward = decide(
        parse("POST", "/containers/create?" + query),
        json.dumps(options).encode(),
        False,
        config,
        CompileFacts(),
        now=1000.0,
    )
    assert forward.target == "/containers/create?name=project-p1-0123"
    sent = json.loads(forward.body or b"")
    assert "name" not in sent and "Name dropped" in forward.rewritten
    assert sent["User"] == "33:33" and sent["Cmd"] == options["Cmd"]
    host = sent["HostConfig"]
    assert (host["NetworkMode"], host["ReadonlyRootfs"], host["CapDrop"]) == ("none", True, ["ALL"])
    assert host["Memory"] == config.limits.memory and "Memory dropped" in forward.rewritten
    assert host["Binds"] == [f"{config.roots[0].host}/p1:/compile:rw"]
    assert host["Ulimits"] == [{"Name": "cpu", "Soft": 65, "Hard": 70}]  # its own, kept
    assert host["SecurityOpt"][1].startswith("seccomp=")


def test_the_runners_attach_passes_and_its_echoed_options_are_not_forwarded(
    config: ProxyConfig,
) -> None:
    options = {"stdout": 1, "stderr": 1, "stream": 1}
    forward = decide(
        parse("POST", f"/containers/x/attach?{node_querystring(options)}"),
        json.dumps(options).encode(),
        False,
        config,
        CompileFacts(),
    )
    assert forward.body is None and forward.stream
    assert forward.target == f"/containers/{COMPILE}/attach?stdout=1&stderr=1&stream=1"


@pytest.mark.parametrize(
    "payload",
    [
        {"HostConfig": {"Privileged": True}},  # an old client's start
        {"stream": 1, "Binds": ["/:/host"]},
        {"stream": {"nested": 1}},
    ],
)
def test_a_body_that_is_not_echoed_options_is_still_refused(
    config: ProxyConfig, payload: dict[str, object]
) -> None:
    with pytest.raises(Refused) as refused:
        decide(
            parse("POST", "/containers/x/start"),
            json.dumps(payload).encode(),
            False,
            config,
            CompileFacts(),
        )
    assert "takes no body" in refused.value.reason


def test_the_runners_inspect_may_retire_a_stale_container(config: ProxyConfig) -> None:
    forward = decide(parse("GET", "/containers/x/json"), b"", False, config, CompileFacts())
    assert forward.answer is Answer.RETIRE_STALE
