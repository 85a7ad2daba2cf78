"""The compile broker as a service, for real: `python -m init.broker.service` with a site's
environment against a private dockerd with the TeX Live image, and its thin client
(init.compiles.client) spawned as the compile service spawns latexmk. Exit statuses and output
pass through; a stop signal to the client stops the compile and the client dies of it; a
SIGKILLed client (or its killed caller) stops its compile at once, and the broker says so in
one line; so does a broker whose fds are past 1023 (a big site's); one at its open-files limit
neither spins nor loses a connection; a broker that is not there
is waited for, then named in one line with exit 69; the broker's own SIGTERM ends it within a
second or so with its containers removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from init.broker.session import REQUEST_DEADLINE
from init.compiles.messages import CommandRequest
from tests.integration import texlive_engine
from tests.integration.conftest import wait_for
from tests.integration.texlive_engine import BROKER_SOCKET, LIMITS, Compiles

texlive = texlive_engine.texlive
compiles = texlive_engine.compiles

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = float(LIMITS["OVERLEAF_INIT_COMPILE_TIMEOUT"])
HELLO = "\\documentclass{article}\n\\begin{document}\nHello, broker.\n\\end{document}\n"
LOOP = HELLO.replace("Hello", r"\def\x{\x}\x")
# The shim's own start: isolated, no site-packages, the package found by its path alone.
CLIENT = (
    sys.executable, "-I", "-S", "-c",
    f"import sys; sys.path.insert(0, {str(REPO)!r}); from init.compiles.client import main; "
    "sys.exit(main())",
)  # fmt: skip


def clsi_command(directory: Path) -> list[str]:
    return ["latexmk", "-cd", "-jobname=output", f"-auxdir={directory}", f"-outdir={directory}",
            "-synctex=1", "-interaction=batchmode", "-time", "-halt-on-error", "-pdf",
            f"{directory}/main.tex"]  # fmt: skip


def socket_of(compiles: Compiles) -> Path:
    return Path(compiles.env()[BROKER_SOCKET])


# fresh_start_bound: a follow-up to a stopped compile starts a fresh container (the stopped
# one is removed first), as the stopped compile did: so its time is bounded by how long the
# stopped one took to start (the client, a container, TeX: the engine's pace right now; seconds
# on a loaded disk) plus TIMEOUT / 2. Had the stop not freed the project's turn, the follow-up
# would wait for the loop's TIMEOUT first: later still, by far.


def stops(socket_path: Path, project: Path, within: float = 5.0) -> list[tuple[str, str]]:
    """The broker's lines for the compiles of `project` stopped by their clients: (why, the
    seconds from the stop to the compile's end). The session writes its line as the compile
    ends, the project's turn already free: it is waited for, up to `within` seconds."""
    pattern = rf"{project}: compile stopped \((.*?)\) .*; ended ([0-9.]+) s after"
    deadline = time.monotonic() + within
    while True:
        log = socket_path.with_suffix(".log").read_text(errors="replace")
        found: list[tuple[str, str]] = re.findall(pattern, log)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def broker(compiles: Compiles) -> subprocess.Popen[bytes]:
    """The site's broker (the harness's: texlive_engine.Compiles starts one per environment)."""
    return compiles.broker(compiles.env())


