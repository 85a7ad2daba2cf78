"""The broker's watch on a client's caller (init.broker.session.watch_parent): a pidfd that is
readable once the caller ends; and no fd to watch it with is not taken for its end."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
from collections.abc import Callable

import pytest

from init.broker.session import watch_parent


def test_the_callers_pidfd_is_readable_once_the_caller_ends() -> None:
    caller = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    assert caller.stdout is not None
    client = int(caller.stdout.readline())
    fd = watch_parent(client)
    try:
        assert fd is not None and fd >= 0
        assert select.select([fd], [], [], 0)[0] == []
        caller.kill()
        caller.wait(5)
        assert select.select([fd], [], [], 5)[0] == [fd]
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)
        os.kill(client, signal.SIGKILL)


def test_a_client_whose_caller_is_init_has_none_to_watch() -> None:
    assert watch_parent(1) is None  # init's parent is 0


def test_no_fd_to_watch_with_is_not_the_callers_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of fds, pidfd_open fails with EMFILE: -1 would stop the compile as if its caller
    # (this test, alive) had ended. A caller gone between the two reads is -1.
    def fails(error: OSError) -> Callable[[int], int]:
        def pidfd_open(pid: int) -> int:
            raise error

        return pidfd_open

    monkeypatch.setattr(os, "pidfd_open", fails(OSError(errno.EMFILE, "Too many open files")))
    assert watch_parent(os.getpid()) is None
    monkeypatch.setattr(os, "pidfd_open", fails(ProcessLookupError(errno.ESRCH, "gone")))
    assert watch_parent(os.getpid()) == -1
