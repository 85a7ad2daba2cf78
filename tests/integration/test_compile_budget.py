"""The compile budget, attacked for real: hostile latexmkrc files that fill the compile dir in
each way a quota-less kernel leaves open (many files under the per-file limit, many empty files,
preallocation, sparse files, a tree made undeletable), compiled by `sharelatex-init compile` as
the services' user (www-data, as the shim runs it), against the TeX Live image.

Each attack must end as a limit (exit 2, limit `disk`) within a bounded time and a bounded
overshoot, leave the project's own files as they were and nothing of what it wrote; fallocate
is refused by the kernel (seccomp) before anything is reserved. The figures of the README's
security table come from these runs (`-s` prints one line per attack).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import texlive_engine
from tests.integration.conftest import wait_for
from tests.integration.test_compile_api import AS_WWW_DATA, www_data_python
from tests.integration.texlive_engine import REPO, Compiles

texlive = texlive_engine.texlive
compiles = texlive_engine.compiles

pytestmark = pytest.mark.root
MiB = 1 << 20
# The budget of these tests: small, so each attack is over it within a fraction of a second
# (the per-file limit is texlive_engine's 8 MiB).
DISK = 64 * MiB
FILES = 5000
BUDGET = {"OVERLEAF_INIT_COMPILE_DISK": "64m", "OVERLEAF_INIT_COMPILE_FILES": str(FILES)}
# How far past the budget an attack may get, and how long after a sample saw it past its
# processes have ended (the agent's kill in its container, `stopped_after`): the bounds
# asserted, with room for a loaded two-core machine. The time from the attack's first write to
# that sample is its own (how fast it writes) plus one sampling period at most; asserted
# loosely, reported in the figures. The overshoot is the write rate times the time to stop:
# page-cache writes of ~300 MiB/s here, and a stop of 0-0.04 s on a quiet run (sparse files
# are excepted: they are made in no time and take no disk).
OVERSHOOT_BYTES = 768 * MiB
OVERSHOOT_FILES = 50_000  # empty files at ~20,000-45,000/s seen here: the weakest bound
KILL_SECONDS = 3.0
# The measure and removal after the stop, in the project's turn: a walk of at most eight
# budgets' worth (AFTER_KILL_BOUND) and the unlinks, 0.06-0.27 s on a quiet run.
SETTLE_SECONDS = 10.0
BITE_SECONDS = 20.0
HELLO = r"""\documentclass{article}
\begin{document}
Hello, budget.
\end{document}
"""
# Each attack first writes the time (to a file of the project, opened in place: its inode
# stays, so the removal keeps it) and then attacks; `1;` lets the compile go on if it lives.
STAMP = "use Time::HiRes qw(time); open(my $t, '>', 'stamp') or die; print $t time; close $t;\n"


def rc(attack: str) -> str:
    return STAMP + attack + "\n1;\n"


# Files under the 8 MiB per-file limit (the 281 MiB in 40 files in about a second), on
# to 1 GiB (136 files): more than the budget and its allowed overshoot, so that the bound on
# the overshoot is a real test (a compile that is never stopped writes all of it).
MANY_FILES = rc(
    "my $block = 'x' x (1 << 20);"
    "for my $i (0..135) { open(my $f, '>', \"junk$i\") or last;"
    " for (1..7) { print $f $block or last } print $f substr($block, 0, 1 << 19); close $f }"
)
# 100,000 empty files (the issue's: in 4 s).
EMPTY_FILES = rc("for my $i (0..99999) { open(my $f, '>', \"e$i\") or last; close $f }")
# glibc's posix_fallocate, refused by the kernel, writes a byte in every block instead: 40
# files of 7.5 MiB (the per-file limit holds it as it holds a write).
POSIX_FALLOCATE = rc(
    "for my $i (0..39) { system('fallocate', '--posix', '-l', '7680K', \"reserved$i\") }"
)
# 40 sparse files of 7.5 MiB each: 300 MiB that no block holds, which any copy fills.
SPARSE = rc(
    "for my $i (0..39) { open(my $f, '>', \"sparse$i\") or last; truncate($f, 7864320); close $f }"
)
# A tree made undeletable (0555) and unreadable (0000), then filled past the budget.
LOCKED_TREE = rc(
    "use File::Path qw(make_path); make_path('trap/a/b'); my $block = 'x' x (1 << 20);"
    "for my $i (0..5) { open(my $f, '>', \"trap/a/b/f$i\") or die; print $f $block for 1..7;"
    " close $f }"
    "chmod 0555, 'trap/a/b', 'trap/a'; chmod 0, 'trap';"
    "for my $i (0..29) { open(my $f, '>', \"junk$i\") or last; print $f $block for 1..7;"
    " close $f; chmod 0555, '.' if $i == 4 }"
)


def fingerprint(directory: Path) -> dict[str, str]:
    """Every entry under `directory` (as root sees it), with a hash of each file's content."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.join(root, name)] = "dir"
        for name in files:
            path = Path(root, name)
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def as_www_data(compiles: Compiles, project: Path, **env: str) -> tuple[int, dict[str, Any], float]:
    """`compile DIR --json` as the services' user (the dir's owner, as the shim runs it):
    (exit status, the JSON, the wall-clock time it returned at)."""
    import json

    python, python_env = www_data_python()
    done = subprocess.run(
        [*AS_WWW_DATA, python, "-m", "init.compiles.command", str(project), "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=compiles.env(HOME="/var/www",
                         **python_env, **{**BUDGET, **env}),
    )  # fmt: skip
    ended = time.time()
    lines = done.stdout.strip().splitlines()
    assert lines, f"no JSON on stdout; stderr:\n{done.stderr}"
    return done.returncode, json.loads(lines[-1]), ended


