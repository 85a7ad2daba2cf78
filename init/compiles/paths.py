"""Compile dirs: a safe project id, the dir resolved and checked, and the path the engine's
host knows it by (in sibling mode, the host dir in place of the compiles root).

A compile dir is judged by where it really is (symlinks resolved), never by how it was named:
a link under the compiles root that leads out of it is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from init import config
from init.compiles.settings import Places
from init.config import DEFAULT_COMPILE_UIDS, UidRange
from init.errors import ConfigError

# Overleaf's compile dirs are `<projectId>` or `<projectId>-<userId>` (24 hex digits each).
# Matched whole (fullmatch): `$` would let a trailing newline through, to fail later as an
# engine error.
PROJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_project_id(project: str) -> str:
    """`project` when it is a safe id (letters, digits, `_`, `-`; 1-64; no dot at all)."""
    if not PROJECT_ID.fullmatch(project):
        raise ConfigError(
            [
                f"project id {project!r} is not valid; use 1-64 letters, digits, '_' or '-' "
                "(e.g. 5f1e...-5f1e..., as Overleaf names compile dirs), never '..' or '/'"
            ]
        )
    return project


@dataclass(frozen=True)
class CompileDir:
    """A compile dir: where it is here, the bind source the engine needs for it, its owner,
    and who the compile runs as (the project's own uid, the dir's group)."""

    path: Path  # resolved, as this process sees it; bound at the same path in the container
    source: Path  # the bind source on the engine's host
    project: str
    uid: int  # the dir's owner (the services' user): never the compile's
    gid: int  # the dir's group: the compile's only group
    ids: UidRange = DEFAULT_COMPILE_UIDS

    @property
    def compile_uid(self) -> int:
        return self.ids.uid_for(self.project)

    @property
    def compile_user(self) -> str:
        """The engine's `User` for this project's compiles."""
        return f"{self.compile_uid}:{self.gid}"


def within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def host_path(path: Path, places: Places) -> Path:
    """The engine host's path for `path` (resolved): under the compiles (output) root, the
    sibling host dir in its place; elsewhere, as is. ConfigError when sibling mode cannot map
    it."""
    for root, host in (
        (places.compiles, places.host_compiles),
        (places.output, places.host_output),
    ):
        real_root = Path(os.path.realpath(root))
        if within(path, real_root):
            return host / path.relative_to(real_root) if host is not None else path
    if places.host_compiles is not None:
        raise ConfigError(
            [
                f"compile dir {path} is outside the compiles dir {places.compiles}: with sibling "
                "containers only dirs under it reach the host engine; put the project there"
            ]
        )
    return path


def compile_dir(
    given: Path, places: Places, project: str | None = None, ids: UidRange = DEFAULT_COMPILE_UIDS
) -> CompileDir:
    """Check and resolve a compile dir: symlinks resolved (a dir that only looks as if it were
    under the compiles root is judged by where it really is), a safe project id (given, else the
    dir's name), an owner and a group that are not root's, an owner outside the compile uids
    `ids` (the compile runs as one of them, and must never be the services' user)."""
    try:
        path = Path(os.path.realpath(given, strict=True))
    except OSError as e:
        raise ConfigError([f"compile dir {given}: {e.strerror}; give an existing dir"]) from e
    if not path.is_dir():
        raise ConfigError([f"compile dir {given} is not a dir; give the project's dir"])
    lexical = Path(os.path.abspath(given))
    if within(lexical, places.compiles) and not within(
        path, Path(os.path.realpath(places.compiles))
    ):
        raise ConfigError(
            [f"compile dir {given} leads out of {places.compiles} (to {path}); remove the link"]
        )
    check_not_a_root(path, places)
    project = check_project_id(project if project is not None else path.name)
    info = path.stat()
    if info.st_uid == 0:
        raise ConfigError(
            [
                f"compile dir {path} is owned by root and compiles never run as root; "
                "chown it to the services' user (e.g. chown -R www-data: DIR)"
            ]
        )
    if info.st_gid == 0:
        # The compile runs with the dir's group: group 0 would let it make setgid-root files.
        raise ConfigError(
            [
                f"compile dir {path} has group root and compiles never run as group root; "
                "chgrp it to the services' group (e.g. chown -R www-data:www-data DIR)"
            ]
        )
    if info.st_uid in ids:
        raise ConfigError(
            [
                f"compile dir {path} is owned by uid {info.st_uid}, one of the compile uids "
                f"{ids.describe()}: the compiles would share its owner's kernel limits; move "
                f"{config.COMPILE_UID_BASE} above the services' uids (e.g. 2000000000)"
            ]
        )
    if os.geteuid() != 0 and info.st_gid not in (os.getegid(), *os.getgroups()):
        # What the compile makes is its group's: the services must be in it to read it.
        raise ConfigError(
            [
                f"compile dir {path} has group {info.st_gid}, which uid {os.geteuid()} is not in: "
                "the services could not read or remove what the compile writes; chgrp it to "
                "the services' group (e.g. chown -R www-data:www-data DIR)"
            ]
        )
    return CompileDir(path, host_path(path, places), project, info.st_uid, info.st_gid, ids)


def check_not_a_root(path: Path, places: Places) -> None:
    """ConfigError when `path` (resolved) is the compiles or output root or a dir above one:
    a compile there would see every project."""
    for name, root in (("compiles", places.compiles), ("output", places.output)):
        real_root = Path(os.path.realpath(root))
        if within(real_root, path):
            where = "is" if path == real_root else "holds"
            raise ConfigError(
                [
                    f"compile dir {path} {where} the {name} root {root}, not a project in it; "
                    f"give one project's dir, e.g. {root}/<project id>"
                ]
            )
