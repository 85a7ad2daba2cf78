"""A compile's budget of bytes and files (init.compiles.budget): how a dir's usage is counted,
when a compile is past its budget, and what is removed after; the limit as the compile command,
the log note and the variables say it; `fallocate` refused by the seccomp profile."""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import pytest

from init import config
from init.compiles import budget, log_note
from init.compiles.budget import Budget, Entry, Overrun, Settled, Usage
from init.compiles.contract import Limit, Status
from init.compiles.outcome import Ran, classify
from init.compiles.paths import CompileDir
from init.compiles.profile import SECCOMP_PROFILE, Job, latexmk_command, load_seccomp
from init.compiles.settings import Limits, limits_from_env
from init.errors import ConfigError

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 1


def project(tmp_path: Path) -> Path:
    directory = tmp_path / "p1"
    (directory / "figures").mkdir(parents=True)
    (directory / "main.tex").write_text("\\documentclass{article}\n")
    (directory / "figures" / "a.png").write_bytes(b"\x89PNG" * 1000)
    return directory


# -- counting -------------------------------------------------------------------------------


def test_every_entry_counts_as_a_file_and_a_file_by_what_it_takes(tmp_path: Path) -> None:
    directory = project(tmp_path)
    usage = budget.measure(directory)
    assert usage.files == 3  # figures/, figures/a.png, main.tex
    assert usage.bytes >= 4000 + len("\\documentclass{article}\n")
    assert not usage.stopped and usage.hidden == ""


