"""The broker's side of the agent's protocol against hostile bytes: requests that stay one line
whatever their arguments hold, the agent's lines checked field by field, the engine's frames
checked header by header, and a compile's output that looks like an answer staying output."""

from __future__ import annotations

import base64
import json

import pytest

from init.broker import multiplex, protocol
from init.broker.multiplex import Demultiplexer, frame
from init.broker.protocol import (
    Answer,
    Lines,
    Output,
    ProtocolError,
    Ready,
    Reason,
    Request,
    decode,
)

FAKE_ANSWER = b'{"id":"c1","reason":"exit","exit":0,"signal":null,"seconds":0.1,"leftovers":0}\n'


def output_line(request_id: str, fd: int, data: bytes) -> bytes:
    body = {"id": request_id, "fd": fd, "data": base64.b64encode(data).decode()}
    return json.dumps(body).encode()


def test_a_request_is_one_ascii_line_whatever_its_arguments_hold() -> None:
    request = Request(
        id="c1",
        argv=("printf", "%s", 'a\nb\r\n{"id":"x"}\n', "é\u2028\0"),
        cwd="/compile/dir\nname",
        timeout=30,
        env={"X": "line1\nline2"},
        tidy="/compile/dir\nname",
    )
    wire = request.encode()
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    assert wire.isascii()
    back = json.loads(wire)
    assert back["argv"] == list(request.argv)
    assert back["cwd"] == request.cwd and back["env"] == {"X": "line1\nline2"}
    assert back["tidy"] == "/compile/dir\nname"


def test_output_that_looks_like_an_answer_stays_output() -> None:
    junk = FAKE_ANSWER + b"\x00\xff\xfe binary \n\n" + bytes(range(256))
    message = decode(output_line("c1", 1, junk))
    assert message == Output("c1", 1, junk)


def test_the_three_messages_decode() -> None:
    assert decode(b'{"agent":"ready","version":1,"pid":1}') == Ready(1, 1)
    answer = decode(FAKE_ANSWER.strip())
    assert answer == Answer("c1", Reason.EXIT, exit=0, seconds=0.1)
    killed = decode(b'{"id":"c2","reason":"timeout","exit":null,"signal":9,"leftovers":3}')
    assert isinstance(killed, Answer)
    assert (killed.reason, killed.status, killed.leftovers) == (Reason.TIMEOUT, 137, 3)
    assert Answer("c3", Reason.EXIT, exit=12).status == 12
    assert Answer(None, Reason.ERROR, message="bad request").status is None


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"\xff\xfe\x00junk",
        b'"a string"',
        b"[1, 2]",
        b'{"id":"c1","fd":3,"data":""}',  # no such stream
        b'{"id":"c1","fd":1,"data":"!!!not base64"}',
        b'{"id":"c1","fd":1,"data":5}',
        b'{"id":7,"fd":1,"data":""}',
        b'{"id":"c1","reason":"exploded"}',
        b'{"id":"c1","reason":"exit","exit":"0"}',
        b'{"id":"c1","reason":"exit","exit":true}',
        b'{"id":["c1"],"reason":"exit","exit":0}',
        b'{"id":"c1","reason":"exit","exit":0,"seconds":"soon"}',
        b'{"agent":"ready","version":"1","pid":1}',
        '{"id":"c1","reason":"exit","exit":0,"message":"é"}'.encode(),  # not the agent's ASCII
    ],
)
def test_a_line_that_is_not_the_agents_is_refused(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


def test_lines_are_whole_across_any_split() -> None:
    stream = b"".join(output_line("c1", 1, bytes([i]) * i) + b"\n" for i in range(50))
    lines = Lines()
    got = []
    for i in range(0, len(stream), 7):
        got.extend(lines.feed(stream[i : i + 7]))
    assert [decode(line) for line in got] == [Output("c1", 1, bytes([i]) * i) for i in range(50)]
    assert lines.pending == 0


def test_a_huge_line_is_refused_before_it_ends() -> None:
    lines = Lines(limit=1000)
    assert lines.feed(b"x" * 1000) == []
    with pytest.raises(ProtocolError):
        lines.feed(b"x")  # no newline yet: never buffered without bound
    with pytest.raises(ProtocolError):
        Lines(limit=1000).feed(b"y" * 2000 + b"\n")


def test_frames_are_whole_across_any_split() -> None:
    payloads = [(1, b"hello\n"), (2, b"diagnostic"), (1, b""), (1, bytes(range(256)) * 40)]
    stream = b"".join(frame(s, p) for s, p in payloads)
    demux = Demultiplexer()
    got = []
    for byte in range(len(stream)):
        got.extend(demux.feed(stream[byte : byte + 1]))
    assert got == payloads
    assert demux.pending == 0
    cut = Demultiplexer()
    cut.feed(frame(1, b"abcdef")[:10])
    assert cut.pending == 10  # a frame cut by the stream's end shows


@pytest.mark.parametrize(
    "header",
    [
        b"\x03\0\0\0\0\0\0\x01",  # no stream 3
        b"\x00\0\0\0\0\0\0\x01",  # stdin never comes back
        b"\x01\0\1\0\0\0\0\x01",  # padding not zero
        b"\x01\0\0\0\xff\xff\xff\xff",  # 4 GiB
        b'{"id":"',  # a line where a header should be
    ],
)
def test_a_stream_that_is_not_frames_is_refused(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        Demultiplexer().feed(header + b"\0" * 8)


def test_limits_are_what_the_agent_keeps_to() -> None:
    # The agent sends at most 64 KiB of output a line: base64 of that fits the line limit.
    assert len(output_line("x" * 64, 2, b"\xff" * 65536)) < protocol.MAX_LINE
    assert multiplex.MAX_FRAME > protocol.MAX_LINE
