"""my_init's three forms of the environment, on a tmp dir."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

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


def test_a_file_that_cannot_be_a_variable_is_named_once_and_skipped(tmp_path: Path) -> None:
    files = EnvFiles(tmp_path / "ce")
    files.directory.mkdir()
    (files.directory / "GOOD").write_text("kept\n")
    (files.directory / "NUL").write_bytes(b"before\0after")
    (files.directory / "A=B").write_text("x")
    (files.directory / "TAB\tNAME").write_text("x")
    lines: list[str] = []
    merged = container_env.export(files, {"A": "1"}, warn=lines.append)
    assert merged == {"GOOD": "kept", "A": "1"}
    assert len(lines) == 3
    assert [line.split(": ", 1)[0].rsplit("/", 1)[-1] for line in sorted(lines)] == [
        "A=B",
        "NUL",
        "TAB\tNAME",
    ]
    assert any("NUL byte" in line for line in lines) and any("'='" in line for line in lines)
    assert "NUL" not in json.loads(files.json_file.read_text())
    # Read again after a startup script: named once only, the new one named too.
    (files.directory / "LATER").write_bytes(b"\0")
    assert container_env.reimport(files, {}, warn=lines.append) == {"GOOD": "kept", "A": "1"}
    assert len(lines) == 4 and "LATER" in lines[-1]
    # What is left can be an environment: a child starts with it.
    done = subprocess.run(["env"], env=merged, capture_output=True, text=True, check=True)
    assert "GOOD=kept" in done.stdout


def test_the_default_warning_is_one_log_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = EnvFiles(tmp_path / "ce")
    files.directory.mkdir()
    (files.directory / "NUL").write_bytes(b"\0")
    assert container_env.read_directory(files.directory) == {}
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("environment: warning: ")
    assert "/ce/NUL: " in out
