"""The engine's multiplexed stream (an attach or exec without a TTY): each frame an 8-byte
header (stream: 0 stdin, 1 stdout, 2 stderr; three zero bytes; the payload's size, big
endian) and the payload. Anything else is a ProtocolError: the stream is not trusted further.
"""

from __future__ import annotations

import struct

from init.broker.protocol import ProtocolError

HEADER = 8
MAX_FRAME = 16 << 20  # dockerd copies in 32 KiB buffers; far past that is not a frame
STDOUT, STDERR = 1, 2


class Demultiplexer:
    """Bytes of the stream in, (stream, payload) frames out, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER:
            stream, zero, size = struct.unpack(">B3sI", self._buffer[:HEADER])
            if stream not in (STDOUT, STDERR) or zero != b"\0\0\0" or size > MAX_FRAME:
                raise ProtocolError(
                    f"not a frame of the engine's stream: {bytes(self._buffer[:8])!r}"
                )
            if len(self._buffer) < HEADER + size:
                break
            frames.append((stream, bytes(self._buffer[HEADER : HEADER + size])))
            del self._buffer[: HEADER + size]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not whole: at the stream's end, a cut frame."""
        return len(self._buffer)


def frame(stream: int, payload: bytes) -> bytes:
    """One frame as the engine writes it (for the tests)."""
    return struct.pack(">B3sI", stream, b"\0\0\0", len(payload)) + payload
