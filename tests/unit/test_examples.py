"""The examples users copy must agree with what the init accepts and needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from init import commandline, config
from init.config import Mode

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def compose(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    service: dict[str, Any] = document["services"]["sharelatex"]
    return service


def seconds(text: str) -> int:
    assert text.endswith("s"), text
    return int(text[:-1])


def volumes(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path"""
    return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}


def test_sibling_compose_is_valid_and_its_host_dir_matches_its_data_volume() -> None:
    service = compose("docker-compose.sibling.yml")
    env = {k: str(v) for k, v in service["environment"].items()}
    settings = config.load(env)
    assert settings.mode is Mode.SIBLING
    mounts = volumes(service)
    assert mounts["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert settings.host_dir_compiles == Path(mounts["/var/lib/overleaf"]) / "data/compiles"
    assert "privileged" not in service


def test_dind_compose_is_privileged_with_a_volume_for_the_engine() -> None:
    service = compose("docker-compose.dind.yml")
    env = {k: str(v) for k, v in service["environment"].items()}
    assert config.load(env).mode is Mode.DIND
    assert service["privileged"] is True
    assert "/var/lib/docker" in volumes(service)
    assert "/var/run/docker.sock" not in volumes(service)


@pytest.mark.parametrize("name", ["docker-compose.sibling.yml", "docker-compose.dind.yml"])
def test_compose_waits_longer_than_the_init(name: str) -> None:
    service = compose(name)
    env = service["environment"]
    needed = int(env["KILL_PROCESS_TIMEOUT"]) + int(env["KILL_ALL_PROCESSES_TIMEOUT"])
    assert seconds(service["stop_grace_period"]) > needed


def test_kubernetes_pod_is_privileged_probes_exist_and_grace_is_longer() -> None:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yml").read_text()))
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert config.load(env).mode is Mode.DIND
    assert container["securityContext"]["privileged"] is True
    assert "/var/lib/docker" in [m["mountPath"] for m in container["volumeMounts"]]
    needed = int(env["KILL_PROCESS_TIMEOUT"]) + int(env["KILL_ALL_PROCESSES_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > needed
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "sharelatex-init"
        # The CLI accepts the probe's arguments as they are.
        options = commandline.parser().parse_args(command[1:])
        assert options.command == "status" and options.check in ("ready", "healthy")
