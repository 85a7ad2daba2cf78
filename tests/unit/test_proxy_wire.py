"""The proxy's HTTP framing: one way to read each request, or none."""

from __future__ import annotations

import socket

import pytest

from init.proxy import wire
from init.proxy.decision import Refused


def framing_of(raw: bytes) -> wire.Framing:
    return wire.request_framing(wire.parse_request(raw))


def test_a_request_head_is_read_with_its_headers() -> None:
    head = wire.parse_request(
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: x\r\nContent-Length: 2"
    )
    assert head.first == ("POST", "/v1.41/containers/create", "1")
    assert head.get("content-length") == "2"
    assert framing_of(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked") == wire.Framing("chunked")
    assert framing_of(b"GET / HTTP/1.1\r\nHost: x") == wire.Framing("none")


def test_a_long_target_is_read_up_to_the_heads_bound() -> None:
    """A create of Server Pro's runner carries its seccomp profile in the query (~20 KB for
    Overleaf's own): read; a head past MAX_HEAD is refused by the reader
    (test_a_head_past_its_bound_is_refused)."""
    target = "/v1.41/containers/create?HostConfig=" + "%22x%22" * 5000
    head = wire.parse_request(f"POST {target} HTTP/1.1\r\nHost: x".encode())
    assert head.first == ("POST", target, "1") and len(target) > 32 << 10


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", "smuggling"),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6", "repeated"),
        (b"POST / HTTP/1.1\r\nContent-Length: +5", "malformed"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", "other than chunked"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked", "other"),
    ],
)
def test_a_request_framed_two_ways_is_refused(raw: bytes, why: str) -> None:
    with pytest.raises(Refused) as refused:
        framing_of(raw)
    assert why in refused.value.reason


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n folded",
        b"GET / HTTP/1.1\r\nHost : x",
        b"GET / HTTP/1.1\nHost: x",
        b"GET  / HTTP/1.1",
        b"GET / HTTP/2.0",
        b"GET / HTTP/1.1\r\nNo colon here",
    ],
)
def test_malformed_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(Refused):
        wire.parse_request(raw)


def reader_of(data: bytes) -> wire.Reader:
    left, right = socket.socketpair()
    left.sendall(data)
    left.close()
    return wire.Reader(right)


def test_a_head_past_its_bound_is_refused() -> None:
    target = b"/v1.41/containers/create?x=" + b"y" * wire.MAX_HEAD
    with pytest.raises(Refused) as refused:
        reader_of(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n").head()
    assert refused.value.status == 431


def test_a_chunked_body_is_decoded_and_its_trailers_dropped() -> None:
    reader = reader_of(b'3\r\n{"a\r\n4;ext=1\r\n":1}\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT')
    assert wire.read_body(reader, wire.Framing("chunked"), 100) == b'{"a":1}'
    assert reader.take() == b"NEXT"


@pytest.mark.parametrize(
    ("data", "framing", "status"),
    [
        (b"x" * 11, wire.Framing("length", 11), 413),
        (b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n", wire.Framing("chunked"), 413),
        (b"zz\r\n", wire.Framing("chunked"), 400),
        (b"2\r\nabXX0\r\n\r\n", wire.Framing("chunked"), 400),
    ],
)
def test_bodies_past_the_cap_or_badly_chunked_are_refused(
    data: bytes, framing: wire.Framing, status: int
) -> None:
    with pytest.raises(Refused) as refused:
        wire.read_body(reader_of(data), framing, 10)
    assert refused.value.status == status


def test_two_requests_in_one_write_are_read_one_after_the_other() -> None:
    reader = reader_of(
        b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
        b"POST /b HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    )
    first = wire.parse_request(reader.head() or b"")
    assert wire.read_body(reader, wire.request_framing(first), 10) == b"{}"
    second = wire.parse_request(reader.head() or b"")
    assert second.first[1] == "/b"
    assert reader.head() is None


def test_the_engine_gets_a_head_of_the_proxys_making() -> None:
    head = wire.request_head(
        "POST", "/v1.41/containers/create", b"{}", False, "Docker-Client\r\nX: 1"
    )
    assert head == (
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: docker\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    )
    upgrade = wire.request_head("POST", "/containers/x/attach", None, True, "Docker-Client/28")
    assert b"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n" in upgrade


def test_a_response_body_is_relayed_by_its_framing_and_no_further() -> None:
    reader = reader_of(b"5\r\nhello\r\n0\r\n\r\nHTTP/1.1 200 OK")
    out, sink = socket.socketpair()
    wire.relay_body(reader, out, wire.Framing("chunked"))
    out.close()
    assert sink.recv(1000) == b"5\r\nhello\r\n0\r\n\r\n"
    assert reader.take() == b"HTTP/1.1 200 OK"
    assert wire.response_framing(wire.parse_response(b"HTTP/1.1 200 OK"), "HEAD").length == 0
