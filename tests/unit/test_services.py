"""Discovery of startup scripts and runit services on tmp trees."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from init.core import services
from init.errors import ConfigError


def executable(path: Path, text: str = "#!/bin/sh\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_scripts_in_name_order_only_executables(tmp_path: Path) -> None:
    executable(tmp_path / "20_second")
    executable(tmp_path / "10_first")
    (tmp_path / "15_not_executable").write_text("#!/bin/sh\n")
    (tmp_path / "05_dir").mkdir()
    assert [p.name for p in services.scripts(tmp_path)] == ["10_first", "20_second"]
    assert all(p.is_absolute() for p in services.scripts(tmp_path))


def test_missing_dir_has_no_scripts(tmp_path: Path) -> None:
    assert services.scripts(tmp_path / "absent") == []


def test_services_are_dirs_with_a_run_file(tmp_path: Path) -> None:
    executable(tmp_path / "web" / "run")
    executable(tmp_path / "clsi" / "run")
    executable(tmp_path / "clsi" / "finish")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README").write_text("not a service")
    executable(tmp_path / ".hidden" / "run")
    specs = services.discover(tmp_path)
    assert [s.name for s in specs] == ["clsi", "web"]
    clsi, web = specs
    assert clsi.finish == (tmp_path / "clsi" / "finish").absolute()
    assert web.finish is None
    assert clsi.argv == (str((tmp_path / "clsi" / "run").absolute()),)
    assert clsi.start_at_boot and web.start_at_boot
    assert clsi.stop_signal == signal.SIGTERM


def test_down_file_means_not_started(tmp_path: Path) -> None:
    executable(tmp_path / "mongo" / "run")
    (tmp_path / "mongo" / "down").touch()
    (spec,) = services.discover(tmp_path)
    assert not spec.start_at_boot


@pytest.mark.parametrize("word", ["SIGQUIT", "QUIT", "quit", "3"])
def test_down_signal_file_names_the_stop_signal(tmp_path: Path, word: str) -> None:
    executable(tmp_path / "nginx" / "run")
    (tmp_path / "nginx" / "down-signal").write_text(word + "\n")
    (spec,) = services.discover(tmp_path)
    assert spec.stop_signal == signal.SIGQUIT


def test_bad_down_signal_is_a_config_error(tmp_path: Path) -> None:
    executable(tmp_path / "nginx" / "run")
    (tmp_path / "nginx" / "down-signal").write_text("SIGNOPE")
    with pytest.raises(ConfigError) as caught:
        services.discover(tmp_path)
    assert "SIGNOPE" in caught.value.problems[0]


def test_missing_service_dir_has_no_services(tmp_path: Path) -> None:
    assert services.discover(tmp_path / "absent") == []
