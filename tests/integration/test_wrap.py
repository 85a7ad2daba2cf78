"""Wrap mode, `sharelatex-init -- CMD`, as tini and dumb-init users expect it.

Every case runs twice: as PID 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`),
and as a plain child of the test, where the init registers as child subreaper.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import INIT, PYTHON, Running, cmdlines, wait_for, write_script

pytestmark = pytest.mark.root

Start = Callable[..., Running]
UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}
FORWARDED = sorted(set(range(1, 32)) - UNCATCHABLE - {signal.SIGCHLD})

# A child that records each signal it gets, one number a line, and exits 0 once told to by a
# file (so that no signal in the list has to mean "stop").
RECORDER = """
import os, signal, sys, time
record, ready = sys.argv[1], sys.argv[2]
def handler(signum, frame):
    with open(record, "a") as f:
        f.write(f"{signum}\\n")
for s in range(1, 32):
    if s not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(s, handler)
open(ready, "w").write(str(os.getpid()))
while not os.path.exists(ready + ".exit"):
    time.sleep(0.02)
"""


@pytest.fixture(params=["pid1", "subreaper"])
def as_pid1(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "pid1")


def wrap(
    start: Start, as_pid1: bool, command: Sequence[str], *options: str, cwd: Path | None = None
) -> Running:
    return start([*INIT, *options, "--", *command], pid1=as_pid1, cwd=cwd)


def numbers(path: Path) -> list[int]:
    return [int(n) for n in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("code", [0, 3, 42])
def test_the_exit_status_passes_through(start: Start, as_pid1: bool, code: int) -> None:
    init = wrap(start, as_pid1, ["sh", "-c", f"exit {code}"])
    assert init.wait() == code


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1])
def test_a_child_killed_by_signal_n_gives_128_plus_n(
    start: Start, as_pid1: bool, signum: int
) -> None:
    init = wrap(start, as_pid1, ["sh", "-c", f"kill -{int(signum)} $$"])
    assert init.wait() == 128 + signum


def test_every_catchable_signal_is_forwarded(start: Start, as_pid1: bool, tmp_path: Path) -> None:
    record, ready = tmp_path / "record", tmp_path / "ready"
    init = wrap(start, as_pid1, [PYTHON, "-c", RECORDER, str(record), str(ready)])
    wait_for(ready.exists, 10, "the child's handlers")
    # One at a time: standard signals do not queue, so two of the same could merge into one.
    for signum in FORWARDED:
        init.signal(signum)
        wait_for(
            lambda s=signum: s in numbers(record), 5, f"{signal.Signals(signum).name} forwarded"
        )
    (tmp_path / "ready.exit").touch()
    assert init.wait() == 0
    assert numbers(record) == FORWARDED


def test_sigchld_is_not_forwarded(start: Start, as_pid1: bool, tmp_path: Path) -> None:
    record, ready = tmp_path / "record", tmp_path / "ready"
    init = wrap(start, as_pid1, [PYTHON, "-c", RECORDER, str(record), str(ready)])
    wait_for(ready.exists, 10, "the child's handlers")
    init.signal(signal.SIGCHLD)
    # A signal sent after SIGCHLD arrives after it: when USR2 is recorded, CHLD would be too.
    init.signal(signal.SIGUSR2)
    wait_for(lambda: signal.SIGUSR2 in numbers(record), 5, "SIGUSR2 forwarded")
    (tmp_path / "ready.exit").touch()
    assert init.wait() == 0
    assert numbers(record) == [signal.SIGUSR2]


def test_orphans_of_the_child_are_reaped(start: Start, as_pid1: bool, tmp_path: Path) -> None:
    spawned = tmp_path / "spawned"
    storm = write_script(
        tmp_path / "storm",
        f"""i=0
