"""A compile's budget of bytes and files written in its dir: counted while it runs, enforced by
the compile broker (init.broker.execute), and what the compile made removed when it goes past.

The kernel here has no quota to give a compile (no project quota on ext4 or xfs, no tmpfs
quota), so the fence is in three layers: `fallocate` is refused by the compile's seccomp
profile (EOPNOTSUPP: glibc's posix_fallocate then writes real blocks, which count); the runner
samples the dir every SAMPLE_INTERVAL and kills the compile once it is past its budget; and the
compiles root is a filesystem of its own (init.engine.compiles_fs), so what a compile writes
before it is killed never reaches the disk the site's databases use.

Counting: the delta from the dir's usage when the compile started, so a project's own files
never count against it. A regular file counts by the larger of its apparent size and its
blocks (st_blocks * 512): a preallocated file by what it holds on disk, a sparse one by what a
copy of it takes (the compile service copies its output, the HTTP service streams it). A file
linked many times counts once. Every entry (file, dir, link, FIFO) counts as a file. A walk stops
as soon as it is past the budget, so a compile that made a million files costs the watcher no
more than one that made the budget's worth.

A dir the sandbox cannot read (mode 0000, made by the compile) is given back its owner's rwx
first (the runner runs as the dir's owner); one it still cannot read (the compile's own, of
the project's uid) is reported as hidden, which is itself past the budget once it stays so for
HIDDEN_GRACE: what cannot be counted cannot be allowed.

Removal, after the compile's container is gone (nothing of it runs any more): every entry but
those there at the start (the same name and inode), deepest first; a file of the project the
compile moved stays, and so does the dir it is in. Dirs it made undeletable (0555) or
unreadable (0000) are given their owner's rwx first.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL = 0.1  # seconds between two walks of a compile's dir
WALK_PAUSE = 3.0  # at least this many times a walk's own time passes before the next walk
# A dir that cannot be read counts against the budget once it has stayed so this long while
# the compile runs: a compile's last act may lock a dir that the clean-up after it (in the same
# exec, init.compiles.profile) hands back at once, and a sample landing between the two must not
# stop a compile that has ended. Hidden writes go uncounted at most this long.
HIDDEN_GRACE = 1.0
OWNER_RWX = stat.S_IRWXU
Start = frozenset[tuple[str, int]]  # (relative path, inode) of each entry when a compile starts


@dataclass(frozen=True)
class Budget:
    """What one compile may add to its dir: bytes and files (0: that one is not bounded)."""

    bytes: int = 1 << 30
    files: int = 20_000

    @property
    def on(self) -> bool:
        return self.bytes > 0 or self.files > 0


@dataclass(frozen=True)
class Usage:
    """What a walk of a dir found: bytes (see the module docstring), entries below the dir,
    and the first dir it could not read ("" when none). A walk stopped early (`stopped`) has
    counted at least its bounds."""

    bytes: int
    files: int
    hidden: str = ""
    stopped: bool = False


@dataclass(frozen=True)
class Overrun:
    """How far past its budget a compile was seen: by bytes, files or a hidden dir."""

    kind: str  # "bytes", "files" or "hidden"
    bytes: int  # the delta seen (at least, when the walk stopped early)
    files: int
    hidden: str = ""


@dataclass(frozen=True)
class Entry:
    """One entry under a compile dir, as the removal plan sees it."""

    path: str  # relative to the compile dir
    inode: int
    is_dir: bool


def file_bytes(info: os.stat_result) -> int:
    """What one entry takes: a regular file the larger of its size and its blocks; the rest
    by their blocks (a dir's entries), a link by its size."""
    blocks = info.st_blocks * 512
    if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
        return max(blocks, info.st_size)
    return blocks


def _scandir(path: str) -> list[os.DirEntry[str]] | None:
    """The entries of the dir `path`; a dir its owner made unreadable is given back its
    owner's rwx once; None when it cannot be read even so (gone: an empty list)."""
    for attempt in (0, 1):
        try:
            with os.scandir(path) as it:
                return list(it)
        except FileNotFoundError:
            return []
        except PermissionError:
            if attempt == 0 and not _give_owner_rwx(path):
                return None
        except OSError:
            return None
    return None


def _give_owner_rwx(path: str) -> bool:
    """chmod u+rwx of a dir (never through a link); False when it cannot be done."""
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            return False
        os.chmod(path, stat.S_IMODE(info.st_mode) | OWNER_RWX, follow_symlinks=False)
        return True
    except (OSError, NotImplementedError):
        return False


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry[str] | None]]:
    """(relative dir, entry) for each entry below `root`, depth first, links never followed;
    (relative dir, None) for a dir that cannot be read."""
    stack = [""]
    while stack:
        relative = stack.pop()
        entries = _scandir(os.path.join(root, relative) if relative else str(root))
        if entries is None:
            yield relative, None
            continue
        for entry in entries:
            yield relative, entry
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(os.path.join(relative, entry.name) if relative else entry.name)
            except OSError:
                continue


