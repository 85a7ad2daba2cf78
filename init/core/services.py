"""Discovery of what to run: my_init.d-style script dirs and runit-style service dirs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from init.core.process import parse_signal
from init.errors import ConfigError

DEFAULT_STARTUP_DIR = Path("/etc/my_init.d")
DEFAULT_PRE_SHUTDOWN_DIR = Path("/etc/my_init.pre_shutdown.d")
DEFAULT_POST_SHUTDOWN_DIR = Path("/etc/my_init.post_shutdown.d")
DEFAULT_SERVICE_DIR = Path("/etc/service")


@dataclass(frozen=True)
class ServiceSpec:
    """One runit service: `DIR/run`, started unless `DIR/down` exists, `DIR/finish` after exits.

    `DIR/down-signal` (s6's name for it) may hold the signal that stops it, e.g. `SIGQUIT`.
    The init's own services (the inner dockerd) are specs of the same shape.
    """

    name: str
    directory: Path
    argv: tuple[str, ...]
    finish: Path | None = None
    start_at_boot: bool = True
    stop_signal: int = 15
    env: tuple[tuple[str, str], ...] = ()  # added to the services' environment
    # Exit statuses after which it is finished rather than crashed: not restarted (the init's
    # own jobs, such as the TeX Live installer; runit services always restart).
    done_statuses: frozenset[int] = frozenset()


def is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def scripts(directory: Path) -> list[Path]:
    """The executable files of a my_init.d-style directory, in name order."""
    if not directory.is_dir():
        return []
    # Absolute, since each runs with its own working directory.
    return [p.absolute() for p in sorted(directory.iterdir()) if is_executable_file(p)]


def discover(service_dir: Path) -> list[ServiceSpec]:
    """Every `NAME/run` under `service_dir` in name order (the start order)."""
    if not service_dir.is_dir():
        return []
    specs: list[ServiceSpec] = []
    problems: list[str] = []
    for directory in sorted(service_dir.absolute().iterdir()):
        run = directory / "run"
        if directory.name.startswith(".") or not directory.is_dir() or not run.exists():
            continue
        finish = directory / "finish"
        stop_signal = 15
        signal_file = directory / "down-signal"
        if signal_file.is_file():
            word = signal_file.read_text(encoding="utf-8").strip()
            try:
                stop_signal = parse_signal(word)
            except ValueError:
                problems.append(
                    f"{signal_file}: {word!r} is not a signal; write a name such as SIGTERM"
                )
        specs.append(
            ServiceSpec(
                name=directory.name,
                directory=directory,
                argv=(str(run),),
                finish=finish if finish.exists() else None,
                start_at_boot=not (directory / "down").exists(),
                stop_signal=stop_signal,
            )
        )
    if problems:
        raise ConfigError(problems)
    return specs