def spawn(
    compiles: Compiles,
    argv: list[str],
    cwd: Path,
    *client_args: str,
    socket_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    socket_path = socket_path or socket_of(compiles)
    return subprocess.Popen(
        [*CLIENT, "--socket", str(socket_path), *client_args, *argv], cwd=cwd,
        env=compiles.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def test_latexmk_through_the_broker_passes_output_and_status(
    compiles: Compiles, broker: subprocess.Popen[bytes]
) -> None:
    project = compiles.project("broker-ok", {"main.tex": HELLO})
    proc = spawn(compiles, clsi_command(project), project)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert (project / "output.pdf").read_bytes().startswith(b"%PDF")
    assert b"Latexmk" in out  # the compile's own output, streamed as it came
    bad = compiles.project("broker-error", {"main.tex": HELLO.replace("Hello", r"\oops")})
    proc = spawn(compiles, clsi_command(bad), bad)
    proc.communicate(timeout=120)
    assert proc.returncode == 12  # latexmk's own status
    proc = spawn(compiles, ["pdflatex", "-interaction=batchmode", "main.tex"], bad)
    proc.communicate(timeout=120)
    assert proc.returncode == 1


def test_the_compile_command_gets_its_json_through_the_broker(
    compiles: Compiles, broker: subprocess.Popen[bytes]
) -> None:
    project = compiles.project("broker-cli", {"main.tex": HELLO})
    request = CommandRequest(str(project), json=True)
    code = (
        "import sys; from init.compiles.client import call; from init.compiles.messages import *; "
        f"sys.exit(call({str(socket_of(compiles))!r}, {request!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**compiles.env(), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["pdf"] == str(project / "output.pdf")
    assert result["project"] == "broker-cli"


def test_sigterm_to_the_client_stops_the_compile_and_it_dies_of_it(
    compiles: Compiles, broker: subprocess.Popen[bytes]
) -> None:
    project = compiles.project("broker-term", {"main.tex": LOOP})
    compiles.wait_no_containers()
    spawned = time.monotonic()
    proc = spawn(compiles, clsi_command(project), project)
    wait_for(lambda: (project / "output.log").exists(), 60, "TeX to run")
    start = time.monotonic() - spawned
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # what LocalCommandRunner.kill does
    proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - began < 3
    # A stopped compile's container is not kept. The client is gone at once (it dies of the
    # signal): the broker notices, cancels and removes the container behind it.
    compiles.wait_no_containers()
    found = stops(socket_of(compiles), project)
    assert [why for why, _ in found] == ["its client got signal 15"]
    assert float(found[0][1]) < 3, found  # the loop ended that soon after the stop
    # The project's turn is free at once: the next compile does not wait for the loop's end.
    (project / "main.tex").write_text(HELLO)
    began = time.monotonic()
    proc = spawn(compiles, clsi_command(project), project)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert time.monotonic() - began < start + TIMEOUT / 2  # see fresh_start_bound


def kill_then_follow(compiles: Compiles, socket_path: Path, project: Path, killed: str) -> None:
    """A loop compiled through the broker at `socket_path`; its client (`killed`: "client")
    or the client's caller ("caller") SIGKILLed once TeX runs; then a compile of the project
    that must get its turn at once, and the broker's line on the stop."""
    command = " ".join([*(repr(a) for a in CLIENT), "--socket", str(socket_path),
                        *clsi_command(project)])  # fmt: skip
    spawned = time.monotonic()
    proc = subprocess.Popen(
        ["sh", "-c", f"{command}; echo done"], cwd=project, env=compiles.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_for(lambda: (project / "output.log").exists(), 60, "TeX to run")
    start = time.monotonic() - spawned
    if killed == "client":
        os.killpg(proc.pid, signal.SIGKILL)  # the client cannot send anything now
    else:
        proc.kill()  # the caller only: the client lives on, its caller gone
    proc.wait(10)
    began = time.monotonic()
    (project / "main.tex").write_text(HELLO)
    follow = spawn(compiles, clsi_command(project), project, socket_path=socket_path)
    out, err = follow.communicate(timeout=60)
    took = time.monotonic() - began
    broker_log = socket_path.with_suffix(".log").read_text(errors="replace")
    said = (f"{took:.1f} s; the follow-up said: {out[-600:]!r} {err[-600:]!r}; the broker's "
            f"log (texlive_engine.start_broker's): {broker_log[-3000:]}")  # fmt: skip
    assert follow.returncode == 0, said
    # The broker saw the client's end (its caller's, or its own) and says so, in one line.
    found = stops(socket_path, project)
    assert len(found) == 1, f"{found}; {said}"
    why, ended = found[0]
    assert why in ("its caller ended", "its client is gone"), said
    assert float(ended) < 3, said  # the loop was stopped, not left to its 15 s limit
    # And the follow-up got the project's turn at once (see fresh_start_bound).
    assert took < start + TIMEOUT / 2, f"the first compile started in {start:.1f} s; {said}"


@pytest.mark.parametrize("killed", ["client", "caller"])
def test_a_sigkilled_client_or_caller_stops_its_compile(
    compiles: Compiles, broker: subprocess.Popen[bytes], killed: str
) -> None:
    project = compiles.project(f"broker-kill-{killed}", {"main.tex": LOOP})
    kill_then_follow(compiles, socket_of(compiles), project, killed)


def sockets_of(pid: int) -> list[int]:
    """The fds of `pid` that are sockets."""
    fds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            if os.readlink(fd).startswith("socket:"):
                fds.append(int(fd.name))
    return fds


@contextlib.contextmanager
def own_broker(
    compiles: Compiles, name: str, **start: Any
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A broker of the site's environment on a socket of its own (`name`), started with
    texlive_engine.start_broker's `start` options; it must end by SIGTERM with 0."""
    socket_path = socket_of(compiles).with_name(f"{name}.sock")
    env = {**compiles.env(), BROKER_SOCKET: str(socket_path)}
    broker = texlive_engine.start_broker(env, socket_path, **start)
    try:
        yield broker, socket_path
    finally:
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(10) == 0, socket_path.with_suffix(".log").read_text()


def test_a_broker_past_1023_fds_serves_and_stops_compiles(compiles: Compiles) -> None:
    # A big site: a few hundred projects compiled within the idle time keep two fds each in
    # the broker (a warm container's stream and dir). select(2) refuses an fd past 1023.
    with own_broker(compiles, "broker-high-fds", hold_fds=1100) as (broker, socket_path):
        sockets = sockets_of(broker.pid)
        assert sockets and min(sockets) > 1023, sockets  # its listener and engine connections
        project = compiles.project("broker-high-fds", {"main.tex": LOOP})
        kill_then_follow(compiles, socket_path, project, "client")


@contextlib.contextmanager
def crowded_broker(
    compiles: Compiles, name: str, nofile: str, clients: int
) -> Iterator[tuple[subprocess.Popen[bytes], Path, contextlib.ExitStack]]:
    """A broker of its own (`own_broker`) under `prlimit --nofile=NOFILE`, and `clients`
    connected to it that send nothing: the stack that holds them (closing it, they go)."""
    prlimit = ["prlimit", f"--nofile={nofile}", "--"]
    with (
        own_broker(compiles, name, prefix=prlimit) as (broker, socket_path),
        contextlib.ExitStack() as idle,
    ):
        for _ in range(clients):
            idle.enter_context(socket.socket(socket.AF_UNIX)).connect(str(socket_path))
        yield broker, socket_path, idle


def compiles_there(compiles: Compiles, name: str, socket_path: Path) -> str:
    """A compile through the broker at `socket_path` succeeds; the broker's log."""
    project = compiles.project(name, {"main.tex": HELLO})
    proc = spawn(compiles, clsi_command(project), project, socket_path=socket_path)
    _, err = proc.communicate(timeout=60)
    log = socket_path.with_suffix(".log").read_text()
    assert proc.returncode == 0, f"{err[-600:]!r}; {log[-3000:]}"
    return log


def test_a_broker_started_with_a_low_open_files_limit_raises_it_and_serves(
    compiles: Compiles,
) -> None:
    # An engine may start the site with a soft limit of 1024 (systemd's default) and a high
    # hard one; a busy site's connections and warm containers pass the soft one. Here 64, and
    # 100 clients that connect and send nothing: the broker takes every one at once (a session
    # each, waiting for its request), not as their requests' deadline frees fds; a compile
    # beside them is served.
    with crowded_broker(compiles, "broker-low-limit", "64:8192", 100) as (broker, socket_path, _):
        limits = Path(f"/proc/{broker.pid}/limits").read_text()
        assert re.search(r"Max open files\s+8192\s+8192\s", limits), limits
        wait_for(lambda: len(sockets_of(broker.pid)) > 100, REQUEST_DEADLINE / 2, "all 100 taken")
        compiles_there(compiles, "broker-low-limit", socket_path)


def cpu_seconds(pid: int) -> float:
    """The user and system time `pid` has used, its threads' included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_broker_at_its_open_files_limit_waits_without_spinning_or_dropping_then_serves(
    compiles: Compiles,
) -> None:
    # A hard limit it cannot raise, and more clients than it has fds for. Taking a connection
    # it has no fds to serve drops it (its session fails at its first pipe: the client reads
    # "the broker ended"); refusing to take it while the listener stays readable must not spin
    # the loop (a core, a log line a try). The connections wait in the backlog, and once the
    # first clients go (their sessions end) the broker takes the rest and a compile is served.
    with crowded_broker(compiles, "broker-full", "48:48", 80) as (broker, socket_path, idle):
        log_path = socket_path.with_suffix(".log")
        time.sleep(0.5)  # it takes what it can
        before = cpu_seconds(broker.pid)
        time.sleep(2)
        spent = cpu_seconds(broker.pid) - before
        log = log_path.read_text()
        assert "failed" not in log, log[-3000:]  # none dropped
        assert spent < 0.5, f"{spent:.2f} s of CPU in 2 s at the limit"
        full = "at the open-files limit ("
        assert log.count(full) == 1 and "open files limit 48" in log, log[-3000:]
        assert "accept" not in log, log[-3000:]
        idle.close()  # the clients go: their sessions end, the backlog is taken
        wait_for(lambda: "taking connections again after" in log_path.read_text(), 5, "again")
        log = compiles_there(compiles, "broker-full", socket_path)
        assert "failed" not in log, log[-3000:]
        print(f"at the limit: {spent:.2f} s of CPU in 2 s")


def test_no_broker_is_waited_for_then_one_line_and_69(compiles: Compiles, tmp_path: Path) -> None:
    project = compiles.project("broker-none", {"main.tex": HELLO})
    missing = tmp_path / "broker.sock"
    began = time.monotonic()
    done = subprocess.run(
        [*CLIENT, "--socket", str(missing), "--wait", "1", *clsi_command(project)],
        cwd=project, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 69
    assert 1 <= time.monotonic() - began < 3
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "sharelatex-init status" in lines[0]
    assert not (project / "output.pdf").exists()


def test_sigterm_to_the_broker_ends_it_fast_with_no_container_left(
    compiles: Compiles, broker: subprocess.Popen[bytes]
) -> None:
    path = socket_of(compiles)
    project = compiles.project("broker-stop", {"main.tex": LOOP})
    client = spawn(compiles, clsi_command(project), project)
    wait_for(lambda: (project / "output.log").exists(), 60, "TeX to run")
    began = time.monotonic()
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(10) == 0
    stopped_after = time.monotonic() - began
    _, err = client.communicate(timeout=10)
    assert client.returncode == 75, err  # try again: the site is stopping
    assert b"stopping" in err
    assert compiles.containers() == ""
    assert stopped_after < 2
    assert not path.exists()
