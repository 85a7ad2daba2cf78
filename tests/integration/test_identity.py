"""Who a compile is, and what it leaves: attacks on the per-project uid and on carry-over
between compiles, by hostile projects compiled for real (the TeX Live image in a private
dockerd; init.compiles.identity, init.compiles.profile).

- per-user kernel limits: a compile that takes every inotify instance, pending signal or pipe
  buffer page its uid may have leaves the site's (www-data's) untouched;
- identity: each project its own uid, the dir's group and no other, no root group, no setuid
  or setgid file left behind;
- carry-over: whatever one compile plants in /tmp or HOME (a .latexmkrc, texmf.cnf, a font
  cache, a 0000 dir) is gone before the next, and gone already when the compile ends;
- cleaning: what a hostile compile leaves in its dir, the services (www-data) can read and
  delete, even when it killed the shell that hands it back.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from init.config import DEFAULT_COMPILE_UIDS
from tests.integration import texlive_engine
from tests.integration.conftest import wait_for
from tests.integration.texlive_engine import WWW_DATA, Compiles

texlive = texlive_engine.texlive
site = texlive_engine.site

pytestmark = pytest.mark.root
HELLO = "\\documentclass{article}\n\\begin{document}\nHello, identity.\n\\end{document}\n"
SITE_PYTHON = "/usr/bin/python3"  # the site's own process: run as www-data, not from the venv


@pytest.fixture(params=texlive_engine.RUNTIMES)
def compiles(request: pytest.FixtureRequest, site: Compiles) -> Iterator[Compiles]:
    """Under runc and gVisor's runsc alike."""
    made = texlive_engine.with_runtime(site, request.param)
    yield made
    made.wait_no_containers()


@pytest.fixture
def runc(site: Compiles) -> Iterator[Compiles]:
    """Under runc only: the host kernel's per-user counts are what is attacked (under gVisor
    the Sentry keeps inotify, signals and pipes inside the sandbox)."""
    made = texlive_engine.with_runtime(site, "runc")
    yield made
    made.wait_no_containers()


