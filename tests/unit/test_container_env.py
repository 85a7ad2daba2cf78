"""my_init's three forms of the environment, on a tmp dir."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from init.core import container_env
from init.core.container_env import EnvFiles


def test_export_writes_dir_sh_and_json(tmp_path: Path) -> None:
    files = EnvFiles(tmp_path / "container_environment")
    env = {"A": "1", "QUOTE": "it's $HOME", "HOME": "/root", "MULTI": "line1\nline2"}
    merged = container_env.export(files, env)
    assert merged == env
    assert (files.directory / "A").read_text() == "1"
    assert (files.directory / "MULTI").read_text() == "line1\nline2"
    assert not (files.directory / "HOME").exists()
    assert json.loads(files.json_file.read_text()) == env
    assert files.directory.stat().st_mode & 0o777 == 0o700
    # The .sh form must give back exactly the values when sourced by a shell.
    out = subprocess.run(
        ["sh", "-c", f'. {files.shell_file}; printf \'%s|%s\' "$QUOTE" "$MULTI"'],
        capture_output=True,
        text=True,
        check=True,
        env={},
    ).stdout
    assert out == "it's $HOME|line1\nline2"


def test_files_already_in_the_dir_are_kept_unless_the_environment_sets_them(
    tmp_path: Path,
) -> None:
    files = EnvFiles(tmp_path / "ce")
    files.directory.mkdir()
    (files.directory / "SECRET").write_text("from-image\n")
    (files.directory / "A").write_text("old")
    merged = container_env.export(files, {"A": "new"})
    assert merged == {"SECRET": "from-image", "A": "new"}
    assert (files.directory / "A").read_text() == "new"


def test_reimport_takes_what_a_startup_script_wrote(tmp_path: Path) -> None:
    files = EnvFiles(tmp_path / "ce")
    container_env.export(files, {"A": "1", "HOME": "/root"})
    (files.directory / "NEW_SECRET").write_text("s3cret\n")
    (files.directory / "A").unlink()
    env = container_env.reimport(files, {"A": "1", "HOME": "/root"})
    assert env == {"NEW_SECRET": "s3cret", "HOME": "/root"}
    assert "export NEW_SECRET=s3cret" in files.shell_file.read_text()
    assert json.loads(files.json_file.read_text()) == {"NEW_SECRET": "s3cret"}


def test_rewrite_keeps_an_existing_files_mode(tmp_path: Path) -> None:
    files = EnvFiles(tmp_path / "ce")
    container_env.export(files, {"A": "1"})
    files.shell_file.chmod(0o600)
    container_env.export(files, {"A": "2"})
    assert files.shell_file.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_shell_quote() -> None:
    assert container_env.shell_quote("") == "''"
    assert container_env.shell_quote("plain/path:1") == "plain/path:1"
    assert container_env.shell_quote("a b") == "'a b'"
