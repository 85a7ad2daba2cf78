"""Operator logs: one line per event, the service or step first, then what happened.

Plain text by default (`web: exited with status 1; restarting in 2.0 s`), or one JSON object a
line with `--log-format json`. Service output is copied line by line with the service's name.
Writing never raises: a closed stdout must not take PID 1 down.
"""

from __future__ import annotations

import enum
import json
import sys
import time
from collections.abc import Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import TextIO


class Level(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


class Log:
    """The init's logger: `log.info("web", "started, pid 42")`."""

    def __init__(
        self, stream: TextIO | None = None, level: Level = Level.INFO, json_lines: bool = False
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.level = level
        self.json_lines = json_lines

    def debug(self, source: str, message: str) -> None:
        self.event(Level.DEBUG, source, message)

    def info(self, source: str, message: str) -> None:
        self.event(Level.INFO, source, message)

    def warning(self, source: str, message: str) -> None:
        self.event(Level.WARNING, source, message)

    def error(self, source: str, message: str) -> None:
        self.event(Level.ERROR, source, message)

    def event(self, level: Level, source: str, message: str) -> None:
        if level < self.level:
            return
        if self.json_lines:
            self._write(self._json(level.name.lower(), source, message=message))
        else:
            mark = "" if level == Level.INFO else f"{level.name.lower()}: "
            self._write(f"{source}: {mark}{message}\n")

    def output(self, service: str, line: str) -> None:
        """One line a service printed, under its name."""
        if self.json_lines:
            self._write(self._json("output", service, output=line))
        else:
            self._write(f"{service} | {line}\n")

    def _json(self, level: str, source: str, **fields: str) -> str:
        record = {"ts": round(time.time(), 3), "level": level, "source": source, **fields}
        return json.dumps(record, ensure_ascii=False) + "\n"

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            # stdout gone (closed pipe, detached terminal): the services matter more than logs.
            pass


def level_from_env(environ: Mapping[str, str], default: Level = Level.INFO) -> Level:
    """The log level variable's debug|info|warning|error, else `default`."""
    from init.config import LOG_LEVEL, renamed

    word = renamed(environ)[0].get(LOG_LEVEL, "").strip().upper()
    return Level[word] if word in Level.__members__ else default
