"""Waiting for fds to be readable with poll(2), not select(2): the broker lives as long as the
site and holds two fds for each warm container (its attached stream, its dir) and four for each
compile under way (the client's connection, its stop's pipe, its caller's pidfd), so a site
with a few hundred projects compiled within the idle time hands it fds past 1023, which
`select.select` refuses (ValueError: filedescriptor out of range). poll has no such bound.
"""

from __future__ import annotations

import errno
import math
import select
from collections.abc import Sequence

# What poll says of an fd that select would call readable: data, the peer's end (HUP), an
# error to read (ERR). An fd that is not open (NVAL) is select's EBADF.
_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def readable(fds: Sequence[int], timeout: float | None) -> list[int]:
    """The fds of `fds` that can be read now, waiting up to `timeout` seconds for one (None:
    for ever; 0: not at all); OSError(EBADF) for an fd that is not open."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    wait = None if timeout is None else max(0, math.ceil(timeout * 1000))
    ready = []
    for fd, events in poller.poll(wait):
        if events & select.POLLNVAL:
            raise OSError(errno.EBADF, f"fd {fd} is not open")
        if events & _READABLE:
            ready.append(fd)
    return ready
