"""Who a compile runs as (init.compiles.identity, config.UidRange): the uid mapping, its
variables, the user-namespace check, the compile dir shared with the group and refused when it
cannot be, and what the container and the exec are given."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from init import config
from init.compiles.identity import compile_uids, mapped, share_with_compile, shared_mode
from init.compiles.paths import CompileDir, compile_dir
from init.compiles.profile import Job, container_name, container_spec, exec_command
from init.compiles.settings import Limits, Places
from init.config import DEFAULT_COMPILE_UIDS, UidRange
from init.errors import ConfigError
from tests.integration.conftest import require

OWNER = 33
# Overleaf's compile dir names: a project id, or a project id and a user id.
IDS = ["5f1e8c3a9d2b4e0012a3b4c5", "5f1e8c3a9d2b4e0012a3b4c6",
       "5f1e8c3a9d2b4e0012a3b4c5-64a0c1d2e3f4a5b6c7d8e9f0", "p1"]  # fmt: skip


# -- the uid mapping --------------------------------------------------------------------------


def test_a_projects_uid_is_stable_in_the_range_and_its_own() -> None:
    ids = DEFAULT_COMPILE_UIDS
    uids = [ids.uid_for(project) for project in IDS]
    assert uids == [ids.uid_for(project) for project in IDS]  # the same on every call
    assert all(2_000_000_000 <= uid < 2_100_000_000 for uid in uids)
    assert len(set(uids)) == len(uids)
    # The formula, as documented (a restart or another version gives the same uid).
    assert ids.uid_for("p1") == 2_000_000_000 + zlib.crc32(b"p1") % 100_000_000


def test_the_default_range_stays_clear_of_ordinary_and_subordinate_uids() -> None:
    ids = DEFAULT_COMPILE_UIDS
    for uid in (0, 33, 1000, 65534, 100000, 165535, 2**31, 2**32 - 1):
        assert uid not in ids, uid
    assert ids.base + ids.size - 1 <= config.UID_MAX


def test_the_range_comes_from_its_two_variables() -> None:
    found = config.compile_uid_range(
        {config.COMPILE_UID_BASE: "300000", config.COMPILE_UID_RANGE: "1000"}
    )
    assert found == UidRange(300000, 1000)
    assert 300000 <= found.uid_for("p1") < 301000
    assert config.compile_uid_range({}) == DEFAULT_COMPILE_UIDS


@pytest.mark.parametrize(
    ("base", "size", "named"),
    [
        ("0", "", "OVERLEAF_INIT_COMPILE_UID_BASE='0'"),
        ("-5", "", "OVERLEAF_INIT_COMPILE_UID_BASE='-5'"),
        ("2e9", "", "OVERLEAF_INIT_COMPILE_UID_BASE='2e9'"),
        ("", "0", "OVERLEAF_INIT_COMPILE_UID_RANGE='0'"),
        ("2147483000", "1000", "above 2147483647"),
    ],
)
def test_a_bad_range_is_refused_naming_the_variable(base: str, size: str, named: str) -> None:
    environ = {config.COMPILE_UID_BASE: base, config.COMPILE_UID_RANGE: size}
    with pytest.raises(ConfigError, match=named):
        config.compile_uid_range(environ)
    with pytest.raises(ConfigError, match=named):  # at boot too, with every other variable
        config.load(environ)


def test_the_range_must_fit_the_user_namespace_we_run_in() -> None:
    full = "         0          0 4294967295\n"
    remapped = "         0     100000      65536\n"  # userns-remap, rootless: 65536 ids
    split = "0 1000 1\n1 100000 65535\n"  # rootless: our uid, then the subordinate range
    ids = UidRange(40000, 20000)
    assert mapped(DEFAULT_COMPILE_UIDS, full)
    assert not mapped(DEFAULT_COMPILE_UIDS, remapped) and mapped(ids, remapped)
    assert mapped(ids, split)  # adjacent lines join
    assert not mapped(UidRange(60000, 10000), remapped)  # runs past the end
    assert not mapped(ids, "")
    with pytest.raises(ConfigError, match=r"not all in this container's user namespace.*"
                       r"OVERLEAF_INIT_COMPILE_UID_BASE=40000"):  # fmt: skip
        compile_uids({}, remapped)
    assert compile_uids({config.COMPILE_UID_BASE: "40000",
                         config.COMPILE_UID_RANGE: "20000"}, remapped) == ids  # fmt: skip
    assert compile_uids({}, None) == DEFAULT_COMPILE_UIDS  # no /proc: nothing to check


# -- the compile dir ------------------------------------------------------------------------


@pytest.fixture
def places(tmp_path: Path) -> Places:
    for name in ("compiles", "output"):
        (tmp_path / name).mkdir()
    return Places(compiles=tmp_path / "compiles", output=tmp_path / "output")


def test_a_dir_owned_by_a_compile_uid_is_refused(places: Places) -> None:
    require(os.geteuid() == 0, "chown needs root")
    directory = places.compiles / "p1"
    directory.mkdir()
    os.chown(directory, 2_000_000_005, OWNER)
    with pytest.raises(ConfigError, match="one of the compile uids 2000000000-2099999999"):
        compile_dir(directory, places)
    found = compile_dir(directory, places, ids=UidRange(3_000_000_000 - 10, 5))
    assert found.uid == 2_000_000_005  # outside that range: accepted


def test_the_compile_runs_as_the_projects_uid_and_the_dirs_group(places: Places) -> None:
    require(os.geteuid() == 0, "chown needs root")
    directory = places.compiles / "p1"
    directory.mkdir()
    os.chown(directory, OWNER, 44)
    found = compile_dir(directory, places, ids=UidRange(500000, 100))
    assert (found.uid, found.gid) == (OWNER, 44)  # the owner: never who the compile runs as
    assert found.compile_uid == UidRange(500000, 100).uid_for("p1")
    assert found.compile_user == f"{found.compile_uid}:44"


def test_the_container_and_the_exec_get_the_projects_uid(tmp_path: Path) -> None:
    directory = CompileDir(tmp_path, Path("/host/p1"), "p1", OWNER, OWNER)
    job = Job(directory, ("latexmk",), "img:1", {}, compile_id="c1")
    spec = container_spec(job, Limits(), seccomp=None)
    assert spec.user == f"{DEFAULT_COMPILE_UIDS.uid_for('p1')}:{OWNER}"
    argv = exec_command(job, Limits(timeout=30))
    assert argv[3:7] == [str(tmp_path), str(directory.compile_uid), "30", "latexmk"]
    script = argv[2]
    # Emptied and handed back before and after, around the timeout; leftovers killed first.
    assert script.count("fresh_tmp; hand_back") == 2
    assert script.index("kill -KILL -1") < script.index("fresh_tmp; hand_back")
    assert "umask 002" in script and "--one-file-system" in script
    # Another range (the operator moved it): another container, never one of the old uid.
    moved = CompileDir(tmp_path, Path("/host/p1"), "p1", OWNER, OWNER, UidRange(700000, 10))
    assert container_name(moved, "img:1", Limits()) != container_name(directory, "img:1", Limits())


# -- sharing the dir with the compile's group -------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "wanted"),
    [
        (stat.S_IFDIR | 0o755, 0o2775),  # CLSI's dir
        (stat.S_IFDIR | 0o2775, None),  # shared already
        (stat.S_IFDIR | 0o700, 0o2770),
        (stat.S_IFREG | 0o644, 0o664),  # CLSI's file
        (stat.S_IFREG | 0o664, None),
        (stat.S_IFREG | 0o600, 0o660),
        (stat.S_IFREG | 0o4755, None),  # setuid: never made group-writable
        (stat.S_IFREG | 0o2755, None),
        (stat.S_IFLNK | 0o777, None),
        (stat.S_IFIFO | 0o644, None),
    ],
)
def test_what_the_group_needs_of_an_entry(mode: int, wanted: int | None) -> None:
    assert shared_mode(mode) == wanted


def tree(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
        for p in [root, *root.rglob("*")]
        if not p.is_symlink()
    }


def test_the_owners_dirs_and_files_are_shared_and_links_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    top = tmp_path / "p1"
    (top / "chapters").mkdir(parents=True)
    for name, mode in (("main.tex", 0o644), ("chapters/one.tex", 0o644), ("tool", 0o4755)):
        (top / name).write_text("x")
        os.chmod(top / name, mode)
    os.chmod(top, 0o755)
    os.chmod(top / "chapters", 0o755)
    (top / "link").symlink_to(outside)
    (top / "dirlink").symlink_to(tmp_path)
    directory = CompileDir(top, top, "p1", os.geteuid(), os.getegid())
    shared = share_with_compile(directory)
    assert tree(top) == {
        ".": 0o2775, "chapters": 0o2775, "main.tex": 0o664, "chapters/one.tex": 0o664,
        "tool": 0o4755,
    }  # fmt: skip
    assert (shared.dirs, shared.files) == (2, 2)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # through no link
    assert stat.S_IMODE(tmp_path.stat().st_mode) != 0o2775
    again = share_with_compile(directory)
    assert (again.dirs, again.files) == (0, 0)  # the next compile changes nothing


def test_entries_of_another_owner_are_left_as_they_are(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "chown needs root")
    top = tmp_path / "p1"
    (top / "made-by-the-compile").mkdir(parents=True)
    (top / "made-by-the-compile" / "f").write_text("x")
    os.chmod(top / "made-by-the-compile", 0o700)
    for path in (top / "made-by-the-compile", top / "made-by-the-compile" / "f"):
        os.chown(path, 2_000_000_005, OWNER)
    os.chown(top, OWNER, OWNER)
    share_with_compile(CompileDir(top, top, "p1", OWNER, OWNER))
    assert stat.S_IMODE((top / "made-by-the-compile").stat().st_mode) == 0o700
    assert stat.S_IMODE(top.stat().st_mode) == 0o2775


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A dir every user may pass through (pytest's own tmp dirs are root's alone)."""
    made = Path(tempfile.mkdtemp(prefix="identity-"))
    os.chmod(made, 0o755)
    yield made
    shutil.rmtree(made)


