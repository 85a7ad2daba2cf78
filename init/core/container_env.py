"""my_init's `/etc/container_environment`: the environment as a directory, `.sh` and `.json`.

The ShareLaTeX image's startup scripts add secrets by writing files into the directory, and
its services read the `.sh` / `.json` forms, so after each startup script the directory is
read back and the other two forms are written anew.

A file that cannot be a variable (a NUL byte in its value, `=` or a control character in its
name) is refused with one line naming it and skipped: passed on, it would make every service's
exec fail.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init.core.log import Log

DEFAULT_DIR = Path("/etc/container_environment")
# my_init leaves these to the login machinery of whoever sources the file.
NOT_EXPORTED = frozenset({"HOME", "USER", "GROUP", "UID", "GID", "SHELL"})
_SAFE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE_SHELL = re.compile(r"[^\w@%+=:,./-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
Warn = Callable[[str], None]


def _warn(message: str) -> None:
    Log().warning("environment", message)


@dataclass(frozen=True)
class EnvFiles:
    """Where the three forms live: DIR, DIR.sh and DIR.json."""

    directory: Path = DEFAULT_DIR
    # The refusals already logged: the directory is read again after each startup script.
    reported: set[str] = field(default_factory=set, compare=False, repr=False)

    @property
    def shell_file(self) -> Path:
        return self.directory.with_name(self.directory.name + ".sh")

    @property
    def json_file(self) -> Path:
        return self.directory.with_name(self.directory.name + ".json")


def export(files: EnvFiles, environ: Mapping[str, str], warn: Warn = _warn) -> dict[str, str]:
    """Write `environ` in all three forms, keeping what is already in the directory.

    Returns the environment to run with: `environ`, plus the directory's files for names it
    does not set (my_init's `import_envvars(False, False)`).
    """
    merged = {**read_directory(files.directory, _once(files, warn)), **environ}
    _ensure_private_dir(files.directory)
    for name, value in merged.items():
        if name in NOT_EXPORTED or not _is_file_name(name):
            continue
        _write_atomic(files.directory / name, value)
    write_dumps(files, merged)
    return merged


def reimport(files: EnvFiles, previous: Mapping[str, str], warn: Warn = _warn) -> dict[str, str]:
    """After a startup script: the directory is the environment; rewrite `.sh` and `.json`.

    The names never exported (HOME, USER, ...) are kept from `previous`.
    """
    environ = read_directory(files.directory, _once(files, warn))
    write_dumps(files, environ)
    kept = {name: previous[name] for name in NOT_EXPORTED if name in previous}
    return {**environ, **kept}


def _once(files: EnvFiles, warn: Warn) -> Warn:
    def once(message: str) -> None:
        if message not in files.reported:
            files.reported.add(message)
            warn(message)

    return once


def read_directory(directory: Path, warn: Warn = _warn) -> dict[str, str]:
    """NAME -> value for each file in the directory (one trailing newline dropped); a file
    that cannot be a variable is skipped, with one line from `warn` naming it."""
    values: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return values
    for entry in entries:
        if not entry.is_file() or entry.name.startswith(".tmp-"):
            continue
        with open(entry.path, encoding="utf-8", errors="surrogateescape") as f:
            value = f.read()
        # Text editors end files with a newline nobody meant as part of the value.
        value = value[:-1] if value.endswith("\n") else value
        problem = entry_problem(entry.name, value)
        if problem:
            warn(f"{directory}/{entry.name}: {problem}; not passed to the services")
            continue
        values[entry.name] = value
    return values


def entry_problem(name: str, value: str) -> str:
    """Why a file of the directory cannot be a variable, or "" when it can."""
    if "=" in name:
        return "'=' cannot be in a variable's name; rename the file"
    if _CONTROL.search(name):
        return "a control character in the name; rename the file"
    if "\0" in value:
        return "its value holds a NUL byte, which no environment can carry; rewrite the file"
    return ""


def write_dumps(files: EnvFiles, environ: Mapping[str, str]) -> None:
    shell = "".join(
        f"export {name}={shell_quote(value)}\n"
        for name, value in sorted(environ.items())
        if name not in NOT_EXPORTED and _SAFE_NAME.match(name)
    )
    _write_atomic(files.shell_file, shell)
    _write_atomic(files.json_file, json.dumps(dict(sorted(environ.items()))))


def shell_quote(value: str) -> str:
    if not value:
        return "''"
    if _UNSAFE_SHELL.search(value) is None:
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _is_file_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


def _ensure_private_dir(directory: Path) -> None:
    # Secrets live here: a new directory is root's alone, as in phusion's image.
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step, keeping an existing file's mode and owner (else 0640)."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
