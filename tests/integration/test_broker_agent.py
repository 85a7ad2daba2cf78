"""The compile agent in a real warm container (the TeX Live image, today's profile, a private
dockerd), driven through init.broker's pool: the compile's output and exit status as a plain
container gives them, the timeout and the leftovers, and the attacks: a compile that writes to
or reads the agent's channel, one that forges answers, one that ends or floods the agent, and
what it leaves in /tmp."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from init.broker import target as targets
from init.broker import warm
from init.broker.pool import Pool, PoolLimits
from init.broker.protocol import Answer, Output, ProtocolError, Reason, Request
from init.broker.target import Target
from init.broker.warm import AgentGone, WarmContainer
from init.compiles.paths import CompileDir
from init.compiles.profile import Job, compile_environment, load_seccomp
from init.compiles.settings import Limits
from init.engine.client import DockerBackend
from tests.integration import texlive_engine
from tests.integration.conftest import HostEngine, wait_for
from tests.integration.texlive_engine import TEXLIVE, WWW_DATA, Compiles

pytestmark = pytest.mark.root

texlive = texlive_engine.texlive
site = texlive_engine.site

LIMITS = Limits(memory=256 << 20, pids=64, timeout=15, tmpfs=64 << 20, output=8 << 20, idle=60)
HELLO = "\\documentclass{article}\\begin{document}Hello.\\end{document}\n"
BROKEN = "\\documentclass{article}\\begin{document}\\undefinedmacro\\end{document}\n"
LATEXMK = ("latexmk", "-pdf", "-interaction=batchmode", "-halt-on-error", "main.tex")


@dataclass
class Ran:
    answer: Answer
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class Broker:
    engine: HostEngine
    backend: DockerBackend
    pool: Pool
    seccomp: str | None
    runtime: str
    count: list[int] = field(default_factory=lambda: [0])

    def target(self, directory: Path) -> Target:
        job = self.job(directory, ("true",))
        return targets.target(job, LIMITS, self.seccomp, runtime=self.runtime)

    def job(self, directory: Path, argv: tuple[str, ...]) -> Job:
        place = CompileDir(directory, directory, directory.name, WWW_DATA, WWW_DATA)
        return Job(place, argv, TEXLIVE)

    def run(self, directory: Path, *argv: str, timeout: float = 15, **kw: int) -> Ran:
        request = Request(**{**vars(targets.request(self.job(directory, argv), LIMITS)),
                             "timeout": timeout})  # fmt: skip
        ran = Ran(Answer(None, Reason.ERROR))
        parts: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}

        def output(piece: Output) -> None:
            parts[piece.fd] += piece.data

        ran.answer = self.pool.run(self.target(directory), request, output, **kw)
        ran.stdout, ran.stderr = bytes(parts[1]), bytes(parts[2])
        return ran

    def container(self, directory: Path) -> WarmContainer:
        return self.pool._warm[directory.name].container  # the tests look inside


@pytest.fixture(scope="module", params=texlive_engine.RUNTIMES)
def compiles(request: pytest.FixtureRequest, site: Compiles) -> Compiles:
    """Every case under runc and under gVisor's runsc (the engine registers it as the init
    does), each runtime with a compiles root of its own; module-scoped: one pool each."""
    return texlive_engine.with_runtime(site, request.param)


@pytest.fixture(scope="module")
def broker(texlive: HostEngine, compiles: Compiles) -> Iterator[Broker]:
    backend = DockerBackend(f"unix://{texlive.socket}", 60, 5)
    deadlines = LIMITS.deadlines
    pool = Pool(backend, PoolLimits(4, LIMITS.idle, deadlines.lifetime, deadlines.reuse))
    pool.sweep()
    made = Broker(texlive, backend, pool, load_seccomp(print), compiles.runtime)
    yield made
    pool.close()


def plain(broker: Broker, directory: Path, *argv: str) -> tuple[int, bytes]:
    """`argv` in a plain container of the image (no profile, no init code) under the broker's
    runtime, with the compile's environment (shell escape off): status, stdout."""
    import subprocess

    env = [f"--env={k}={v}" for k, v in compile_environment(LIMITS, {}).items()]
    done = subprocess.run(
        ["docker", "-H", f"unix://{broker.engine.socket}", "run", "--rm", "--network", "none",
         "--runtime", broker.runtime,
         *env, "-u", f"{WWW_DATA}:{WWW_DATA}", "-v", f"{directory}:{directory}",
         "-w", str(directory),
         "--entrypoint", argv[0], TEXLIVE, *argv[1:]],
        capture_output=True, timeout=120,
    )  # fmt: skip
    return done.returncode, done.stdout


