"""The attack battery: hostile projects compiled by `sharelatex-init compile` for real (the
TeX Live image built into a private dockerd). Each is contained, ends within its limit, says
why, changes no other project's files, and leaves no container behind.

A project's `latexmkrc` is Perl that latexmk runs, so a hostile project runs arbitrary code in
its container whatever TeX's shell-escape setting: most attacks here use it, as a real attacker
would; the container is the fence.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from init.config import DEFAULT_COMPILE_UIDS
from init.engine.client import PROJECT_LABEL
from tests.integration import texlive_engine
from tests.integration.conftest import wait_for
from tests.integration.texlive_engine import LIMITS, WWW_DATA, Compiles

# The module's engine with the TeX Live image (runsc registered), and its compiles root.
texlive = texlive_engine.texlive
site = texlive_engine.site

pytestmark = pytest.mark.root
TIMEOUT = float(LIMITS["OVERLEAF_INIT_COMPILE_TIMEOUT"])
HELLO = r"""\documentclass{article}
\begin{document}
Hello, sandbox.
\end{document}
"""


@pytest.fixture(params=texlive_engine.RUNTIMES)
def compiles(request: pytest.FixtureRequest, site: Compiles) -> Compiles:
    """Every attack under runc and under gVisor's runsc: each must be contained by both."""
    return texlive_engine.with_runtime(site, request.param)


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file under `directory` and a hash of its content (links by their target)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root, name)
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            else:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def other(compiles: Compiles) -> Iterator[Path]:
    """Another project, with a secret, that must come out of every attack unchanged."""
    directory = compiles.project("victim", {"main.tex": HELLO, "secret.txt": "VICTIM-SECRET\n"})
    before = fingerprint(directory)
    yield directory
    assert fingerprint(directory) == before, "another project's files changed"
    compiles.wait_no_containers()


@pytest.fixture
def host_secret(compiles: Compiles) -> Iterator[Path]:
    """A file on the host, outside every compile dir."""
    path = compiles.root.parent / "host-secret.txt"
    path.write_text("HOST-SECRET\n")
    os.chmod(path, 0o644)
    yield path
    assert path.read_text() == "HOST-SECRET\n"


def perl_rc(code: str) -> str:
    """A latexmkrc that runs `code` and then lets the compile go on."""
    return code + "\n1;\n"


def test_a_normal_compile_makes_a_pdf(compiles: Compiles, other: Path) -> None:
    project = compiles.project("normal", {"main.tex": HELLO})
    code, result, stderr = compiles.compile(project)
    assert code == 0, (result, stderr)
    assert result["status"] == "ok" and result["exit_status"] == 0
    assert result["pdf"] == str(project / "output.pdf")
    assert (project / "output.pdf").read_bytes().startswith(b"%PDF")
    assert result["log"] == str(project / "output.log")
    assert result["errors"] == [] and result["project"] == "normal"
    made = (project / "output.pdf").stat()
    # The project's own uid (never root's, never the services'), the dir's group, umask 002.
    assert (made.st_uid, made.st_gid) == (DEFAULT_COMPILE_UIDS.uid_for("normal"), WWW_DATA)
    assert stat.S_IMODE(made.st_mode) == 0o664


def test_a_latex_error_exits_1_with_the_error_line(compiles: Compiles, other: Path) -> None:
    project = compiles.project(
        "broken", {"main.tex": HELLO.replace("Hello", r"\undefinedcommand Hello")}
    )
    code, result, _ = compiles.compile(project)
    assert code == 1, result
    assert result["status"] == "latex_error"
    assert result["errors"][0] == "! Undefined control sequence."
    assert any(line.startswith("l.3") for line in result["errors"]), result["errors"]
    assert "Undefined control sequence" in result["reason"]


def test_write18_runs_no_shell_command(compiles: Compiles, other: Path) -> None:
    tex = HELLO.replace("Hello", r"\immediate\write18{touch shell-ran; echo x > /tmp/x}Hello")
    project = compiles.project("write18", {"main.tex": tex})
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    assert not (project / "shell-ran").exists()
    log = (project / "output.log").read_text(errors="replace")
    assert "runsystem(touch shell-ran; echo x > /tmp/x)...disabled" in log