def as_www_data(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`argv` as the site's services run: uid and gid 33, no other group."""
    return subprocess.run(
        argv, user=WWW_DATA, group=WWW_DATA, extra_groups=[], capture_output=True, text=True,
        timeout=60, cwd=cwd,
    )  # fmt: skip


def start_compile(compiles: Compiles, project: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "init.compiles.command", str(project), "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=compiles.env(),
        cwd=texlive_engine.REPO,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, err
    return proc.returncode, json.loads(lines[-1])


# -- per-user kernel limits -------------------------------------------------------------------

# A latexmkrc takes what its uid may have of one resource, says so in `held` (written whole,
# then renamed), and keeps it until the test writes `release` (at most 30 s).
HOLD = r"""
use POSIX ();
sub held { open(my $f, '>', 'held.tmp'); print $f "@_\n"; close $f; rename('held.tmp', 'held'); }
sub wait_release { for (1 .. 300) { last if -e 'release'; select(undef, undef, undef, 0.1); } }
"""
TAKE = {
    # inotify_init1(0) (x86_64 syscall 294) until the uid's max_user_instances (128) is reached.
    "inotify": r"""
my $n = 0; my $err = 0;
while ($n < 5000) { my $fd = syscall(294, 0); if ($fd < 0) { $err = $! + 0; last; } $n++; }
held($n, $err); wait_release();
""",
    # SIGRTMIN (34), blocked, queued to a child until the uid's RLIMIT_SIGPENDING is reached:
    # SigQ in /proc/self/status is the count of the process's real uid, and its limit.
    "signals": r"""
sub sigq { open(my $s, '<', '/proc/self/status');
           while (<$s>) { return ($1, $2) if /^SigQ:\s+(\d+)\/(\d+)/ } return (0, 0); }
POSIX::sigprocmask(POSIX::SIG_BLOCK(), POSIX::SigSet->new(34));
my $child = fork();
if ($child == 0) { wait_release(); POSIX::_exit(0); }
my ($count, $limit) = sigq();
kill(34, $child) for 1 .. $limit + 10;
($count, $limit) = sigq();
held($count, $limit); wait_release(); kill('KILL', $child); waitpid($child, 0);
""",
    # Pipes grown to 1 MiB (F_SETPIPE_SZ) until the uid is near pipe-user-pages-soft, then new
    # pipes of 16 pages until the uid is at it: the next pipe it makes then gets 2 pages instead
    # of 16 (F_GETPIPE_SZ). What else the uid holds (the compile agent's own output pipes) is
    # taken up by the second loop.
    "pipes": r"""
my @pipes; my $grown = 0; my $err = 0;
for (1 .. 200) { pipe(my $r, my $w) or last; push @pipes, $r, $w;
                 if (!fcntl($w, 1031, 1048576)) { $err = $! + 0; last; } $grown++; }
my $size = 0;
for (1 .. 1000) { pipe(my $r2, my $w2) or last; push @pipes, $r2, $w2;
                  $size = fcntl($w2, 1032, 0); last if $size < 65536; }
held($grown, $err, $size); wait_release();
""",
}
# What the site (www-data) asks for of the same resource while the compile holds its own.
SITE_TAKES = r"""
import ctypes, fcntl, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
kind = sys.argv[1]
if kind == "inotify":
    fd = libc.inotify_init1(0)
    print(fd >= 0, ctypes.get_errno())
elif kind == "signals":
    class sigval(ctypes.Union):
        _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]
    libc.sigqueue.argtypes = [ctypes.c_int, ctypes.c_int, sigval]
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
    queued = libc.sigqueue(os.getpid(), signal.SIGRTMIN, sigval(0))
    print(queued == 0, ctypes.get_errno())
else:
    r, w = os.pipe()
    print(fcntl.fcntl(w, 1032) == 65536, fcntl.fcntl(w, 1032))
"""


def check_held(kind: str, held: list[str]) -> None:
    """The compile did take all its uid may have (else the test proves nothing)."""
    if kind == "inotify":
        count, err = int(held[0]), int(held[1])
        limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        assert count == limit and err == 24, held  # EMFILE at the uid's limit
    elif kind == "signals":
        count, limit = int(held[0]), int(held[1])
        assert count == limit > 0, held
    else:
        grown, err, size = (int(v) for v in held)
        soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
        # EPERM, then squeezed: the uid is at its soft limit. One 1 MiB pipe fewer under the
        # broker: the agent's two output pipes (16 pages each) are the project's uid's too.
        assert soft // 256 - 1 <= grown <= soft // 256, held
        assert err == 1 and size == 8192, held


@pytest.mark.parametrize("kind", sorted(TAKE))
def test_a_compile_taking_its_uids_whole_share_leaves_the_sites(runc: Compiles, kind: str) -> None:
    project = runc.project(f"hog-{kind}", {"main.tex": HELLO, "latexmkrc": HOLD + TAKE[kind]})
    began = time.monotonic()
    proc = start_compile(runc, project, "--timeout", "60")
    try:
        wait_for(lambda: (project / "held").exists(), 40, "the compile to hold its share")
        took = time.monotonic() - began
        held = (project / "held").read_text().split()
        site_got = as_www_data(SITE_PYTHON, "-c", SITE_TAKES, kind)
    finally:
        (project / "release").write_text("")
    code, result = finish(proc)
    assert code == 0, result
    check_held(kind, held)
    assert site_got.returncode == 0, site_got.stderr
    assert site_got.stdout.split()[0] == "True", (kind, site_got.stdout)
    assert took < 30, took  # held within seconds of the start (the container's, latexmk's)


# -- identity -------------------------------------------------------------------------------

WHO = r"""
open(my $f, '>', 'who');
my ($groups) = grep { /^Groups:/ } do { open(my $s, '<', '/proc/self/status'); <$s> };
print $f "$<|$>|$(|$)\n", $groups;
for my $t (@ARGV_TARGETS) { print $f "$t: ", (open(my $x, '<', $t) ? 'read' : "$!"), "\n"; }
close $f;
"""


def test_each_project_has_a_uid_of_its_own_and_the_dirs_group_alone(
    compiles: Compiles,
) -> None:
    a = compiles.project("who-a", {"main.tex": HELLO, "secret": "A-SECRET\n"})
    b = compiles.project("who-b", {"main.tex": HELLO, "secret": "B-SECRET\n"})
    for me, other in ((a, b), (b, a)):
        targets = f"my @ARGV_TARGETS = ('{other}/secret', '../{other.name}/secret');"
        (me / "latexmkrc").write_text(targets + WHO + "1;\n")
        os.chown(me / "latexmkrc", WWW_DATA, WWW_DATA)
        code, result, _ = compiles.compile(me)
        assert code == 0, result
    uid_a, uid_b = (DEFAULT_COMPILE_UIDS.uid_for(p.name) for p in (a, b))
    assert uid_a != uid_b and WWW_DATA not in (uid_a, uid_b)
    for me, uid in ((a, uid_a), (b, uid_b)):
        ids, groups, *reads = (me / "who").read_text().splitlines()
        real_uid, effective_uid, real_gids, effective_gids = ids.split("|")
        assert (int(real_uid), int(effective_uid)) == (uid, uid), ids
        # gid 33 and no supplementary group but (at most) that one.
        assert set(real_gids.split()) == {"33"} and set(effective_gids.split()) == {"33"}, ids
        assert set(groups.split()[1:]) <= {"33"}, groups
        assert all(line.endswith("No such file or directory") for line in reads), reads
        made = (me / "output.pdf").stat()
        assert (made.st_uid, made.st_gid) == (uid, WWW_DATA)


def test_a_compile_dir_of_group_root_is_refused_naming_why(compiles: Compiles) -> None:
    project = compiles.project("group-root", {"main.tex": HELLO})
    os.chown(project, 4242, 0)
    code, result, _ = compiles.compile(project)
    assert code == 78, result
    assert result["status"] == "config"
    assert "has group root" in result["reason"] and "chgrp" in result["reason"]
    assert not (project / "output.pdf").exists()
    assert compiles.containers() == ""  # refused before any engine call


PLANT_SETID = r"""
open(my $f, '>', 'setid-result');
open(my $x, '>', 'tool'); print $x "#!/bin/sh\nid\n"; close $x;
print $f 'chown root group: ', (chown($<, 0, 'tool') ? 'done' : "$!"), "\n";
print $f 'chmod 6755: ', (chmod(06755, 'tool') ? 'done' : "$!"), "\n";
mkdir('sub'); chmod(0700, 'sub');
open(my $y, '>', 'sub/tool'); close $y; chmod(02755, 'sub/tool');
printf $f "mode: %o\n", (stat('tool'))[2] & 07777;
close $f;
1;
"""


def test_no_setid_file_and_no_root_group_is_left_in_the_dir(compiles: Compiles) -> None:
    project = compiles.project("setid", {"main.tex": HELLO, "latexmkrc": PLANT_SETID})
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    lines = (project / "setid-result").read_text().splitlines()
    assert lines[0] == "chown root group: Operation not permitted", lines
    assert lines[2] == "mode: 6755", lines  # it did make one, for the length of its compile
    for root, dirs, files in os.walk(project):
        for name in dirs + files:
            info = os.lstat(os.path.join(root, name))
            assert info.st_gid != 0, (name, info)
            if stat.S_ISREG(info.st_mode):
                assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(info.st_mode))


# -- carry-over -----------------------------------------------------------------------------

PLANT_TMP = r"""
my $dir = '__DIR__';
open(my $rc, '>', "$ENV{HOME}/.latexmkrc");
print $rc "open(my \$p, '>', '$dir/planted-ran'); close \$p;\n1;\n"; close $rc;
for my $d ('/tmp/texmf-var/web2c', '/tmp/texmf-var/luatex-cache/generic/fonts/otl',
           '/tmp/texfonts/pk/ljfour/public/cm', '/tmp/locked/inner', '/tmp/ro', '/tmp/.hidden') {
    system('mkdir', '-p', $d);
}
for my $f ('/tmp/texmf-var/web2c/texmf.cnf', '/tmp/texmf.cnf') {
    open(my $c, '>', $f); print $c "shell_escape = t\n"; close $c;
}
for my $f ('/tmp/texmf-var/luatex-cache/generic/fonts/otl/lmroman10-regular.luc',
           '/tmp/texfonts/pk/ljfour/public/cm/cmr10.600pk', '/tmp/locked/inner/f',
           '/tmp/ro/f', '/tmp/.hidden/.f') {
    open(my $c, '>', $f); print $c "planted\n"; close $c;
}
chmod(0, '/tmp/locked/inner'); chmod(0, '/tmp/locked'); chmod(0555, '/tmp/ro');
chmod(0, '/tmp/.hidden/.f'); chmod(0, '/tmp/.hidden');
# Many empty files: the clean must stay linear in them (a shell loop over them was not).
for my $i (1 .. __FILES__) { open(my $e, '>', "/tmp/e$i") or last; close $e; }
open(my $done, '>', 'planted'); close $done;
1;
"""
# The next compile's own latexmkrc: what /tmp holds, on /tmp's own filesystem (the test's
# compile dir is bound under /tmp: the dirs above it are there, and nothing else may be).
LIST_TMP = r"""
system("find /tmp -mindepth 1 -xdev > tmp-listing 2>&1");
1;
"""


def ancestors(project: Path) -> list[str]:
    """The dirs the engine made in the container's /tmp to bind `project` there, and it."""
    parts = project.relative_to("/tmp").parts
    return ["/tmp/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def test_nothing_planted_in_tmp_or_home_reaches_the_next_compile(compiles: Compiles) -> None:
    project = compiles.project("plant", {"main.tex": HELLO})
    # Under gVisor (ptrace) syscalls cost far more: with 20,000 files this test took 13.4 s
    # (runc: 1.1 s) on a quiet machine, and CI's load pushed a compile past its 15 s timeout.
    files = "20000" if compiles.runtime == "runc" else "4000"
    rc = PLANT_TMP.replace("__DIR__", str(project)).replace("__FILES__", files)
    (project / "latexmkrc").write_text(rc)
    # A container that idles long enough to be looked into after the compile.
    code, result, _ = compiles.compile(project, OVERLEAF_INIT_COMPILE_IDLE="60")
    containers = compiles.containers().split()
    try:
        assert code == 0, result  # not stopped at the timeout: the clean is no loop in a shell
        assert (project / "planted").exists()  # the attack ran
        assert not (project / "planted-ran").exists()  # latexmk read ~/.latexmkrc before it was
        (container,) = containers
        # Already gone when the compile ended, not only at the next one's start.
        left = compiles.engine.docker("exec", "-u", "0", container, "find", "/tmp", "-mindepth",
                                      "1", "-xdev")  # fmt: skip
        assert sorted(left.split()) == ancestors(project), left
        (project / "latexmkrc").write_text(LIST_TMP)
        code, result, _ = compiles.compile(project, OVERLEAF_INIT_COMPILE_IDLE="60")
        assert code == 0, result
        assert (project / "tmp-listing").read_text().split() == ancestors(project)
        assert not (project / "planted-ran").exists(), "a .latexmkrc planted in HOME ran"
    finally:
        for container in containers:
            compiles.engine.docker("rm", "-f", container)


KILL_ITS_SHELL = r"""
use POSIX ();
mkdir('trap'); mkdir('trap/deep'); open(my $f, '>', 'trap/deep/f'); close $f;
chmod(0, 'trap/deep'); chmod(0, 'trap');
open(my $rc, '>', "$ENV{HOME}/.latexmkrc"); print $rc "1;\n"; close $rc;
# latexmk's parent is `timeout`; its parent is the shell that cleans up after the compile.
open(my $s, '<', '/proc/' . getppid() . '/stat'); my @stat = split(' ', <$s>); close $s;
kill('KILL', $stat[3]);
1;
"""


def test_what_a_hostile_compile_leaves_the_services_can_read_and_delete(
    compiles: Compiles,
) -> None:
    rc = r"""
mkdir('trap'); mkdir('trap/deep'); mkdir('ro');
for my $f ('trap/deep/f', 'ro/f', 'unreadable') { open(my $x, '>', $f); print $x "x\n"; close $x; }
chmod(0, 'trap/deep'); chmod(0555, 'trap'); chmod(0500, 'ro'); chmod(0, 'unreadable');
umask(077); open(my $y, '>', 'private'); print $y "y\n"; close $y;
1;
"""
    project = compiles.project("leftovers", {"main.tex": HELLO, "latexmkrc": rc})
    code, result, _ = compiles.compile(project)
    assert code == 0, result
    read = as_www_data("cat", "unreadable", "private", "output.log", cwd=project)
    assert read.returncode == 0 and read.stdout.startswith("x\ny\n"), read.stderr
    # What CLSI does to a project dir (clearProject: rm -r), as www-data.
    removed = as_www_data("sh", "-c", "rm -rf -- * .[!.]*; ls -A", cwd=project)
    assert removed.returncode == 0 and removed.stdout == "", removed.stdout + removed.stderr


def test_a_compile_that_kills_its_shell_is_cleaned_at_the_next(runc: Compiles) -> None:
    """The shell that hands the dir back and empties /tmp is the compile's to kill: the exec
    then ends with 137 and the container is removed (whatever ran in it with it); the next
    compile of the project hands back what the killed one left."""
    project = runc.project("kills-shell", {"main.tex": HELLO, "latexmkrc": KILL_ITS_SHELL})
    runc.compile(project)  # its status is its own doing: what matters is what it left
    runc.wait_no_containers()
    (project / "latexmkrc").write_text(LIST_TMP)
    code, result, _ = runc.compile(project)
    assert code == 0, result
    assert (project / "tmp-listing").read_text().split() == ancestors(project)
    removed = as_www_data("rm", "-rf", "trap", cwd=project)
    assert removed.returncode == 0 and not (project / "trap").exists(), removed.stderr
