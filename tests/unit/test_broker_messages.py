"""The client<->broker messages against hostile bytes: every message one ASCII line whatever
it carries, output that looks like an answer staying output, and lines that do not fit
refused by name."""

from __future__ import annotations

import pytest

from init.compiles.messages import (
    Chunk,
    CommandRequest,
    Final,
    MessageError,
    ShimRequest,
    Stop,
    decode_answer,
    decode_request,
)


def test_each_message_is_one_ascii_line_and_reads_back() -> None:
    messages = [
        ShimRequest(("latexmk", "-pdf", 'a\nb{"status":0}\n', "é\u2028"), "/c/d\n", {"X": "1\n2"}),
        CommandRequest("/c/p", "main.tex", "xelatex", "img:1", 30.0, "p1", True, {"A": "b"}),
        CommandRequest("/c/p"),
        Stop(15),
    ]
    for message in messages:
        wire = message.encode()
        assert wire.isascii() and wire.count(b"\n") == 1 and wire.endswith(b"\n")
        assert decode_request(wire.rstrip(b"\n")) == message
    for answer in (Chunk(b"\0\xff\n" + Final(0).encode()), Final(1, "out\n", "err\n", 15)):
        wire = answer.encode()
        assert wire.isascii() and wire.count(b"\n") == 1
        assert decode_answer(wire.rstrip(b"\n")) == answer


def test_output_that_looks_like_a_final_stays_output() -> None:
    fake = Final(0, stdout="all good").encode()
    assert decode_answer(Chunk(fake).encode().strip()) == Chunk(fake)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1]",
        b'{"op":"shim","version":1,"argv":[],"cwd":"/"}',
        b'{"op":"shim","version":2,"argv":["latexmk"],"cwd":"/"}',
        b'{"op":"shim","version":1,"argv":["latexmk",1],"cwd":"/"}',
        b'{"op":"shim","version":1,"argv":["latexmk"],"cwd":"/","env":{"A":1}}',
        b'{"op":"compile","version":1,"directory":"/d","main":"m","engine":"e","json":"yes"}',
        b'{"op":"compile","version":1,"directory":"/d","main":"m","engine":"e","json":true,'
        b'"timeout":true}',
        b'{"op":"stop","signal":"TERM"}',
        b'{"op":"run"}',
        b'{"op":"shim","version":1,"argv":["\xff"],"cwd":"/"}',
    ],
)
def test_a_request_that_does_not_fit_is_refused(line: bytes) -> None:
    with pytest.raises(MessageError):
        decode_request(line)


@pytest.mark.parametrize(
    "line",
    [b'{"out":"not base64!"}', b'{"status":"0","stdout":"","stderr":""}', b'{"status":0}'],
)
def test_an_answer_that_does_not_fit_is_refused(line: bytes) -> None:
    with pytest.raises(MessageError):
        decode_answer(line)


def test_the_hand_written_json_reads_back_as_json_reads_it() -> None:
    odd = '\udcff\U0001f600\x00\x1f\x7f"\\/\u2028é'  # a byte os.fsdecode kept, an emoji, controls
    request = ShimRequest(("latexmk", odd), "/c/" + odd, {odd: odd})
    assert decode_request(request.encode().rstrip(b"\n")) == request
    for timeout in (0.5, 1e300, float("inf")):
        back = decode_request(CommandRequest("/d", timeout=timeout).encode().strip())
        assert isinstance(back, CommandRequest) and back.timeout == timeout
    final = Final(2, "out \udcff", 'err\n{"status":0}\n', None)
    assert decode_answer(final.encode().strip()) == final


def test_the_shims_client_starts_without_json_re_or_dataclasses() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(root)!r}); import init.compiles.client; "
        "heavy = {'json', 're', 'dataclasses', 'enum', 'signal', 'socket'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
