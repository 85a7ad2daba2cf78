"""Compile dirs an attacker would hand the runner: ids with a trailing newline, the compiles or
output root itself (a compile there sees every project), a dir whose group is root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from init.compiles.paths import check_project_id, compile_dir
from init.compiles.settings import Places
from init.errors import ConfigError
from tests.integration.conftest import require

OWNER = 33


@pytest.fixture
def places(tmp_path: Path) -> Places:
    for name in ("compiles", "output"):
        (tmp_path / name).mkdir()
        if os.geteuid() == 0:
            os.chown(tmp_path / name, OWNER, OWNER)
    return Places(compiles=tmp_path / "compiles", output=tmp_path / "output")


@pytest.mark.parametrize("bad", ["p1\n", "p1\r", "p1\n\n", "\np1", "p1 ", "p1\x00", "p1\t"])
def test_an_id_is_matched_whole(bad: str) -> None:
    with pytest.raises(ConfigError, match="project id"):
        check_project_id(bad)


def test_a_dir_named_with_a_trailing_newline_is_refused(places: Places) -> None:
    require(os.geteuid() == 0, "chown to a non-root owner needs root")
    directory = places.compiles / "p1\n"
    directory.mkdir()
    os.chown(directory, OWNER, OWNER)
    with pytest.raises(ConfigError, match="project id"):
        compile_dir(directory, places)


@pytest.mark.parametrize("root", ["compiles", "output"])
def test_a_root_itself_is_never_a_project(places: Places, root: str) -> None:
    given = places.compiles if root == "compiles" else places.output
    with pytest.raises(ConfigError, match=f"is the {root} root"):
        compile_dir(given, places, "p1")
    with pytest.raises(ConfigError, match=f"is the {root} root"):
        compile_dir(given / "." / "", places, "p1")


def test_a_dir_above_a_root_is_never_a_project(places: Places) -> None:
    with pytest.raises(ConfigError, match="holds the compiles root"):
        compile_dir(places.compiles.parent, places, "p1")
    with pytest.raises(ConfigError, match="holds the compiles root"):
        compile_dir(Path("/"), places, "p1")


def test_a_link_to_the_root_is_judged_by_where_it_leads(places: Places, tmp_path: Path) -> None:
    (tmp_path / "innocent").symlink_to(places.compiles)
    with pytest.raises(ConfigError, match="is the compiles root"):
        compile_dir(tmp_path / "innocent", places, "p1")


def test_a_dir_of_group_root_is_refused(places: Places) -> None:
    require(os.geteuid() == 0, "chown to group root needs root")
    directory = places.compiles / "p1"
    directory.mkdir()
    os.chown(directory, 4242, 0)
    with pytest.raises(ConfigError, match="group root"):
        compile_dir(directory, places)
    os.chown(directory, 4242, 4242)
    found = compile_dir(directory, places)
    assert (found.uid, found.gid) == (4242, 4242)
