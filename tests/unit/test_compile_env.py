"""How the services' compiles reach the sandbox: the shim on PATH, or their own docker runner."""

from __future__ import annotations

import subprocess
from pathlib import Path

from init import config
from init.compiles import service_env as compile_env
from init.compiles.contract import SHIMMED_COMMANDS
from init.compiles.environment import with_init_environment


def settings(**environ: str) -> config.Settings:
    return config.load({"SANDBOXED_COMPILES": "true", **environ})


def test_auto_picks_the_shim_unless_the_image_has_a_docker_runner(tmp_path: Path) -> None:
    assert compile_env.choose_runner(settings(), tmp_path) == "shim"
    runner = tmp_path / "overleaf/services/clsi/app/js/DockerRunner.js"
    runner.parent.mkdir(parents=True)
    runner.write_text("")
    assert compile_env.choose_runner(settings(), tmp_path) == "docker"
    forced = settings(OVERLEAF_INIT_COMPILE_RUNNER="shim")
    assert compile_env.choose_runner(forced, tmp_path) == "shim"


def test_the_shim_goes_first_on_path_and_no_switch_reaches_community_edition() -> None:
    env = compile_env.environment(
        settings(ALL_TEX_LIVE_DOCKER_IMAGES="a:1,b:2"), {"PATH": "/usr/bin"}, "shim", Path("/s")
    )
    assert env == {
        "TEX_LIVE_DOCKER_IMAGE": "a:1",
        "ALL_TEX_LIVE_DOCKER_IMAGES": "a:1,b:2",
        "PATH": "/s:/usr/bin",
    }


def test_a_docker_runner_gets_what_server_pro_reads() -> None:
    sibling = settings(
        SANDBOXED_COMPILES_SIBLING_CONTAINERS="true", ALL_TEX_LIVE_DOCKER_IMAGES="a:1,b:2"
    )
    given = {"SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/srv/data/compiles"}
    env = compile_env.environment(sibling, given, "docker", Path("/s"), lambda _: (33, 33))
    assert env["DOCKER_RUNNER"] == env["SANDBOXED_COMPILES"] == "true"
    assert env["SANDBOXED_COMPILES_SIBLING_CONTAINERS"] == "true"
    assert env["ALLOWED_IMAGES"] == "a:1 b:2"
    assert "PATH" not in env


def test_the_shim_scripts_run_the_shim_module_with_their_name(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "$@"\n')
    fake_python.chmod(0o755)
    compile_env.write_shims(tmp_path / "shim", str(fake_python))
    assert sorted(p.name for p in (tmp_path / "shim").iterdir()) == sorted(SHIMMED_COMMANDS)
    out = subprocess.run(
        [tmp_path / "shim" / "latexmk", "-pdf", "a b.tex"], capture_output=True, text=True
    )
    environment = tmp_path / "shim" / "environment.json"
    assert out.stdout == f"-m init.compiles.shim --environment {environment} latexmk -pdf a b.tex\n"


def test_with_a_broker_the_shim_scripts_are_its_isolated_client(tmp_path: Path) -> None:
    import sys

    # A path too long for a unix socket: refused at once (a missing one is waited for 10 s).
    socket_path = tmp_path / "run dir" / ("x" * 120) / "broker.sock"
    compile_env.write_shims(tmp_path / "shim", sys.executable, socket_path)
    done = subprocess.run(
        [tmp_path / "shim" / "latexmk", "-pdf"], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/nonexistent"}, timeout=60,
    )  # fmt: skip
    # The client itself ran (no broker there: its one line, naming the socket).
    assert done.returncode == 69
    assert str(socket_path) in done.stderr and len(done.stderr.splitlines()) == 1
    script = (tmp_path / "shim" / "latexmk").read_text()
    assert f"{sys.executable} -I -S -c" in script


def test_the_init_hands_its_compile_settings_to_the_shim_not_to_the_services(
    tmp_path: Path,
) -> None:
    """The init's own variables never reach the services (Overleaf 5's guards, and the compile
    service refusing SANDBOXED_COMPILES); what a compile needs of them is written beside the
    shims, and the shim reads it under the services' own environment."""
    from init import config
    from init.compiles.environment import read_environment, write_environment

    environ = {
        "PATH": "/usr/bin",
        "SANDBOXED_COMPILES": "true",
        "OVERLEAF_SANDBOXED_COMPILES": "true",
        config.COMPILE_TIMEOUT: "30",
        config.OLD_OWN_PREFIX + "COMPILE_MEMORY": "2g",
    }
    services = config.service_environment(environ)
    assert services == {"PATH": "/usr/bin"}
    write_environment(tmp_path, {config.COMPILE_TIMEOUT: "30", "DOCKER_HOST": "unix:///p.sock"})
    given = read_environment(tmp_path / "environment.json")
    assert with_init_environment(services, given) == {
        "PATH": "/usr/bin",
        config.COMPILE_TIMEOUT: "30",
        "DOCKER_HOST": "unix:///p.sock",
    }
    assert read_environment(tmp_path / "missing.json") == {}


def test_the_old_names_are_read_as_the_new_with_a_notice() -> None:
    from init import config

    old = config.OLD_OWN_PREFIX + "COMPILE_TIMEOUT"
    merged, notices = config.renamed({old: "30"})
    assert merged[config.COMPILE_TIMEOUT] == "30"
    assert notices and old in notices[0] and config.COMPILE_TIMEOUT in notices[0]
    both, said = config.renamed({old: "30", config.COMPILE_TIMEOUT: "60"})
    assert both[config.COMPILE_TIMEOUT] == "60" and "disagree" in said[0]
    assert config.renamed({config.COMPILE_TIMEOUT: "60"})[1] == ()


def test_a_compile_by_hand_in_the_container_gets_what_the_services_got() -> None:
    given = {
        "DOCKER_HOST": "unix:///var/run/docker.sock",
        "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/data/sharelatex_data/data/compiles",
    }
    merged = with_init_environment({"DOCKER_HOST": "unix:///other.sock"}, given)
    assert merged == {
        "DOCKER_HOST": "unix:///other.sock",  # what the caller says wins
        "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/data/sharelatex_data/data/compiles",
    }
    assert with_init_environment({"A": "1"}, {}) == {"A": "1"}