def test_a_dir_that_cannot_be_shared_is_refused_naming_the_fix(open_dir: Path) -> None:
    require(os.geteuid() == 0, "needs a uid to drop to")
    top = open_dir / "p1"
    top.mkdir(mode=0o755)
    os.chmod(top, 0o755)
    os.chown(top, 4242, 4242)
    directory = CompileDir(top, top, "p1", 4242, 4242)
    message = as_user(4343, 4343, lambda: share_with_compile(directory))
    assert "cannot be made writable by its group here (uid 4343)" in message, message
    assert f"chmod g+rwxs {top}" in message


def as_user(uid: int, gid: int, action: Callable[[], object]) -> str:
    """What `action` raised (its ConfigError's text), or "ok", run as uid:gid, no groups."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        try:
            action()
            message = "ok"
        except ConfigError as e:
            message = str(e)
        except BaseException as e:  # whatever it was, the parent asserts on it
            message = f"unexpected {e!r}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(child, 0)
    return message


def test_a_dir_of_a_group_the_services_are_not_in_is_refused(open_dir: Path) -> None:
    """What the compile writes is the dir's group's: the services must be in that group."""
    require(os.geteuid() == 0, "needs a uid to drop to")
    (open_dir / "compiles" / "p1").mkdir(parents=True)
    (open_dir / "output").mkdir()
    for path in (open_dir / "compiles", open_dir / "compiles" / "p1"):
        os.chmod(path, 0o755)
        os.chown(path, 4343, 4444)
    places = Places(compiles=open_dir / "compiles", output=open_dir / "output")
    message = as_user(4343, 4343, lambda: compile_dir(open_dir / "compiles" / "p1", places))
    assert "has group 4444, which uid 4343 is not in" in message, message
    assert as_user(4343, 4444, lambda: compile_dir(open_dir / "compiles" / "p1", places)) == "ok"
