"""A child's stdout and stderr, copied into the log line by line under its name."""

from __future__ import annotations

import os
from collections import deque

from init.core.log import Log
from init.core.loop import EventLoop

# A line longer than this is cut into pieces rather than held in memory without bound.
MAX_LINE = 64 * 1024


class OutputPipe:
    """A pipe whose write end a child gets as stdout and stderr; the loop reads the other end."""

    def __init__(
        self, loop: EventLoop, log: Log, name: str, recent: deque[str] | None = None
    ) -> None:
        self.loop = loop
        self.log = log
        self.name = name
        self.recent = recent  # the last lines, for error messages that quote them
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self._partial = b""
        self.closed = False
        loop.add_reader(self.read_fd, self._on_readable)

    def parent_side_started(self) -> None:
        """Once the child has its copy, drop ours so EOF comes when the child's side closes."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def drain(self) -> None:
        """Read whatever is buffered now (before logging that the child ended)."""
        while not self.closed and self._read_some():
            pass

    def close(self) -> None:
        self.parent_side_started()
        if not self.closed:
            self.drain()
        self._finish()

    def _on_readable(self) -> None:
        self._read_some()

    def _read_some(self) -> bool:
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._finish()
            return False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line.decode("utf-8", errors="replace").rstrip("\r"))
        return True

    def _emit(self, text: str) -> None:
        self.log.output(self.name, text)
        if self.recent is not None:
            self.recent.append(text)

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._partial:
            self._emit(self._partial.decode("utf-8", errors="replace"))
            self._partial = b""
        self.loop.remove_reader(self.read_fd)
        os.close(self.read_fd)