def compile_uid(directory: Path) -> int:
    """The project's own uid (the compile's, and its agent's)."""
    return CompileDir(directory, directory, directory.name, WWW_DATA, WWW_DATA).compile_uid


def clean(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name != "main.tex":
            path.unlink()


@pytest.mark.parametrize("document", [HELLO, BROKEN], ids=["ok", "tex-error"])
def test_latexmk_through_the_agent_exits_and_prints_as_in_a_plain_container(
    broker: Broker, compiles: Compiles, document: str
) -> None:
    directory = compiles.project(f"same-{len(document)}", {"main.tex": document})
    status, stdout = plain(broker, directory, *LATEXMK)
    clean(directory)
    ran = broker.run(directory, *LATEXMK)
    assert ran.answer.reason is Reason.EXIT
    assert (ran.answer.status, ran.stdout) == (status, stdout)
    assert status == (0 if document == HELLO else 12)
    assert (directory / "output.pdf").exists() is False  # jobname main here
    assert (directory / "main.pdf").exists() == (document == HELLO)


def test_output_and_arguments_pass_through_byte_for_byte(
    broker: Broker, compiles: Compiles
) -> None:
    directory = compiles.project("bytes", {"main.tex": HELLO})
    forged = '{"id":"x","reason":"exit","exit":0,"signal":null,"seconds":0,"leftovers":0}'
    script = (
        'printf "%s\\n" "$1"; printf "%s" "$2"; head -c 300000 /dev/urandom > /tmp/r; '
        "cat /tmp/r; printf '\\377\\000junk' >&2; exit 7"
    )
    ran = broker.run(directory, "sh", "-c", script, "sh", forged, 'a\nb"}\n{é')
    assert ran.answer.status == 7 and ran.answer.reason is Reason.EXIT
    head = f'{forged}\na\nb"}}\n{{é'.encode()
    assert ran.stdout.startswith(head) and len(ran.stdout) == len(head) + 300000
    assert ran.stderr == b"\xff\x00junk"


def test_the_compile_cannot_reach_the_agents_channel(broker: Broker, compiles: Compiles) -> None:
    directory = compiles.project("channel", {"main.tex": HELLO})
    if broker.runtime == "runsc":
        channel_under_gvisor(broker, compiles, directory)
        return
    forged = '{"id":"%s","reason":"exit","exit":0}'
    script = (
        "ls /proc/1/fd; "
        f"printf '{forged}\\n' \"$ID\" > /proc/1/fd/1; "
        "head -c 10 /proc/1/fd/0; "
        "head -c 10 /proc/1/mem; "
        # whatever else is open: the compile's own fds are /dev/null and its two pipes
        "ls -l /proc/self/fd; exit 3"
    )
    ran = broker.run(directory, "sh", "-c", script)
    assert ran.answer.status == 3, ran
    assert ran.stderr.count(b"Permission denied") >= 4, ran.stderr
    fds = ran.stdout.decode()
    assert "/dev/null" in fds and "pipe:" in fds and "socket" not in fds
    # And the agent is still there for the next compile, in the same container.
    before = broker.container(directory).id
    assert broker.run(directory, "true").answer.status == 0
    assert broker.container(directory).id == before


def channel_under_gvisor(broker: Broker, compiles: Compiles, directory: Path) -> None:
    """gVisor (runsc 20221219) differs: its /proc/PID/fd is open to every process of the
    sandbox (no ptrace-access check, whatever PR_SET_DUMPABLE says; /proc/1/mem does honour
    it), so a compile can write lines to the agent's stdout, the broker's stream, and read
    its stdin. What holds: a line the broker did not expect is a protocol break, which ends
    this project's container (never used again) and reaches no other project's."""
    other = compiles.project("channel-bystander", {"main.tex": HELLO})
    broker.run(other, "true")
    bystander = broker.container(other).id
    broker.run(directory, "true")
    before = broker.container(directory).id
    forged = '{"id":"forged","reason":"exit","exit":0,"signal":null,"seconds":0,"leftovers":0}'
    memory = broker.run(directory, "sh", "-c", "head -c 10 /proc/1/mem")
    assert b"Permission denied" in memory.stderr, memory  # the agent's memory: refused
    with pytest.raises(ProtocolError):
        broker.run(directory, "sh", "-c", f"printf '%s\\n' '{forged}' > /proc/1/fd/1; sleep 5")
    assert directory.name not in broker.pool._warm  # retired at once
    wait_for(
        lambda: before[:12] not in broker.engine.docker("ps", "-aq", "--no-trunc"), 15,
        "the container whose channel was forged to be gone",
    )  # fmt: skip
    assert broker.run(directory, "true").answer.status == 0
    assert broker.container(directory).id != before
    assert broker.run(other, "true").answer.status == 0
    assert broker.container(other).id == bystander


# What our seccomp allow-list refuses (every socket call) and what it allows (select(3): glibc
# makes it pselect6, which gVisor knows as "pselect", a name the profile carries for it).
SECCOMP_PROBE = r"""
use Socket;
print socket(my $s, PF_INET, SOCK_STREAM, 0) ? "inet: made\n" : "inet: $!\n";
print socket(my $u, PF_UNIX, SOCK_STREAM, 0) ? "unix: made\n" : "unix: $!\n";
print socketpair(my $x, my $y, PF_UNIX, SOCK_STREAM, 0) ? "pair: made\n" : "pair: $!\n";
my $n = select(undef, undef, undef, 0.01);
print "select: ", ($n < 0 ? "$!" : $n), "\n";
"""
REFUSED = [
    "inet: Operation not permitted",
    "unix: Operation not permitted",
    "pair: Operation not permitted",
    "select: 0",
]


def test_a_compile_run_by_the_agent_is_under_our_seccomp_profile(
    broker: Broker, compiles: Compiles
) -> None:
    """Under runsc too: gVisor's Sentry applies the container's profile (--oci-seccomp) to
    its init and the init's descendants, and every compile is the agent's child. A `docker
    exec` into the same container, today's compile path, gets no profile under runsc (the
    README's "Compiles under gVisor"): the probe tells the two apart, so it can fail."""
    directory = compiles.project("seccomp", {"main.tex": HELLO})
    ran = broker.run(directory, "perl", "-e", SECCOMP_PROBE)
    assert ran.answer.status == 0, ran
    assert ran.stdout.decode().splitlines() == REFUSED
    user = f"{compile_uid(directory)}:{WWW_DATA}"
    container = broker.container(directory).id
    by_exec = broker.engine.docker("exec", "-u", user, container, "perl", "-e", SECCOMP_PROBE)
    if broker.runtime == "runc":
        assert by_exec.splitlines() == REFUSED
    else:
        assert by_exec.splitlines() == ["inet: made", "unix: made", "pair: made", "select: 0"]


def test_a_timeout_kills_the_whole_group_and_every_leftover(
    broker: Broker, compiles: Compiles
) -> None:
    directory = compiles.project("timeout", {"main.tex": HELLO})
    began = time.monotonic()
    ran = broker.run(
        directory, "sh", "-c", "sleep 300 & setsid sleep 301 & nohup sleep 302 & sleep 303",
        timeout=2,
    )  # fmt: skip
    assert ran.answer.reason is Reason.TIMEOUT and ran.answer.status == 137
    assert 1.9 < ran.answer.seconds < 4 and time.monotonic() - began < 6
    assert ran.answer.leftovers >= 3
    after = broker.run(directory, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert b"sleep" not in after.stdout


def test_leftovers_of_a_finished_compile_are_killed(broker: Broker, compiles: Compiles) -> None:
    directory = compiles.project("leftovers", {"main.tex": HELLO})
    ran = broker.run(directory, "sh", "-c", "setsid sleep 300 > /dev/null 2>&1 & exit 0")
    assert (ran.answer.status, ran.answer.leftovers) == (0, 1)
    after = broker.run(directory, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert b"sleep" not in after.stdout


def test_signals_to_every_process_do_not_end_the_agent(
    broker: Broker, compiles: Compiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = compiles.project("kill-all", {"main.tex": HELLO})
    broker.run(directory, "true")
    before = broker.container(directory).id
    # Linux drops what a process of the container sends its PID 1 unless PID 1 handles it;
    # gVisor delivers it, so the agent catches every signal it can (HUP, USR1, a real-time
    # one...). KILL and STOP to PID 1 it cannot: under runsc they are tried below, apart.
    gvisor = broker.runtime == "runsc"
    for signal_name in ("KILL", "STOP", "HUP", "USR1", "QUIT", "ALRM", "34"):
        to_pid1 = "" if gvisor and signal_name in ("KILL", "STOP") else f"kill -{signal_name} 1; "
        ran = broker.run(directory, "sh", "-c", f"{to_pid1}kill -{signal_name} -1; "
                         "echo survived")  # fmt: skip
        assert ran.stdout == b"survived\n", (signal_name, ran)
    assert broker.run(directory, "true").answer.status == 0
    assert broker.container(directory).id == before
    if not gvisor:
        return
    # KILL ends the agent under gVisor, so its container and nothing else (as a compile's
    # `kill -TERM 1` does under both): the next compile gets a fresh one.
    with pytest.raises(AgentGone) as ended:
        broker.run(directory, "sh", "-c", "kill -KILL 1; sleep 30")
    assert ended.value.sent
    assert broker.run(directory, "true").answer.status == 0
    killed = broker.container(directory).id
    assert killed != before
    # STOP leaves it stopped: no answer comes, and the broker gives the container up after
    # the request's timeout and the agent's grace, as for a compile that runs to its timeout
    # (the grace shortened here: 30 s in the broker).
    monkeypatch.setattr(warm, "ANSWER_GRACE", 2.0)
    began = time.monotonic()
    with pytest.raises(AgentGone) as stopped:
        broker.run(directory, "sh", "-c", "kill -STOP 1", timeout=2)
    assert stopped.value.sent and time.monotonic() - began < 10
    assert broker.run(directory, "true").answer.status == 0
    assert broker.container(directory).id != killed


def test_a_fork_bomb_leaves_the_agent_working(broker: Broker, compiles: Compiles) -> None:
    directory = compiles.project("bomb", {"main.tex": HELLO})
    broker.run(directory, "true")
    before = broker.container(directory).id
    ran = broker.run(directory, "sh", "-c", "f(){ f | f & }; f; sleep 3", timeout=3)
    assert ran.answer.reason in (Reason.TIMEOUT, Reason.EXIT) and ran.answer.leftovers > 10
    after = broker.run(directory, "sh", "-c", "ls -d /proc/[0-9]* | wc -l")
    assert after.answer.status == 0 and int(after.stdout) <= 4
    assert broker.container(directory).id == before


def test_a_compile_that_ends_the_agent_ends_only_its_own_container(
    broker: Broker, compiles: Compiles
) -> None:
    victim = compiles.project("ends-agent", {"main.tex": HELLO})
    other = compiles.project("bystander", {"main.tex": HELLO})
    broker.run(other, "true")
    broker.run(victim, "true")
    gone = broker.container(victim).id
    bystander = broker.container(other).id
    with pytest.raises(AgentGone) as ended:
        broker.run(victim, "sh", "-c", "kill -TERM 1; sleep 30")
    assert ended.value.sent  # it ran: no second go
    wait_for(
        lambda: gone[:12] not in broker.engine.docker("ps", "-aq", "--no-trunc"), 15,
        "the agent's container to be gone",
    )  # fmt: skip
    assert broker.run(other, "true").answer.status == 0
    assert broker.container(other).id == bystander
    assert broker.run(victim, "true").answer.status == 0
    assert broker.container(victim).id != gone


def test_nothing_in_tmp_carries_over_to_the_next_compile_not_even_the_font_caches(
    broker: Broker, compiles: Compiles
) -> None:
    directory = compiles.project("tmp", {"main.tex": HELLO})
    # The compile dir is under /tmp on this machine, so the container's /tmp holds its mount
    # point: /tmp must be emptied without reaching into it.
    first_part = directory.parts[2]
    # A luaotfload cache is bytecode LuaTeX runs: one compile's must never reach the next.
    planted = "/tmp/texmf-var/luatex-cache/generic/names/luaotfload-names.luc"
    script = (
        f"mkdir -p /tmp/d/e /tmp/.hidden {planted.rsplit('/', 1)[0]} && touch /tmp/a "
        f'/tmp/d/e/f /tmp/.h {planted} && ln -s "$PWD" /tmp/link && ln -s / /tmp/root && '
        "chmod 000 /tmp/d /tmp/texmf-var"
    )
    assert broker.run(directory, "sh", "-c", script).answer.status == 0
    # find, not ls: coreutils 9.1's statx(2) fails with EINVAL under gVisor (README).
    ran = broker.run(directory, "find", "/tmp", "-mindepth", "1", "-maxdepth", "1", "-printf",
                     "%f\\n")  # fmt: skip
    assert set(ran.stdout.decode().split()) == {first_part}, ran
    gone = broker.run(directory, "find", "/tmp/texmf-var")
    assert gone.answer.status == 1 and b"No such file" in gone.stderr, gone
    assert (directory / "main.tex").read_text() == HELLO


def test_what_the_compile_makes_is_its_groups_and_handed_back(
    broker: Broker, compiles: Compiles
) -> None:
    directory = compiles.project("hand-back", {"main.tex": HELLO})
    os.chmod(directory / "main.tex", 0o644)  # as CLSI writes it: the compile must rewrite it
    script = (
        "echo plain > made && echo again >> main.tex && echo setuid > setuid && "
        "umask 077 && mkdir -p private/deeper && echo secret > private/deeper/file && "
        "chmod 000 private/deeper && chmod 4700 setuid"
    )
    ran = broker.run(directory, "sh", "-c", script)
    assert ran.answer.status == 0, ran.stderr
    made = (directory / "made").stat()
    assert made.st_uid == compile_uid(directory) and made.st_gid == WWW_DATA
    assert oct(made.st_mode & 0o7777) == oct(0o664)  # umask 002
    assert oct((directory / "setuid").stat().st_mode & 0o7777) == oct(0o760)  # handed back
    deeper = (directory / "private" / "deeper").stat()
    assert deeper.st_mode & 0o2070 == 0o2070  # the group's (CLSI's) to read and remove
    assert (directory / "private" / "deeper" / "file").stat().st_mode & 0o060 == 0o060
    assert (directory / "main.tex").read_text() == HELLO + "again\n"


def test_cancel_stops_the_compile_at_once(broker: Broker, compiles: Compiles) -> None:
    directory = compiles.project("cancel", {"main.tex": HELLO})
    broker.run(directory, "true")
    stop_r, stop_w = os.pipe()
    os.write(stop_w, b"x")  # a stop signal already there: the compile is stopped as it starts
    began = time.monotonic()
    try:
        ran = broker.run(directory, "sleep", "60", cancel_fd=stop_r)
    finally:
        os.close(stop_r)
        os.close(stop_w)
    assert ran.answer.reason is Reason.CANCELLED and ran.answer.status == 137
    assert time.monotonic() - began < 3


def test_the_agent_ends_when_idle_and_when_the_broker_lets_go(
    broker: Broker, compiles: Compiles
) -> None:
    directory = compiles.project("idle", {"main.tex": HELLO})
    body = dict(broker.target(directory).body)
    body["Cmd"] = ["1", "600"]  # idle for a second
    warm = WarmContainer.start(broker.backend, "sharelatex-init-compile-idle-test", body)
    wait_for(lambda: not warm.alive(), 10, "the idle agent to end")
    warm.close()
    warm = WarmContainer.start(broker.backend, "sharelatex-init-compile-idle-test", body)
    warm._attachment.close_stdin()  # the broker lets go (StdinOnce: EOF for the agent)
    wait_for(lambda: not warm.alive(), 10, "the agent to end at EOF")
    warm.close()
    wait_for(lambda: "idle-test" not in broker.engine.docker("ps", "-a", "--format", "{{.Names}}"),
             15, "no container left")  # fmt: skip


def test_a_dir_removed_and_made_again_is_compiled_in_a_fresh_container(
    broker: Broker, compiles: Compiles
) -> None:
    """Overleaf's "recompile from scratch" removes the project's dir and makes it again: the
    warm container's bind still holds the removed one, so the next compile gets a fresh
    container that sees the new dir."""
    import shutil

    directory = compiles.project("remade", {"main.tex": "first\n"})
    assert broker.run(directory, "cat", "main.tex").stdout == b"first\n"
    first = broker.container(directory).id
    shutil.rmtree(directory)
    directory = compiles.project("remade", {"main.tex": "again\n"})
    ran = broker.run(directory, "cat", "main.tex")
    assert ran.answer.status == 0, ran.stderr
    assert ran.stdout == b"again\n"
    assert broker.container(directory).id != first


def test_a_tidy_that_fails_retires_the_container(broker: Broker, compiles: Compiles) -> None:
    """The dir to hand back is gone (the tidy cannot be done): the agent answers, then exits."""
    directory = compiles.project("tidy-fails", {"main.tex": HELLO})
    broker.run(directory, "true")
    before = broker.container(directory).id
    job = broker.job(directory, ("true",))
    failing = Request(**{**vars(targets.request(job, LIMITS)), "tidy": f"{directory}/gone"})
    answer = broker.pool.run(broker.target(directory), failing, lambda o: None)
    # Its container tidied after the last compile: the one after this compile is what fails.
    assert answer.reason is Reason.EXIT and answer.status == 0, answer
    assert answer.message == "tidy after the compile failed: the agent exits"
    wait_for(lambda: not broker.container(directory).alive(), 10, "the agent to exit")
    # A fresh container tidies before its first compile: there the failing tidy refuses it.
    answer = broker.pool.run(broker.target(directory), failing, lambda o: None)
    assert answer.reason is Reason.ERROR, answer
    assert answer.message == "tidy before the compile failed"
    wait_for(lambda: not broker.container(directory).alive(), 10, "the agent to exit")
    assert broker.run(directory, "true").answer.status == 0
    assert broker.container(directory).id != before


def test_the_tidy_runs_after_every_compile_and_before_only_a_containers_first(
    broker: Broker, compiles: Compiles
) -> None:
    """Between two compiles in one container nothing runs: the last tidy's work stands. A fresh
    container tidies first (the project's last one may have died before its own tidy). Seen
    through a file of the compile's uid made 0600 before each compile: a tidy hands it back
    (0660), so the compile sees 660 where a tidy ran before it."""
    directory = compiles.project("tidy-runs", {"main.tex": HELLO})
    probe = directory / "probe"
    probe.write_text("x\n")
    os.chown(probe, compile_uid(directory), WWW_DATA)

    def compile_seeing_the_probe() -> tuple[str, str]:
        os.chmod(probe, 0o600)
        ran = broker.run(directory, "perl", "-e", 'printf "%o", (stat "probe")[2] & 07777')
        assert ran.answer.status == 0, ran.stderr
        return ran.stdout.decode(), oct(probe.stat().st_mode & 0o7777)

    first = compile_seeing_the_probe()
    container = broker.container(directory).id
    assert first == ("660", "0o660")  # a fresh container: tidied before, and after
    assert compile_seeing_the_probe() == ("600", "0o660")  # the same one: after only
    assert compile_seeing_the_probe() == ("600", "0o660")
    assert broker.container(directory).id == container
    broker.pool._retire(directory.name)  # the next compile in a fresh container: tidied first
    assert compile_seeing_the_probe() == ("660", "0o660")
    assert broker.container(directory).id != container
