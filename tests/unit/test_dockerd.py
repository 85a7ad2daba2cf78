"""The inner dockerd's command line and the leftovers of an unclean stop, on tmp trees."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from init import config
from init.engine import dockerd
from init.engine.dockerd import EngineLayout
from init.errors import ConfigError


def test_defaults_listen_on_the_unix_socket_only() -> None:
    argv = dockerd.command(EngineLayout())
    assert argv[0] == "dockerd"
    assert argv[argv.index("--host") + 1] == "unix:///var/run/docker.sock"
    assert argv[argv.index("--data-root") + 1] == "/var/lib/docker"
    assert argv[argv.index("--pidfile") + 1] == "/var/run/docker.pid"
    assert not any("tcp://" in a for a in argv)


def test_no_bridge_unless_the_operator_chooses_one() -> None:
    """The inner engine makes no docker0 (a subnet kept in its data root can take the site's
    own network's); an operator's bridge choice in OVERLEAF_INIT_DOCKERD_ARGS stands alone."""
    assert dockerd.command(EngineLayout())[-1] == "--bridge=none"
    for args in ("--bip 10.99.0.1/24", "--bip=10.99.0.1/24", "-b br0", "--fixed-cidr 10.9.0.0/24"):
        layout = dockerd.layout_from_env({config.DOCKERD_ARGS: args})
        argv = dockerd.command(layout)
        assert "--bridge=none" not in argv and argv[-len(args.split()) :] == tuple(args.split())


def test_layout_from_env_and_storage_args(tmp_path: Path) -> None:
    layout = dockerd.layout_from_env(
        {
            config.DOCKER_DATA_ROOT: str(tmp_path / "data"),
            config.DOCKER_EXEC_ROOT: str(tmp_path / "exec"),
            config.DOCKER_SOCKET: str(tmp_path / "d.sock"),
            config.DOCKERD_ARGS: "--bridge=none --iptables=false",
        }
    )
    assert layout.pidfile == tmp_path / "exec.pid"
    argv = dockerd.command(layout, ("--storage-driver", "vfs"))
    assert argv[-4:] == ("--storage-driver", "vfs", "--bridge=none", "--iptables=false")
    spec = dockerd.service_spec(layout)
    assert spec.name == "dockerd" and spec.argv == dockerd.command(layout)


@pytest.mark.parametrize(
    "arg", ["-H tcp://0.0.0.0:2375", "--host=tcp://0.0.0.0:2375", "--data-root /x"]
)
def test_extra_args_cannot_open_tcp_or_move_our_paths(arg: str) -> None:
    with pytest.raises(ConfigError) as caught:
        dockerd.layout_from_env({config.DOCKERD_ARGS: arg})
    assert config.DOCKERD_ARGS in caught.value.problems[0]


def test_relative_paths_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        dockerd.layout_from_env({config.DOCKER_DATA_ROOT: "var/lib/docker"})
    assert "absolute" in caught.value.problems[0]


def fake_process(proc: Path, pid: int, comm: str, state: str = "S") -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "stat").write_text(f"{pid} ({comm}) {state} 1 1 1 0 -1\n")


def layout_in(tmp_path: Path) -> EngineLayout:
    return EngineLayout(
        data_root=tmp_path / "data", exec_root=tmp_path / "exec", socket=tmp_path / "d.sock"
    )


def test_pidfile_of_a_live_dockerd_is_kept(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    fake_process(tmp_path / "proc", 42, "dockerd")
    layout.pidfile.write_text("42\n")
    assert dockerd.find_leftovers(layout, tmp_path / "proc").pidfile is None


@pytest.mark.parametrize(
    ("comm", "state"),
    [("dockerd", "Z"), ("bash", "S"), (None, None)],
    ids=["zombie", "reused", "gone"],
)
def test_pidfile_naming_no_live_dockerd_is_stale(
    tmp_path: Path, comm: str | None, state: str | None
) -> None:
    layout = layout_in(tmp_path)
    (tmp_path / "proc").mkdir()
    if comm is not None and state is not None:
        fake_process(tmp_path / "proc", 42, comm, state)
    layout.pidfile.write_text("42")
    leftovers = dockerd.find_leftovers(layout, tmp_path / "proc")
    assert leftovers.pidfile == layout.pidfile
    dockerd.clear(leftovers)
    assert not layout.pidfile.exists()


def test_socket_nobody_listens_on_is_stale_but_a_live_one_is_kept(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(layout.socket))
    listener.listen(1)
    try:
        assert dockerd.find_leftovers(layout, tmp_path).socket is None
    finally:
        listener.close()
    assert dockerd.find_leftovers(layout, tmp_path).socket == layout.socket


def test_a_regular_file_at_the_socket_path_is_never_removed(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    layout.socket.write_text("not a socket")
    assert dockerd.find_leftovers(layout, tmp_path).paths() == []


def test_an_exec_root_too_long_for_containerds_socket_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        dockerd.layout_from_env({config.DOCKER_EXEC_ROOT: "/tmp/" + "x" * 90})
    (problem,) = caught.value.problems
    assert "longer than 107 bytes" in problem and config.DOCKER_EXEC_ROOT in problem


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_ready_timeout_must_be_positive_seconds(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        dockerd.layout_from_env({config.DOCKERD_READY_TIMEOUT: value})
    assert config.DOCKERD_READY_TIMEOUT in caught.value.problems[0]


def test_ready_timeout_from_env() -> None:
    assert dockerd.layout_from_env({config.DOCKERD_READY_TIMEOUT: "2.5"}).ready_timeout == 2.5
    assert dockerd.layout_from_env({}).ready_timeout == 60.0


def test_the_socket_goes_to_the_service_users_group_unless_the_operator_chose_one() -> None:
    import pwd

    root_gid = str(pwd.getpwnam("root").pw_gid)
    assert dockerd.socket_group_args(EngineLayout(), "root") == ("--group", root_gid)
    assert dockerd.socket_group_args(EngineLayout(), "no-such-user-here") == ()
    chosen = EngineLayout(extra_args=("--group=staff",))
    assert dockerd.socket_group_args(chosen, "root") == ()
    assert dockerd.socket_group_args(EngineLayout(extra_args=("-G", "x")), "root") == ()
