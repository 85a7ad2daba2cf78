"""init.broker.readable: poll(2) where select(2) stops at fd 1023."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from init.broker.readable import readable

HIGH = 1500  # past select's FD_SETSIZE (1024)


@pytest.fixture
def pair() -> Iterator[tuple[int, socket.socket]]:
    """A connected pair: the broker's end dup'ed past 1023 (its fd), the client's end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= HIGH + 16:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, HIGH + 1024), hard))
    ours, theirs = socket.socketpair()
    high = fcntl.fcntl(ours.fileno(), fcntl.F_DUPFD_CLOEXEC, HIGH)
    ours.close()
    try:
        yield high, theirs
    finally:
        os.close(high)
        theirs.close()


def test_select_refuses_an_fd_past_1023(pair: tuple[int, socket.socket]) -> None:
    high, _ = pair
    assert high >= HIGH
    with pytest.raises(ValueError, match="out of range"):
        select.select([high], [], [], 0)


def test_an_fd_past_1023_is_waited_for_and_read(pair: tuple[int, socket.socket]) -> None:
    high, theirs = pair
    assert readable([high], 0) == []
    began = time.monotonic()
    assert readable([high], 0.2) == []
    assert 0.15 < time.monotonic() - began < 2
    theirs.sendall(b"x")
    assert readable([high], None) == [high]
    assert os.read(high, 1) == b"x"


def test_the_peers_end_is_readable(pair: tuple[int, socket.socket]) -> None:
    high, theirs = pair
    theirs.close()
    assert readable([high], 1) == [high]
    assert os.read(high, 1) == b""


def test_only_the_ready_fds_of_several(pair: tuple[int, socket.socket]) -> None:
    high, theirs = pair
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        assert readable([high, r], 1) == [r]
        theirs.sendall(b"y")
        assert sorted(readable([high, r], 1)) == sorted([high, r])
    finally:
        os.close(r)
        os.close(w)


def test_a_pidfd_is_readable_once_its_process_ends() -> None:
    proc = subprocess.Popen(["sleep", "0.3"])
    fd = os.pidfd_open(proc.pid)
    try:
        assert readable([fd], 0) == []
        assert readable([fd], 10) == [fd]
    finally:
        os.close(fd)
        proc.wait()


def test_an_fd_that_is_not_open_is_ebadf() -> None:
    never = resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 5  # no open() can return it
    with pytest.raises(OSError) as caught:
        readable([never], 0)
    assert caught.value.errno == errno.EBADF