@pytest.fixture
def www(compiles: Compiles) -> Iterator[Compiles]:
    os.chmod(compiles.engine.base, 0o755)  # mkdtemp's 0700: www-data must reach the socket
    yield compiles
    compiles.wait_no_containers()


def attack(compiles: Compiles, name: str, latexmkrc: str) -> tuple[Path, dict[str, str]]:
    project = compiles.project(
        name, {"main.tex": HELLO, "latexmkrc": latexmkrc, "stamp": "", "figures/a.txt": "A\n"}
    )
    before = fingerprint(project)
    del before[str(project / "stamp")]  # rewritten in place by the attack
    return project, before


def contained(
    compiles: Compiles, project: Path, before: dict[str, str], kind: str, sparse: bool = False
) -> dict[str, float]:
    """Compile the attack; assert the limit, its bounds and the clean-up; its figures."""
    code, result, ended = as_www_data(compiles, project)
    assert code == 2, result
    assert result["status"] == "limit" and result["limit"] == "disk", result
    assert result["reason"].startswith("disk: the compile "), result
    assert result["reason"].endswith("all removed"), result
    assert kind in result["reason"], result
    # Nothing of the attack is left, and the project's own files are as they were.
    after = fingerprint(project)
    stamp = float((project / "stamp").read_text() or "nan")
    del after[str(project / "stamp")]
    assert after == before
    written = result["written"]
    # From the sample that saw it past to its processes' end; then the measure and removal of
    # what it wrote (its `seconds` run from its start to the end of that removal).
    kill = written["stopped_after"] - written["seen_after"]
    settle = result["seconds"] - written["stopped_after"]
    figures = {"first_write_to_end_s": round(ended - stamp, 2), "seen_after_s":
               written["seen_after"], "kill_s": round(kill, 2), "settle_s": round(settle, 2),
               "written_mib": round(written["bytes"] / MiB, 1),
               "files": written["files"]}  # fmt: skip
    print(f"\nbudget: {project.name}: {figures}")
    assert 0 < ended - stamp < BITE_SECONDS, figures
    assert 0 <= kill < KILL_SECONDS, figures
    assert settle < SETTLE_SECONDS, figures
    if not sparse:
        assert written["bytes"] < DISK + OVERSHOOT_BYTES, figures
    assert written["files"] < FILES + OVERSHOOT_FILES, figures
    return figures


def test_a_normal_compile_is_within_its_budget(www: Compiles) -> None:
    project = www.project("normal", {"main.tex": HELLO})
    code, result, _ = as_www_data(www, project)
    assert code == 0, result
    assert result["written"] is None
    assert (project / "output.pdf").read_bytes().startswith(b"%PDF")


def test_300_mib_in_files_under_the_per_file_limit_is_stopped(www: Compiles) -> None:
    project, before = attack(www, "manyfiles", MANY_FILES)
    contained(www, project, before, "wrote more than 64.0 MiB")


def test_100000_empty_files_are_stopped(www: Compiles) -> None:
    project, before = attack(www, "emptyfiles", EMPTY_FILES)
    figures = contained(www, project, before, f"made more than {FILES} files")
    assert figures["files"] > FILES


def test_posix_fallocate_writes_blocks_that_count(www: Compiles) -> None:
    project, before = attack(www, "posixfallocate", POSIX_FALLOCATE)
    contained(www, project, before, "wrote more than 64.0 MiB")


def test_sparse_files_count_by_their_size(www: Compiles) -> None:
    project, before = attack(www, "sparse", SPARSE)
    contained(www, project, before, "wrote more than 64.0 MiB", sparse=True)


def test_a_tree_made_undeletable_is_removed(www: Compiles) -> None:
    project, before = attack(www, "locked", LOCKED_TREE)
    contained(www, project, before, "wrote more than 64.0 MiB")
    assert not (project / "trap").exists()
    assert os.stat(project).st_mode & 0o700 == 0o700  # its owner can write to it again


@pytest.mark.parametrize("flags", [(), ("--keep-size",)], ids=["plain", "keep-size"])
def test_fallocate_is_refused_and_reserves_nothing(www: Compiles, flags: tuple[str, ...]) -> None:
    """The kernel refuses it (seccomp: EOPNOTSUPP); the compile goes on and makes its PDF."""
    args = ", ".join(f"'{a}'" for a in ("fallocate", *flags, "-l", "300M", "reserved"))
    project = www.project(
        f"fallocate{len(flags)}",
        {"main.tex": HELLO, "status": "",
         "latexmkrc": f"system({args}); open(my $s, '>', 'status'); print $s $?; close $s;\n1;\n"},
    )  # fmt: skip
    code, result, _ = as_www_data(www, project)
    assert code == 0, result
    assert (project / "status").read_text() == str(1 << 8)  # fallocate(1) exited 1
    reserved = project / "reserved"
    assert not reserved.exists() or reserved.stat().st_blocks == 0


def test_no_container_is_left(www: Compiles) -> None:
    wait_for(lambda: www.containers() == "", 20, "no compile container left")


def test_empty_files_in_tmp_are_bounded_by_its_inodes(www: Compiles) -> None:
    """/tmp (a tmpfs of the container) counts no bytes for an empty file: its nr_inodes does."""
    made = (
        "my $n = 0; for my $i (0..99999) { open(my $f, '>', \"/tmp/e$i\") or last; close $f;"
        " $n++ } open(my $s, '>', 'count'); print $s $n; close $s;\n1;\n"
    )
    project = www.project("tmpinodes", {"main.tex": HELLO, "count": "", "latexmkrc": made})
    code, result, _ = as_www_data(www, project)
    assert code == 0, result
    count = int((project / "count").read_text())
    assert 10_000 < count < 16_384, count  # what the compile's own /tmp already holds, less
