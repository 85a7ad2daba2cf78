"""One warm container driven through its agent: created with the project's profile but the
agent as its command, attached before it starts (so its first line is not missed), then one
request at a time over its stdin, the answers read from the engine's multiplexed stream on the
same connection. The agent's end (EOF on the stream) is noticed at the next read, and the
container is then never used again.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Mapping

from init.broker.multiplex import STDOUT, Demultiplexer
from init.broker.protocol import (
    Answer,
    Lines,
    Message,
    Output,
    ProtocolError,
    Ready,
    Request,
    cancel,
    decode,
)
from init.broker.readable import readable
from init.engine.client import CALL_TIMEOUT
from init.errors import SandboxError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from init.engine.client import Attachment, DockerBackend

READY_DEADLINE = 30.0  # the agent's first line, from the container's start
# Past a request's timeout, the agent has this long to say it killed it: its drain of the
# compile's pipes (5 s) and its tidy before and after the compile (10 s each, agent.pl), which
# take milliseconds unless something is wrong.
ANSWER_GRACE = 30.0
DIAGNOSTICS = 20  # the agent's last stderr lines kept, for the message when it ends


class AgentGone(SandboxError):
    """The agent ended (and its container with it), or stopped answering. `sent` says whether
    the request may have reached it: if not, it can be run in a fresh container; if so, never
    again (a compile that ends its agent must not get a second go)."""

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message, "the broker starts a fresh container for the project")
        self.sent = sent


class WarmContainer:
    """A running container whose PID 1 is the agent, and the broker's end of its stdio."""

    def __init__(
        self,
        backend: DockerBackend,
        container_id: str,
        attachment: Attachment,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.id = container_id
        self._attachment = attachment
        self._clock = clock
        self._demux = Demultiplexer()
        self._lines = Lines()
        self._messages: deque[Message] = deque()
        self.diagnostics: deque[str] = deque(maxlen=DIAGNOSTICS)
        self.ended: str | None = None  # why it may not be used again
        self.ready: Ready | None = None
        if attachment.first:
            self._take(attachment.first)

    @classmethod
    def start(
        cls,
        backend: DockerBackend,
        name: str,
        body: Mapping[str, Any],
        deadline: float = READY_DEADLINE,
    ) -> WarmContainer:
        """Create, attach, start, and wait for the agent's first line."""
        container_id = backend.create(name, body)
        try:
            attachment = backend.attach(container_id)
            warm = cls(backend, container_id, attachment)
            backend.start_created(container_id)
            first = warm._next(deadline)
            if not isinstance(first, Ready):
                raise ProtocolError(f"the agent's first line was {first!r}, not its greeting")
            warm.ready = first
        except BaseException:
            backend.remove(container_id)
            raise
        return warm

    # -- reading ---------------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        for stream, payload in self._demux.feed(data):
            if stream == STDOUT:
                self._messages.extend(decode(line) for line in self._lines.feed(payload))
            else:
                text = payload.decode(errors="replace").strip()
                self.diagnostics.extend(line for line in text.splitlines() if line)

    def _fill(self, timeout: float | None, also: int | None = None) -> bool:
        """Read what the stream has within `timeout`; False when `also` became readable
        first. AgentGone at the stream's end."""
        sock = self._attachment.sock
        watched = [sock.fileno()] + ([also] if also is not None else [])
        ready = readable(watched, timeout)
        if also is not None and also in ready:
            return False
        if sock.fileno() not in ready:
            return True
        try:
            data = sock.recv(1 << 16)
        except OSError as e:
            data = b""
            self.diagnostics.append(f"(read: {e})")
        if not data:
            self._end("the agent ended (its container stopped)")
        self._take(data)
        return True

    def _end(self, why: str) -> None:
        if self._demux.pending or self._lines.pending:
            why += " in the middle of a line"
        self.ended = why
        said = "; ".join(self.diagnostics)
        raise AgentGone(f"{why}{': ' + said if said else ''}")

    def _next(self, timeout: float) -> Message:
        deadline = self._clock() + timeout
        while not self._messages:
            left = deadline - self._clock()
            if left <= 0:
                self.ended = "the agent did not answer in time"
                raise AgentGone(self.ended)
            self._fill(left)
        return self._messages.popleft()

    def alive(self) -> bool:
        """Whether the agent is still there, without waiting: its end is already on the
        stream if it exited (idle, lifetime, a compile that sent it SIGTERM)."""
        if self.ended is not None:
            return False
        try:
            self._fill(0)
        except (AgentGone, ProtocolError) as e:
            self.ended = self.ended or str(e)
            return False
        if self._messages:  # nothing is asked: a line now is not the agent's to send
            self.ended = f"the agent spoke unasked: {self._messages[0]!r}"
            return False
        return True

    # -- a compile -------------------------------------------------------------------------

    def run(
        self,
        request: Request,
        output: Callable[[Output], None],
        cancel_fd: int | None = None,
    ) -> Answer:
        """Send `request`, pass its output on as it comes, return its answer. A byte on
        `cancel_fd` stops the compile (the agent kills its group and answers "cancelled")."""
        if self.ended is not None:
            raise AgentGone(self.ended)
        sent = False
        try:
            self._attachment.sock.sendall(request.encode())
            sent = True
            deadline = self._clock() + request.timeout + ANSWER_GRACE
            while True:
                while self._messages:
                    message = self._messages.popleft()
                    if isinstance(message, Output) and message.id == request.id:
                        output(message)
                    elif isinstance(message, Answer) and message.id == request.id:
                        return message
                    else:
                        raise ProtocolError(f"the agent sent {message!r} during {request.id}")
                left = deadline - self._clock()
                if left <= 0:
                    self.ended = f"the agent did not answer {request.timeout:g} s + grace"
                    raise AgentGone(self.ended, sent)
                if not self._fill(left, cancel_fd):
                    assert cancel_fd is not None
                    with contextlib.suppress(OSError):
                        os.read(cancel_fd, 64)
                    self._attachment.sock.sendall(cancel(request.id))
                    cancel_fd = None
        except AgentGone as e:
            raise AgentGone(e.message, sent) from e
        except ProtocolError:
            self.ended = "the agent broke the protocol"
            raise
        except OSError as e:
            self.ended = f"the agent's stream failed: {e}"
            raise AgentGone(self.ended, sent) from e

    def close(self, remove_within: float = CALL_TIMEOUT) -> None:
        """Let go: EOF on its stdin (the agent exits), and the container removed (the engine
        silent for `remove_within` s: EngineError)."""
        self.ended = self.ended or "retired"
        self._attachment.close_stdin()
        self._attachment.close()
        self.backend.remove(self.id, remove_within)
