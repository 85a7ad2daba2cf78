"""What the inner engine's start clears (dockerd.find_leftovers), on fake /proc trees.

Kept: a pidfile naming a live process of the right name started since the init began (the
fake tree's `self`), and every socket something listens on. Cleared: the rest, which would
stop dockerd or its containerd from starting again after an unclean stop or a quick restart.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from init.engine import dockerd
from init.engine.dockerd import EngineLayout, Leftovers

INIT_STARTED = 5000  # clock ticks since the machine booted


@pytest.fixture
def base() -> Iterator[Path]:
    # Short: containerd's socket paths must fit a unix socket's 107 bytes.
    with tempfile.TemporaryDirectory(prefix="lo", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def layout(base: Path) -> EngineLayout:
    layout = EngineLayout(data_root=base / "data", exec_root=base / "exec", socket=base / "d.sock")
    layout.containerd_dir.mkdir(parents=True)
    process(base / "proc", "self", "python3", started=INIT_STARTED)
    return layout


def process(
    proc: Path, pid: int | str, comm: str, *, state: str = "S", started: int = INIT_STARTED + 1
) -> None:
    """A fake /proc/<pid>: comm, and stat with its state and start time (field 22)."""
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    middle = " ".join(["0"] * 18)  # fields 4 to 21
    (d / "stat").write_text(f"1 ({comm}) {state} {middle} {started} 0 0\n")


def dead_socket(path: Path) -> None:
    """A socket file nothing listens on any more, as a killed daemon leaves it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def find(layout: EngineLayout, base: Path) -> Leftovers:
    return dockerd.find_leftovers(layout, base / "proc")


def test_nothing_left_nothing_to_clear(layout: EngineLayout, base: Path) -> None:
    assert find(layout, base) == Leftovers()


def test_a_containerd_pidfile_naming_an_unrelated_live_process_goes_with_its_sockets(
    layout: EngineLayout, base: Path
) -> None:
    # The restart's case: pid 21 was containerd in the last boot, a service in this one.
    process(base / "proc", 21, "sh")
    layout.containerd_pidfile.write_text("21")
    for path in layout.containerd_sockets:
        dead_socket(path)
    found = find(layout, base)
    assert found.containerd_pidfile == layout.containerd_pidfile
    assert found.containerd_sockets == layout.containerd_sockets
    assert found.pidfile is None and found.socket is None
    dockerd.clear(found)
    assert not layout.containerd_pidfile.exists()
    assert not any(p.exists() for p in layout.containerd_sockets)
    assert (layout.containerd_dir).is_dir()  # the dir and the rest of it stay


@pytest.mark.parametrize(
    ("comm", "state", "started"),
    [
        ("containerd", "Z", INIT_STARTED + 1),
        ("containerd", "S", INIT_STARTED - 1),
        (None, None, None),
    ],
    ids=["zombie", "from-before-the-init", "gone"],
)
def test_a_containerd_pidfile_naming_no_containerd_of_this_boot_is_stale(
    layout: EngineLayout, base: Path, comm: str | None, state: str, started: int
) -> None:
    if comm is not None:
        process(base / "proc", 21, comm, state=state, started=started)
    layout.containerd_pidfile.write_text("21")
    assert find(layout, base).containerd_pidfile == layout.containerd_pidfile


def test_a_containerd_of_this_boot_keeps_its_pidfile_and_sockets(
    layout: EngineLayout, base: Path
) -> None:
    # dockerd killed -9: its containerd lives on and the next dockerd takes it up again.
    process(base / "proc", 21, "containerd")
    layout.containerd_pidfile.write_text("21")
    dead_socket(layout.containerd_sockets[2])  # even one that refuses: not ours to judge
    assert find(layout, base) == Leftovers()


def test_a_socket_something_listens_on_is_kept(layout: EngineLayout, base: Path) -> None:
    layout.containerd_pidfile.write_text("999")
    live, *dead = layout.containerd_sockets
    for path in dead:
        dead_socket(path)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(live))
        listener.listen(1)
        found = find(layout, base)
    assert found.containerd_sockets == tuple(dead)


def test_containerd_sockets_without_a_pidfile_are_cleared_when_dead(
    layout: EngineLayout, base: Path
) -> None:
    dead_socket(layout.containerd_sockets[0])
    assert find(layout, base) == Leftovers(containerd_sockets=layout.containerd_sockets[:1])


def test_a_dockerd_pidfile_from_before_the_init_is_stale_one_from_this_boot_kept(
    layout: EngineLayout, base: Path
) -> None:
    process(base / "proc", 30, "dockerd", started=INIT_STARTED - 100)
    process(base / "proc", 31, "dockerd", started=INIT_STARTED + 100)
    layout.pidfile.write_text("30")
    assert find(layout, base).pidfile == layout.pidfile
    layout.pidfile.write_text("31")
    assert find(layout, base).pidfile is None


def test_an_unreadable_init_start_time_falls_back_to_name_and_liveness(base: Path) -> None:
    layout = EngineLayout(data_root=base / "data", exec_root=base / "exec", socket=base / "d.sock")
    layout.containerd_dir.mkdir(parents=True)
    process(base / "proc", 21, "containerd", started=1)
    layout.containerd_pidfile.write_text("21")
    assert find(layout, base) == Leftovers()


def test_what_dockerd_writes_is_what_is_looked_for() -> None:
    # As dockerd 20.10.24 and 26.1.5 lay out their exec root (seen by running them).
    layout = EngineLayout(exec_root=Path("/var/run/docker"))
    assert layout.containerd_pidfile == Path("/var/run/docker/containerd/containerd.pid")
    assert [p.name for p in layout.containerd_sockets] == [
        "containerd.sock",
        "containerd.sock.ttrpc",
        "containerd-debug.sock",
    ]