def measure(root: Path, stop_bytes: int = 0, stop_files: int = 0) -> Usage:
    """The usage of the dir `root`; the walk stops once past `stop_bytes` or `stop_files`
    (0: never stops on that one)."""
    total = files = 0
    seen_links: set[int] = set()  # inodes of files linked more than once, counted once
    for relative, entry in _walk(root):
        if entry is None:
            return Usage(total, files, hidden=relative or ".")
        files += 1
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # removed under the walk
        if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
            if info.st_ino in seen_links:
                continue
            seen_links.add(info.st_ino)
        total += file_bytes(info)
        if (stop_bytes and total > stop_bytes) or (stop_files and files > stop_files):
            return Usage(total, files, stopped=True)
    return Usage(total, files)


def snapshot(root: Path) -> tuple[Usage, Start]:
    """The dir's usage when a compile starts, and its entries then (what removal keeps)."""
    inodes: set[tuple[str, int]] = set()
    total = files = 0
    hidden = ""
    seen_links: set[int] = set()
    for relative, entry in _walk(root):
        if entry is None:
            hidden = hidden or relative or "."
            continue
        files += 1
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        inodes.add((os.path.join(relative, entry.name) if relative else entry.name, info.st_ino))
        if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
            if info.st_ino in seen_links:
                continue
            seen_links.add(info.st_ino)
        total += file_bytes(info)
    return Usage(total, files, hidden=hidden), frozenset(inodes)


def overrun(start: Usage, now: Usage, budget: Budget) -> Overrun | None:
    """How the compile is past its budget, judged by `now` against `start`; None when it is
    not."""
    added_bytes, added_files = now.bytes - start.bytes, now.files - start.files
    if now.hidden and not start.hidden:
        return Overrun("hidden", added_bytes, added_files, now.hidden)
    if budget.bytes and added_bytes > budget.bytes:
        return Overrun("bytes", added_bytes, added_files)
    if budget.files and added_files > budget.files:
        return Overrun("files", added_bytes, added_files)
    return None


def bounds(start: Usage, budget: Budget) -> tuple[int, int]:
    """Where a sampling walk may stop: the start's usage plus the budget (0: no bound)."""
    return (
        start.bytes + budget.bytes if budget.bytes else 0,
        start.files + budget.files if budget.files else 0,
    )