def test_a_sparse_file_counts_by_its_size_and_a_link_to_it_once(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    directory.mkdir()
    with (directory / "sparse").open("wb") as f:
        f.truncate(300 * MiB)  # no block of it written
    assert os.stat(directory / "sparse").st_blocks * 512 < MiB
    os.link(directory / "sparse", directory / "again")
    usage = budget.measure(directory)
    assert usage.files == 2
    assert 300 * MiB <= usage.bytes < 301 * MiB


def test_blocks_preallocated_past_the_size_count_by_the_blocks(tmp_path: Path) -> None:
    """FALLOC_FL_KEEP_SIZE, as the seccomp profile refuses it to a compile: if it ever got
    through, its blocks would count all the same."""
    path = tmp_path / "p" / "reserved"
    path.parent.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    with path.open("wb") as f:
        done = libc.fallocate(f.fileno(), FALLOC_FL_KEEP_SIZE, ctypes.c_long(0),
                              ctypes.c_long(64 * MiB))  # fmt: skip
    assert done == 0, os.strerror(ctypes.get_errno())
    assert path.stat().st_size == 0
    assert budget.measure(path.parent).bytes >= 64 * MiB


def test_a_walk_stops_once_past_its_bounds(tmp_path: Path) -> None:
    directory = tmp_path / "many"
    directory.mkdir()
    for i in range(500):
        (directory / f"f{i}").touch()
    usage = budget.measure(directory, stop_files=10)
    assert usage.stopped and usage.files == 11
    (directory / "big").write_bytes(b"x" * MiB)
    assert budget.measure(directory, stop_bytes=MiB // 2).stopped
    assert not budget.measure(directory).stopped


def test_a_dir_made_unreadable_is_read_after_giving_its_owner_rwx(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    (directory / "hid").mkdir(parents=True)
    (directory / "hid" / "x").write_bytes(b"x" * 5000)
    os.chmod(directory / "hid", 0)
    usage = budget.measure(directory)
    assert usage.hidden == "" and usage.files == 2 and usage.bytes >= 5000


# -- the judgement --------------------------------------------------------------------------


def test_past_the_budget_by_bytes_files_or_a_hidden_dir() -> None:
    start = Usage(bytes=50 * MiB, files=10)
    limit = Budget(bytes=100 * MiB, files=1000)
    assert budget.overrun(start, Usage(150 * MiB, 1010), limit) is None  # exactly the budget
    assert budget.overrun(start, Usage(150 * MiB + 1, 11), limit) == Overrun(
        "bytes", 100 * MiB + 1, 1
    )
    assert budget.overrun(start, Usage(0, 1011), limit) == Overrun("files", -50 * MiB, 1001)
    hidden = budget.overrun(start, Usage(0, 0, hidden="a/b"), limit)
    assert hidden is not None and hidden.kind == "hidden" and hidden.hidden == "a/b"
    # A bound of 0 is off; a project's files deleted leave room for as much.
    assert budget.overrun(start, Usage(10 << 30, 10), Budget(0, 1000)) is None
    assert budget.overrun(start, Usage(140 * MiB, 10), Budget(100 * MiB, 0)) is None


def test_a_walk_s_bounds_are_the_start_plus_the_budget() -> None:
    assert budget.bounds(Usage(5, 7), Budget(100, 10)) == (105, 17)
    assert budget.bounds(Usage(5, 7), Budget(0, 10)) == (0, 17)  # 0: no bound on the walk


def test_the_watcher_sees_what_was_written_since_its_start(tmp_path: Path) -> None:
    directory = project(tmp_path)
    woken = []
    watcher = budget.Watcher(directory, Budget(bytes=MiB, files=50), lambda: woken.append(1))
    assert watcher.check() is None
    for i in range(51):
        (directory / f"f{i}").touch()
    found = watcher.stop()  # the last sample, as after a compile that ended between two
    assert found is not None and found.kind == "files" and found.files == 51
    assert watcher.overrun == found and woken == []  # only the sampling thread wakes the runner


def test_the_watcher_off_walks_nothing(tmp_path: Path) -> None:
    watcher = budget.Watcher(project(tmp_path), Budget(0, 0), lambda: None)
    assert watcher.start_entries == frozenset() and watcher.stop() is None
    assert watcher.samples == 0


# -- removal --------------------------------------------------------------------------------


def test_the_plan_removes_only_new_entries_deepest_first() -> None:
    entries = [
        Entry("main.tex", 1, False),
        Entry("junk", 10, True),
        Entry("junk/a", 11, False),
        Entry("junk/deep", 12, True),
        Entry("junk/deep/b", 13, False),
        Entry("output.pdf", 14, False),
        Entry("figures", 2, True),
        Entry("figures/new.png", 15, False),
    ]
    plan = budget.removal_plan(entries, frozenset({("main.tex", 1), ("figures", 2)}))
    assert [e.path for e in plan] == [
        "junk/deep/b", "figures/new.png", "junk/a", "junk/deep", "junk", "output.pdf",
    ]  # fmt: skip


def test_a_new_dir_holding_a_project_file_stays_with_it() -> None:
    entries = [Entry("moved", 10, True), Entry("moved/main.tex", 1, False),
               Entry("moved/junk", 11, False), Entry("moved/link", 1, False)]  # fmt: skip
    plan = budget.removal_plan(entries, frozenset({("main.tex", 1)}))
    assert [e.path for e in plan] == ["moved/junk", "moved/link"]


def test_a_hard_link_to_a_project_file_goes_and_the_file_stays() -> None:
    entries = [Entry("main.tex", 1, False), Entry("l0", 1, False), Entry("l1", 1, False)]
    plan = budget.removal_plan(entries, frozenset({("main.tex", 1)}))
    assert [e.path for e in plan] == ["l0", "l1"]


def test_removal_cleans_an_undeletable_tree_and_keeps_the_project(tmp_path: Path) -> None:
    directory = project(tmp_path)
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    _, start = budget.snapshot(directory)
    tree = directory / "trap" / "inner"
    tree.mkdir(parents=True)
    (tree / "f").write_bytes(b"x" * 100)
    (directory / "figures" / "b.png").write_bytes(b"y")
    os.link(directory / "main.tex", directory / "hardlink")
    os.chmod(tree, 0o555)
    os.chmod(directory / "trap", 0)
    os.chmod(directory / "figures", 0o555)
    removed, left = budget.remove_new(directory, start)
    assert left == [] and removed == 5  # trap, trap/inner, trap/inner/f, figures/b.png, hardlink
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    assert not (directory / "trap").exists()


def test_settle_counts_what_was_written_then_removes_it(tmp_path: Path) -> None:
    directory = project(tmp_path)
    watcher = budget.Watcher(directory, Budget(bytes=MiB, files=0), lambda: None)
    (directory / "big").write_bytes(b"z" * (2 * MiB))
    assert watcher.stop() is not None
    settled = budget.settle(watcher)
    assert settled.bytes >= 2 * MiB and settled.files == 1
    assert settled.removed == 1 and settled.left == ()
    assert not (directory / "big").exists() and (directory / "main.tex").exists()


def test_settle_times_the_stop_apart_from_the_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stopped_after` is the moment the compile's processes had ended, before the measure and
    the removal (the budget test's time bound is on the stop, not on a slow disk's removal)."""
    directory = project(tmp_path)
    watcher = budget.Watcher(directory, Budget(bytes=MiB, files=0), lambda: None)
    (directory / "big").write_bytes(b"z" * (2 * MiB))
    assert watcher.stop() is not None
    remove_new = budget.remove_new

    def slow_removal(root: Path, start: budget.Start) -> tuple[int, list[str]]:
        time.sleep(0.5)
        return remove_new(root, start)

    monkeypatch.setattr(budget, "remove_new", slow_removal)
    before = time.monotonic() - watcher.started_at
    settled = budget.settle(watcher)
    after = time.monotonic() - watcher.started_at
    assert settled.seen_after <= before <= settled.stopped_after <= after - 0.5
    assert settled.removed == 1


# -- how the limit is told ------------------------------------------------------------------


def a_job(tmp_path: Path) -> Job:
    directory = project(tmp_path)
    command = latexmk_command(directory, "main.tex", "pdflatex")
    return Job(CompileDir(directory, directory, "p1", 33, 33), command, "img:1", {})


def test_a_compile_past_its_budget_is_limit_disk_naming_the_bound(tmp_path: Path) -> None:
    job = a_job(tmp_path)
    settled = Settled(Overrun("bytes", 1100 * MiB, 40), 1200 * MiB, 41, 41, (), 0.25, 0.5)
    outcome = classify(Ran(None, 1.5, budget=settled), job, Limits())
    assert outcome.status is Status.LIMIT and outcome.limit is Limit.DISK
    assert outcome.reason.startswith("disk: the compile wrote more than 1.0 GiB in its dir")
    assert "1.2 GiB in 41 files, all removed" in outcome.reason
    assert outcome.document()["written"] == {
        "bytes": 1200 * MiB, "files": 41, "seen_after": 0.25, "stopped_after": 0.5
    }  # fmt: skip
    files = Settled(Overrun("files", 0, 20_001), 0, 20_050, 20_000, ("a/b",))
    reason = classify(Ran(None, 1.0, budget=files), job, Limits()).reason
    assert "more than 20000 files and dirs" in reason and "but for 1 (e.g. a/b)" in reason


def test_the_log_note_names_the_budget() -> None:
    line, detail = log_note.stop_reason(Limit.DISK, Limits())
    assert line == (
        "the compile was stopped: it wrote more than 1024 MiB or made more than 20000 files "
        "in its dir (the site's budget per compile)."
    )
    assert "removed" in detail
    only_files, _ = log_note.stop_reason(Limit.DISK, Limits(disk=0))
    assert "more than 20000 files in its dir" in only_files


def test_the_budget_variables() -> None:
    limits = limits_from_env({config.COMPILE_DISK: "256m", config.COMPILE_FILES: "5000"})
    assert limits.budget == Budget(256 * MiB, 5000)
    assert limits_from_env({config.COMPILE_DISK: "0", config.COMPILE_FILES: "0"}).budget == (
        Budget(0, 0)
    )
    assert Limits().budget == Budget(1 << 30, 20_000)
    with pytest.raises(ConfigError) as e:
        limits_from_env({config.COMPILE_DISK: "10k", config.COMPILE_FILES: "lots"})
    assert e.value.problems == [
        "OVERLEAF_INIT_COMPILE_DISK='10k' is not valid; write e.g. 1g (at least 1m; 0: off)",
        "OVERLEAF_INIT_COMPILE_FILES='lots' is not valid; write e.g. 20000 (at least 100; 0: off)",
    ]


# -- fallocate ------------------------------------------------------------------------------


def test_the_profile_answers_fallocate_eopnotsupp_and_the_proxy_accepts_it() -> None:
    from init.proxy import seccomp

    document = json.loads(SECCOMP_PROFILE.read_text())
    rules = [r for r in document["syscalls"] if "fallocate" in r["names"]]
    assert rules == [
        {"names": ["fallocate"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95,
         "comment": rules[0]["comment"]}
    ]  # fmt: skip
    text = load_seccomp(lambda line: pytest.fail(line))
    assert text is not None
    seccomp.check(text)  # raises Refused when the proxy would refuse the create


def test_a_hidden_dir_counts_once_it_stays_hidden_not_in_the_moment_before_its_hand_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile's last act may lock a dir that its clean-up hands back at once: a sample in
    between must not stop it; a dir that stays unreadable while it runs is past the budget, and
    one still unreadable after the compile (its clean-up done) is past it at once."""
    clock = [100.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: clock[0])
    watcher = budget.Watcher(tmp_path, Budget(1 << 20, 100), lambda: None)
    monkeypatch.setattr(budget, "measure", lambda *_: Usage(0, 0, hidden="sealed"))
    assert watcher.check() is None  # just seen hidden
    clock[0] += budget.HIDDEN_GRACE / 2
    assert watcher.check() is None
    monkeypatch.setattr(budget, "measure", lambda *_: Usage(0, 0))
    assert watcher.check() is None  # handed back: the grace starts again next time
    monkeypatch.setattr(budget, "measure", lambda *_: Usage(0, 0, hidden="sealed"))
    clock[0] += budget.HIDDEN_GRACE / 2
    assert watcher.check() is None
    clock[0] += budget.HIDDEN_GRACE
    found = watcher.check()
    assert found is not None and found.kind == "hidden" and found.hidden == "sealed"
    last = budget.Watcher(tmp_path, Budget(1 << 20, 100), lambda: None)
    found = last.check(last=True)
    assert found is not None and found.kind == "hidden"
