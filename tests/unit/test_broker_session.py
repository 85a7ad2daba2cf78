"""The broker's watch on a client's caller (init.broker.session.watch_parent): a pidfd that is
readable once the caller ends; and no fd to watch it with is not taken for its end. A broker
with no fd left to count its fds with has no room for a connection (and does not die of it)."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import Any, cast

import pytest

from init.broker.execute import Broker
from init.broker.service import Service
from init.broker.session import watch_parent
from init.config import UidRange


def fails(error: OSError) -> Callable[..., Any]:
    """A stand-in for an os function that raises `error`."""

    def call(*args: object) -> Any:
        raise error

    return call


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
    monkeypatch.setattr(os, "pidfd_open", fails(OSError(errno.EMFILE, "Too many open files")))
    assert watch_parent(os.getpid()) is None
    monkeypatch.setattr(os, "pidfd_open", fails(ProcessLookupError(errno.ESRCH, "gone")))
    assert watch_parent(os.getpid()) == -1


def test_a_broker_without_an_fd_to_count_its_fds_with_has_no_room(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # At the very limit, listing /proc/self/fd fails too (EMFILE): the loop must not die of it.
    with socket.socket(socket.AF_UNIX) as listener:
        service = Service(cast(Broker, None), cast(UidRange, None), listener)
        assert service._room() is True  # this process has room
        monkeypatch.setattr(os, "listdir", fails(OSError(errno.EMFILE, "Too many open files")))
        assert service._room() is False
        assert service._room() is False
    err = capsys.readouterr().err
    assert err.count("at the open-files limit (Too many open files, 0 sessions") == 1, err