def test_the_network_is_unreachable(compiles: Compiles, other: Path) -> None:
    """Our seccomp profile refuses socket(2) itself, under both runtimes: the compile is the
    agent's child, and gVisor applies the container's profile (--oci-seccomp) to its init and
    its descendants (not to a `docker exec`'d process, as compiles under runsc once were). And
    behind it: the sandbox's network has no interface but loopback (--network=none) and no
    host unix socket (host-uds=none), even one bound in the project's own dir."""
    import socket as sockets

    project = compiles.project("network", {"main.tex": HELLO})
    host_socket = project / "host.sock"
    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    listener.bind(str(host_socket))
    listener.listen(1)
    listener.setblocking(False)
    os.chmod(host_socket, 0o777)
    rc = perl_rc(
        rf"""
use Socket;
my ($s, $t);
my $r = !socket($s, PF_INET, SOCK_STREAM, 0) ? "socket: $!"
    : connect($s, pack_sockaddr_in(80, inet_aton("192.0.2.1"))) ? "connected" : "connect: $!";
my $u = !socket($t, PF_UNIX, SOCK_STREAM, 0) ? "unix: $!"
    : connect($t, pack_sockaddr_un("{host_socket}")) ? "unix connected" : "unix connect: $!";
open(my $f, '>', 'net-result'); print $f "$r\n$u\n"; close $f;
"""
    )
    (project / "latexmkrc").write_text(rc)
    try:
        code, result, _ = compiles.compile(project)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no compile reached the host's socket
    finally:
        listener.close()
        host_socket.unlink()
    assert code == 0, result
    lines = (project / "net-result").read_text().splitlines()
    assert lines == ["socket: Operation not permitted", "unix: Operation not permitted"]


def test_host_files_and_other_projects_cannot_be_read(
    compiles: Compiles, other: Path, host_secret: Path
) -> None:
    targets = ["/etc/shadow", str(host_secret), str(other / "secret.txt"), "../victim/secret.txt"]
    rc = perl_rc(
        "open(my $out, '>', 'leak');\n"
        + "".join(
            f"if (open(my $f, '<', '{t}')) {{ print $out '{t}: ', <$f>; }} "
            f"else {{ print $out '{t}: ', \"$!\\n\"; }}\n"
            for t in targets
        )
        + "close $out;"
    )
    tex = HELLO.replace("Hello", r"\IfFileExists{/etc/shadow}{\input{/etc/shadow}}{}Hello")
    project = compiles.project("reader", {"main.tex": tex, "latexmkrc": rc})
    code, result, _ = compiles.compile(project)
    leak = (project / "leak").read_text()
    assert "HOST-SECRET" not in leak and "VICTIM-SECRET" not in leak, leak
    assert "root:" not in leak, leak  # the image's own shadow is root's alone
    assert f"{host_secret}: No such file or directory" in leak
    assert "/etc/shadow: Permission denied" in leak
    assert code in (0, 1), result  # \input of an unreadable file may be a LaTeX error


def test_nothing_outside_the_compile_dir_can_be_written(
    compiles: Compiles, other: Path, host_secret: Path
) -> None:
    targets = ["/etc/evil", "/evil", "/usr/evil", str(compiles.root / "evil"),
               str(other / "evil"), "../victim/evil", str(host_secret)]  # fmt: skip
    rc = perl_rc(
        "open(my $out, '>', 'write-result');\n"
        + "".join(
            f"print $out '{t}: ', (open(my $f, '>', '{t}') ? 'written' : \"$!\"), \"\\n\";\n"
            for t in targets
        )
        + "close $out;"
    )
    project = compiles.project("writer", {"main.tex": HELLO, "latexmkrc": rc})
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    lines = (project / "write-result").read_text().splitlines()
    written = [line for line in lines if line.endswith("written")]
    if compiles.runtime == "runc":
        assert written == [], lines
    else:
        # gVisor makes the dirs above a bind mount 0777 where runc makes them 0755: the test's
        # compiles root is under /tmp, so its copy inside the container is on the compile's own
        # tmpfs, and the compile may write there (never on the host: the host's root has no
        # evil, and host_secret is unchanged, checked by its fixture). The
        # product's root, /var/lib/sharelatex/..., is under the read-only root instead.
        assert written == [f"{compiles.root / 'evil'}: written", f"{host_secret}: written"]
    assert not (compiles.root / "evil").exists()
    assert not (compiles.root.parent / "evil").exists()