while [ $i -lt 200 ]; do (sleep 0.5 &) ; i=$((i + 1)); done
echo > {spawned}
exec sleep 1000
""",
    )
    init = wrap(start, as_pid1, [str(storm)])

    def orphan_of_init() -> bool:
        for p in init.descendants():
            try:
                if p.ppid() == init.init_pid and p.cmdline()[:2] == ["sleep", "0.5"]:
                    return True
            except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
                continue
        return False

    wait_for(orphan_of_init, 10, "a sleeper orphaned to the init")
    wait_for(spawned.exists, 10, "200 sleepers")

    def storm_over() -> bool:
        left = [c for c in cmdlines(init.descendants()) if c[:2] == ["sleep", "0.5"]]
        return not left and not init.zombies()

    wait_for(storm_over, 10, "every orphan to end and be reaped")
    assert init.zombies() == []
    assert init.proc.poll() is None, "the init must wait for its child, not for the orphans"
    init.signal(signal.SIGTERM)
    assert init.wait() == 128 + signal.SIGTERM


def test_a_missing_command_exits_127_with_one_line(start: Start, as_pid1: bool) -> None:
    init = wrap(start, as_pid1, ["no-such-command-for-sharelatex-init"])
    assert init.wait() == 127
    lines = [ln for ln in init.log().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "no-such-command-for-sharelatex-init" in lines[0]
    assert "No such file or directory" in lines[0]


def test_the_child_runs_in_the_callers_directory(
    start: Start, as_pid1: bool, tmp_path: Path
) -> None:
    here = tmp_path / "work dir"
    here.mkdir()
    init = wrap(start, as_pid1, ["sh", "-c", "pwd"], cwd=here)
    assert init.wait() == 0
    assert init.log().splitlines() == [str(here)]


def test_the_init_leaves_the_callers_directory_to_its_child(
    start: Start, as_pid1: bool, tmp_path: Path
) -> None:
    """dumb-init's cwd test: the child starts where the init was started, the init is in /."""
    here = tmp_path / "work dir"
    here.mkdir()
    ready = tmp_path / "ready"
    report = f"readlink /proc/$PPID/cwd; pwd; touch '{ready}'; exec sleep 1000"
    init = wrap(start, as_pid1, ["sh", "-c", report], cwd=here)
    wait_for(ready.exists, 10, "the child's report")
    assert os.readlink(f"/proc/{init.init_pid}/cwd") == "/"
    assert init.log().splitlines() == ["/", str(here)]
    init.signal(signal.SIGTERM)
    assert init.wait() == 128 + signal.SIGTERM


GROUP = """
import os, signal, subprocess, sys, time
record = sys.argv[1]
def recorder(who):
    def handler(signum, frame):
        with open(record, "a") as f:
            f.write(f"{who} {signum}\\n")
    return handler
if sys.argv[2] == "grandchild":
    signal.signal(signal.SIGUSR1, recorder("grandchild"))
    signal.signal(signal.SIGUSR2, recorder("grandchild"))
    open(record + ".grandchild", "w").write(str(os.getpid()))
    while True:
        time.sleep(1)
signal.signal(signal.SIGUSR1, recorder("child"))
grandchild = subprocess.Popen([sys.executable, __file__, record, "grandchild"])
while not os.path.exists(record + ".exit"):
    time.sleep(0.02)
grandchild.kill()
grandchild.wait()
"""


@pytest.mark.parametrize("to_group", [True, False], ids=["-g", "child-only"])
def test_group_option_forwards_to_the_whole_group(
    start: Start, as_pid1: bool, tmp_path: Path, to_group: bool
) -> None:
    program = tmp_path / "group.py"
    program.write_text(GROUP)
    record = tmp_path / "record"
    options = ["-g"] if to_group else []
    init = wrap(start, as_pid1, [PYTHON, str(program), str(record), "child"], *options)
    wait_for(Path(f"{record}.grandchild").exists, 10, "the grandchild's handlers")
    # Its host pid: the pid it knows itself by is the namespace's.
    (grandchild,) = [p for p in init.descendants() if p.cmdline()[-1:] == ["grandchild"]]

    def lines() -> list[str]:
        return record.read_text().splitlines() if record.exists() else []

    init.signal(signal.SIGUSR1)
    wait_for(lambda: f"child {int(signal.SIGUSR1)}" in lines(), 5, "the child's SIGUSR1")
    # USR1, if the init sent it to the group, is pending at the grandchild already; the lower
    # number is delivered first, so it is recorded before this USR2.
    grandchild.send_signal(signal.SIGUSR2)
    wait_for(lambda: f"grandchild {int(signal.SIGUSR2)}" in lines(), 5, "the USR2")
    got = [line for line in lines() if line.startswith("grandchild")]
    if to_group:
        assert got == [f"grandchild {int(signal.SIGUSR1)}", f"grandchild {int(signal.SIGUSR2)}"]
    else:
        assert got == [f"grandchild {int(signal.SIGUSR2)}"]
    Path(f"{record}.exit").touch()
    assert init.wait() == 0