class Watcher:
    """Samples a compile's dir every `interval` seconds in a thread of its own until stopped
    or past the budget; then `overrun` says how, and `on_overrun` has been called (the runner
    wakes on it and kills the compile)."""

    def __init__(
        self,
        root: Path,
        budget: Budget,
        on_overrun: Callable[[], None],
        interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.root = root
        self.budget = budget
        self.interval = interval
        self.on_overrun = on_overrun
        # Off: no walk at all (the overhead figures compare with this).
        off: tuple[Usage, Start] = (Usage(0, 0), frozenset())
        self.start_usage, self.start_entries = snapshot(root) if budget.on else off
        self.overrun: Overrun | None = None
        self.started_at = time.monotonic()
        self.seen_at: float | None = None  # monotonic time the overrun was seen
        self.samples = 0
        self._hidden_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compile-budget", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def check(self, last: bool = False) -> Overrun | None:
        """One sample now (`last`: the one after the compile ended, its clean-up done)."""
        stop_bytes, stop_files = bounds(self.start_usage, self.budget)
        found = overrun(self.start_usage, measure(self.root, stop_bytes, stop_files), self.budget)
        self.samples += 1
        now = time.monotonic()
        if found is None or found.kind != "hidden":
            self._hidden_since = None
        elif not last:
            self._hidden_since = self._hidden_since or now
            if now - self._hidden_since < HIDDEN_GRACE:
                found = None
        if found is not None and self.overrun is None:
            self.overrun, self.seen_at = found, now
        return self.overrun

    def _run(self) -> None:
        pause = self.interval
        while not self._stop.wait(pause):
            began = time.monotonic()
            if self.check() is not None:
                self.on_overrun()
                return
            # A large dir: the walk takes at most a quarter of a core (its cost per entry is
            # ~10 us; the walk stops at the budget, so this is bounded too).
            pause = max(self.interval, WALK_PAUSE * (time.monotonic() - began))

    def stop(self, last: bool = True) -> Overrun | None:
        """Stop sampling; with `last`, one more sample when none found the compile past its
        budget yet (a compile that ended between two samples)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.overrun is None and last and self.budget.on:
            self.check(last=True)
        return self.overrun


# -- removal --------------------------------------------------------------------------------


def listing(root: Path) -> list[Entry]:
    """Every entry under `root` (a dir unreadable even to its owner is left out with what it
    holds: removal then leaves it, and says so by what remains)."""
    found = []
    for relative, entry in _walk(root):
        if entry is None:
            continue
        try:
            inode = entry.inode()
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        found.append(Entry(os.path.join(relative, entry.name) if relative else entry.name,
                           inode, is_dir))  # fmt: skip
    return found


def removal_plan(entries: Iterable[Entry], start: Start) -> tuple[Entry, ...]:
    """What to remove, in order, deepest first: every entry but those there at the start (the
    same name, the same inode). A file of the project the compile moved (its inode there at
    the start, under none of its names then) stays under one name, the one ending as it did
    if one does; its other names go (a hard link made by the compile is its entry). A dir
    that holds an entry that stays, stays too."""
    entries = sorted(entries, key=lambda e: e.path)
    start_inodes = {inode for _, inode in start}
    in_place = {e.inode for e in entries if (e.path, e.inode) in start}
    start_inodes -= in_place  # moved: under none of their names of the start
    kept: list[Entry] = []
    moved: set[int] = set()
    # A moved file keeps the name that ends as one of its names at the start, if one does.
    start_names = {os.path.basename(path) for path, _ in start}
    for entry in sorted(entries, key=lambda e: (os.path.basename(e.path) not in start_names,
                                                 e.path)):  # fmt: skip
        if (entry.path, entry.inode) in start:
            kept.append(entry)
        elif entry.inode in start_inodes and entry.inode not in moved:
            kept.append(entry)
            moved.add(entry.inode)
    keep_paths = {e.path for e in kept}
    for entry in kept:
        parent = os.path.dirname(entry.path)
        while parent and parent not in keep_paths:
            keep_paths.add(parent)
            parent = os.path.dirname(parent)
    doomed = [e for e in entries if e.path not in keep_paths]
    return tuple(sorted(doomed, key=lambda e: (-e.path.count("/"), e.path)))


def remove_new(root: Path, start: Start) -> tuple[int, list[str]]:
    """Remove what was made under `root` since `start` (see removal_plan): (entries removed,
    the relative paths that could not be). Only after nothing of the compile runs any more."""
    _give_owner_rwx(str(root))
    plan = removal_plan(listing(root), start)
    for entry in plan:  # a dir made 0555 must be writable to empty it
        if entry.is_dir:
            _give_owner_rwx(os.path.join(root, entry.path))
    parents = {os.path.dirname(e.path) for e in plan}
    for parent in parents:  # a project dir the compile made 0555 (chmod u+w is its owner's)
        if parent:
            _give_owner_rwx(os.path.join(root, parent))
    removed, left = 0, []
    for entry in plan:
        path = os.path.join(root, entry.path)
        try:
            (os.rmdir if entry.is_dir else os.unlink)(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError:
            left.append(entry.path)
    return removed, left


@dataclass(frozen=True)
class Settled:
    """A compile stopped past its budget, once its container is gone: what it had written by
    then (the delta, at least, when past the far bound of AFTER_KILL_BOUND budgets), and what
    removing it did."""

    overrun: Overrun
    bytes: int
    files: int
    removed: int
    left: tuple[str, ...]  # relative paths that could not be removed
    seen_after: float = 0.0  # seconds from the compile's start to the sample that saw it past
    stopped_after: float = 0.0  # ... to its stop (its processes ended), before the measure


AFTER_KILL_BOUND = 8  # the walk after the kill stops past this many budgets


def settle(watcher: Watcher) -> Settled:
    """Measure what the stopped compile wrote, then remove it (see remove_new)."""
    assert watcher.overrun is not None, "settle a compile past its budget"
    stopped = time.monotonic()
    start, budget = watcher.start_usage, watcher.budget
    far = Budget(budget.bytes * AFTER_KILL_BOUND, budget.files * AFTER_KILL_BOUND)
    after = measure(watcher.root, *bounds(start, far))
    removed, left = remove_new(watcher.root, watcher.start_entries)
    return Settled(
        watcher.overrun,
        max(0, after.bytes - start.bytes),
        max(0, after.files - start.files),
        removed,
        tuple(left),
        (watcher.seen_at or watcher.started_at) - watcher.started_at,
        stopped - watcher.started_at,
    )