def test_a_planted_symlink_reaches_no_host_file(
    compiles: Compiles, other: Path, host_secret: Path
) -> None:
    project = compiles.project(
        "symlinks", {"main.tex": HELLO.replace("Hello", r"\input{stolen.tex}Hello")}
    )
    (project / "stolen.tex").symlink_to(host_secret)
    (project / "output.log").symlink_to(host_secret)  # the log collection must not follow it
    (project / "output.pdf").symlink_to(other / "secret.txt")
    code, result, _ = compiles.compile(project)
    assert code == 1, result  # the link's target is not there inside the sandbox
    assert result["pdf"] is None
    assert result["log"] in (None, str(project / "output.log"))
    if result["log"] is not None:
        assert not (project / "output.log").is_symlink()
    assert "HOST-SECRET" not in str(result) and "VICTIM-SECRET" not in str(result)
    for name in ("output.pdf", "output.log"):
        path = project / name
        if path.exists() and not path.is_symlink():
            assert b"HOST-SECRET" not in path.read_bytes()


def test_a_daemon_a_project_starts_does_not_outlive_its_compile(
    compiles: Compiles, other: Path
) -> None:
    """A latexmkrc that forks a process into a session of its own (out of the compile's
    process group) to watch the project's next compiles: gone when the compile ends."""
    rc = perl_rc(
        r"""
my $pid = fork();
if ($pid == 0) { POSIX::setsid(); exec("sleep", "300"); }
open(my $f, '>', 'daemon-started'); print $f "$pid\n"; close $f;
"""
    ).replace("my $pid", "use POSIX;\nmy $pid", 1)
    project = compiles.project("daemon", {"main.tex": HELLO, "latexmkrc": rc})
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    assert (project / "daemon-started").exists()
    for container in compiles.containers().split():  # the project's warm container, if up
        top = subprocess.run(
            ["docker", "-H", f"unix://{compiles.engine.socket}", "top", container],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "sleep 300" not in top.stdout, top.stdout
    compiles.wait_no_containers(timeout=20)  # its idle watchdog sees nothing left running


def test_a_fork_bomb_hits_the_process_limit(compiles: Compiles, other: Path) -> None:
    rc = perl_rc('for (1 .. 100000) { my $p = fork(); die "fork: $!\\n" unless defined $p; '
                 "if ($p == 0) { sleep 60; exit 0; } }")  # fmt: skip
    project = compiles.project("forkbomb", {"main.tex": HELLO, "latexmkrc": rc})
    code, result, _ = compiles.compile(project)
    assert code == 2, result
    if compiles.runtime == "runc":
        assert result["limit"] in ("processes", "timeout"), result
    else:
        # gVisor: each process costs the sandbox host memory too (its stub, the Sentry's
        # task state), so a fork bomb may reach the memory limit before RLIMIT_NPROC.
        assert result["limit"] in ("processes", "timeout", "memory"), result
    assert result["seconds"] < TIMEOUT + 10


def test_eating_memory_in_lualatex_is_killed(compiles: Compiles, other: Path) -> None:
    tex = r"""\documentclass{article}
\begin{document}
\directlua{local t = {} for i = 1, 100000 do t[i] = string.rep("x", 1048576 + i) end}
\end{document}
"""
    project = compiles.project("memory", {"main.tex": tex})
    # The memory limit must be what stops it, not the timeout. Under gVisor's ptrace platform
    # the eater's time to 256 MiB varies widely: 4.6 to 15.1 s over 14 runs here, against the
    # module's 15 s timeout (which stopped it first in 6 of 18 earlier runs).
    code, result, _ = compiles.compile(project, "--engine", "lualatex", "--timeout", "60")
    assert code == 2, result
    assert result["limit"] == "memory", result
    assert "256 MiB" in result["reason"]
    assert result["seconds"] < 60


@pytest.mark.parametrize("killer", ["kernel", "engine"])
def test_a_container_killed_under_its_compile_is_the_memory_limit_unless_the_engine_killed_it(
    compiles: Compiles, other: Path, killer: str
) -> None:
    """The OOM killer's SIGKILL ends the container's PID 1 from outside, with no word from the
    engine when containerd lost its event (the cgroup gone first: gVisor's whole sandbox dies
    with it). Here the host's SIGKILL to that PID 1 stands in for it, on the real engine: the
    memory limit. The engine's own kill (`docker kill`, an operator) is not the compile's."""
    name = f"killed-by-{killer}-{compiles.runtime}"
    started = "started"
    rc = perl_rc(f"open(my $f, '>', '{started}'); close($f); sleep 60;")
    project = compiles.project(name, {"main.tex": HELLO, "latexmkrc": rc})
    done: list[tuple[int, dict[str, object], str]] = []

    def compile_it() -> None:  # its own timeout, past the module's 15 s: the kill ends it
        done.append(compiles.compile(project, "--timeout", "90"))

    compiling = threading.Thread(target=compile_it)
    compiling.start()
    try:
        wait_for(lambda: (project / started).exists(), 60, "the compile to start")
        ours = ("ps", "-q", "--no-trunc", "--filter", f"label={PROJECT_LABEL}={name}")
        (container,) = compiles.engine.docker(*ours).split()
        if killer == "engine":
            compiles.engine.docker("kill", "--signal", "KILL", container)
        else:
            pid = compiles.engine.docker("inspect", "--format", "{{.State.Pid}}", container)
            os.kill(int(pid), signal.SIGKILL)
    finally:
        compiling.join(150)
    ((code, result, _),) = done
    assert result["seconds"] < 45, result  # ended by the kill, not by its sleep or timeout
    if killer == "kernel":
        assert (code, result["limit"]) == (2, "memory"), result
    else:
        assert code == 1 and result["limit"] is None, result
        assert "container ended" in result["reason"], result


def test_a_compile_that_sigkills_its_agent(compiles: Compiles, other: Path) -> None:
    """Under runc Linux drops the SIGKILL (the agent is its namespace's PID 1): the compile goes
    on. gVisor delivers it: the compile ends its own container, which reads as the memory limit
    (a SIGKILL the engine did not send, `ContainerEnd`), and the project's next compile runs."""
    name = f"kills-agent-{compiles.runtime}"
    project = compiles.project(name, {"main.tex": HELLO, "latexmkrc": perl_rc("kill 'KILL', 1;")})
    code, result, _ = compiles.compile(project)
    if compiles.runtime == "runc":
        assert code == 0, result
    else:
        assert (code, result["limit"]) == (2, "memory"), result
    (project / "latexmkrc").unlink()
    code, result, _ = compiles.compile(project)
    assert code == 0, result


def test_an_infinite_loop_ends_at_the_timeout(compiles: Compiles, other: Path) -> None:
    name = f"loop-{compiles.runtime}"  # the module's engine serves both runtimes' sites
    project = compiles.project(name, {"main.tex": HELLO})
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    ours = ("ps", "-aq", "--filter", f"label={PROJECT_LABEL}={name}")
    warm = set(compiles.engine.docker(*ours).split())
    assert warm, "the project's warm container"
    (project / "main.tex").write_text(HELLO.replace("Hello", r"\def\x{\x}\x"))
    code, result, _ = compiles.compile(project, "--timeout", "5")
    assert code == 2, result
    assert result["limit"] == "timeout"
    assert "5 s" in result["reason"]
    assert 5 <= result["seconds"] < 5 + 8
    # Past a limit, the project's container is removed before the project's next compile
    # (its client is answered meanwhile): that compile starts in a fresh one.
    (project / "main.tex").write_text(HELLO)
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    now = set(compiles.engine.docker(*ours).split())
    assert now and not now & warm, (warm, now)


def test_a_latex_error_keeps_the_projects_container(compiles: Compiles, other: Path) -> None:
    """latexmk's and TeX's own exits keep the warm container; only a limit replaces it."""
    project = compiles.project("error-kept", {"main.tex": HELLO.replace("Hello", r"\oops")})
    code, result, _ = compiles.compile(project)
    assert code == 1, result
    kept = compiles.containers()
    assert kept != ""
    code, result, _ = compiles.compile(project)
    assert code == 1, result
    assert compiles.containers() == kept


def test_a_huge_output_file_hits_the_size_limit(compiles: Compiles, other: Path) -> None:
    tex = r"""\documentclass{article}
\newwrite\big
\begin{document}
\immediate\openout\big=big.txt
\loop\immediate\write\big{xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx}\iftrue\repeat
\end{document}
"""
    project = compiles.project("huge", {"main.tex": tex})
    code, result, _ = compiles.compile(project)
    assert code == 2, result
    assert result["limit"] == "output size", result
    assert (project / "big.txt").stat().st_size <= 8 << 20


@pytest.mark.parametrize("project_id", ["..", "../victim", "a/../../b", ".hidden", "x" * 65])
def test_a_project_id_with_dots_is_refused(
    compiles: Compiles, other: Path, project_id: str
) -> None:
    project = compiles.project("honest", {"main.tex": HELLO})
    code, result, _ = compiles.compile(project, "--project", project_id)
    assert code == 78, result
    assert result["status"] == "config"
    assert "project id" in result["reason"]
    assert not (project / "output.pdf").exists()


def test_a_dir_that_links_out_of_the_compiles_root_is_refused(
    compiles: Compiles, other: Path
) -> None:
    (compiles.root / "escape").symlink_to(compiles.root.parent)
    try:
        code, result, _ = compiles.compile(compiles.root / "escape")
    finally:
        (compiles.root / "escape").unlink()
    assert code == 78, result
    assert "leads out of" in result["reason"]


def test_an_image_outside_the_allow_list_is_refused(compiles: Compiles, other: Path) -> None:
    project = compiles.project("image", {"main.tex": HELLO})
    code, result, _ = compiles.compile(project, "--image", "evil/texlive:latest")
    assert code == 78, result
    assert "ALL_TEX_LIVE_DOCKER_IMAGES" in result["reason"]


def test_a_missing_image_is_not_ready_with_the_installers_progress(
    compiles: Compiles, other: Path
) -> None:
    import json

    missing = "sharelatex-init/texlive:missing"
    compiles.status_file.with_name("texlive.json").write_text(
        json.dumps(
            {
                "ready": False,
                "default": missing,
                "images": [
                    {
                        "image": missing,
                        "state": "installing",
                        "percent": 43.0,
                        "bytes_done": 1_200_000_000,
                        "bytes_total": 2_800_000_000,
                        "rate": 1e7,
                        "eta_seconds": 180,
                    }
                ],
            }
        )
    )
    project = compiles.project("notready", {"main.tex": HELLO})
    code, result, _ = compiles.compile(project, TEX_LIVE_DOCKER_IMAGE=missing)
    assert code == 75, result
    assert result["reason"] == (
        f"TeX Live image {missing} is still installing: 43% (1.2 of 2.8 GB), about 3 min left"
    )
    compiles.status_file.with_name("texlive.json").unlink()
    code, result, _ = compiles.compile(project, TEX_LIVE_DOCKER_IMAGE=missing)
    assert code == 75, result
    assert "is not in the engine" in result["reason"]


def test_sigterm_ends_a_running_compile_and_its_container(compiles: Compiles, other: Path) -> None:
    import sys
    import time

    project = compiles.project("stopped", {"main.tex": HELLO.replace("Hello", r"\def\x{\x}\x")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "init.compiles.command", str(project), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=compiles.env(),
    )  # fmt: skip
    wait_for(lambda: compiles.containers() != "", 30, "the compile's container")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    proc.wait(15)
    assert proc.returncode == -signal.SIGTERM
    assert time.monotonic() - began < 5
    # The container goes behind the broker's answer (init.broker.execute): not kept.
    compiles.wait_no_containers()


def test_twenty_projects_at_once_all_compile(compiles: Compiles, other: Path) -> None:
    import sys

    # Twenty under both runtimes, with the battery's 256 MiB. Under gVisor on a loaded machine
    # this once lost 1 in 20: a compile's `kill -1` killed the watchdog's `$(date)` (the
    # container ended under the compile's exit status), and a first exec late by more than
    # the idle time found its container gone (init.compiles.profile.watchdog_command).
    count = 20
    projects = [compiles.project(f"many{i}", {"main.tex": HELLO}) for i in range(count)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "init.compiles.command", str(p), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=compiles.env(),
        )
        for p in projects
    ]
    codes = [proc.wait(180) for proc in procs]
    assert codes == [0] * count, [(proc.stdout.read(), proc.stderr.read()) for proc in procs]
    for p in projects:
        assert (p / "output.pdf").read_bytes().startswith(b"%PDF")


def test_sibling_mode_binds_the_host_path(compiles: Compiles, other: Path) -> None:
    """The runner sees the compiles dir at the product's path (bound from a host dir, as in a
    sibling container); the engine binds the host dir behind it into the compile container."""
    import json
    import sys

    host_dir = compiles.root.parent / "host-compiles"
    (host_dir / "sib").mkdir(parents=True)
    (host_dir / "sib" / "main.tex").write_text(HELLO)
    texlive_engine.chown_tree(host_dir, 33)
    inside = "/var/lib/overleaf/data/compiles"
    # The site's own view of its data dir is the namespace's: its compile broker runs there
    # too, as it runs in the site's container.
    socket_path = host_dir.parent / "sibling-broker.sock"
    script = "\n".join(
        [
            "set -e",
            "mount -t tmpfs tmpfs /var/lib",
            f"mkdir -p {inside}",
            f"mount --bind '{host_dir}' {inside}",
            f"{sys.executable} -m init.broker.service 2>'{socket_path}.log' & broker=$!",
            f"while [ ! -S '{socket_path}' ] && kill -0 $broker; do sleep 0.05; done",
            'set +e; "$@"; status=$?',
            "kill -TERM $broker; wait $broker",
            "exit $status",
        ]
    )
    env = compiles.site_env(SANDBOXED_COMPILES_HOST_DIR_COMPILES=str(host_dir))
    del env["OVERLEAF_INIT_COMPILES_DIR"]  # the product's default path
    env[texlive_engine.BROKER_SOCKET] = str(socket_path)
    env["PYTHONPATH"] = str(texlive_engine.REPO)
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         sys.executable, "-m", "init.compiles.command", f"{inside}/sib", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pdf"] == f"{inside}/sib/output.pdf"
    # Made by the compile container through the host path: there on the host.
    assert (host_dir / "sib" / "output.pdf").read_bytes().startswith(b"%PDF")


# What a compile made of the font caches in its TEXMFVAR and VARTEXFONTS, written into the
# compile dir at latexmk's exit (a latexmkrc's END block: before the compile script empties
# /tmp), and where kpathsea finds sample2e's bitmap font.
FONTS_RC = perl_rc(
    'END { system("find /tmp/texfonts /tmp/texmf-var -type f > made.txt 2>/dev/null;'
    ' kpsewhich tcrm1000.600pk > found.txt") }'
)
T1_ARTICLE = HELLO.replace(
    r"\begin{document}", "\\usepackage[T1]{fontenc}\n\\begin{document}\n\\textbf{Bold} \\textit{it}"
)


def test_a_fresh_tmp_finds_the_fonts_the_image_made_and_makes_none(site: Compiles) -> None:
    """Every compile starts with an empty /tmp (issue #15), so a font cache a compile made there
    is gone for the next: the image holds them read-only instead (init/texlive/recipes). Twice
    each, the second in a warm container, as a project's next compile: mktexpk (~2 s a font)
    and luaotfload's font loader make nothing; pdflatex's PK font comes from the image."""
    documents = {
        "fonts-sample2e": ("\\input{sample2e}\n", "pdflatex"),
        "fonts-t1": (T1_ARTICLE, "pdflatex"),
        "fonts-lualatex": (HELLO, "lualatex"),
    }
    for name, (text, engine) in documents.items():
        project = site.project(name, {"main.tex": text, "latexmkrc": FONTS_RC})
        for _ in range(2):
            (project / "made.txt").unlink(missing_ok=True)
            code, result, stderr = site.compile(project, "--engine", engine)
            assert code == 0, (name, result, stderr)
            made = (project / "made.txt").read_text().split()
            # luaotfload indexes the font names in its writable cache whatever the image
            # holds (it looks for that index nowhere else): its font caches are the image's.
            assert [path for path in made if "/names/" not in path] == [], (name, made)
    found = (site.root / "fonts-sample2e" / "found.txt").read_text().strip()
    assert found.startswith("/var/lib/texmf/fonts/pk/"), found
    site.wait_no_containers()  # as `other` does: the module's teardown then finds none to end
