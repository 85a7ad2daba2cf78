"""The compile API's attack battery over real sockets: `python -m init.compiles.api`'s main in
a process of its own, with a stand-in for the compile broker (a PDF at once, or a 96 MiB one),
so each attack measures the service itself: its threads, its memory (VmRSS, and VmHWM for the
peak), and how soon an honest client is answered while the attack goes on.

The same attacks on the real engine's compiles: tests/integration/test_compile_api.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from init.httpd.server import EVICT_GRACE
from tests.integration.conftest import PYTHON, REPO, free_port, wait_for

pytestmark = pytest.mark.root

MAX_CONNECTIONS = 64
MAX_PENDING = 4
HONEST_WITHIN = 3.0  # seconds an honest compile may take while an attack goes on
DOCUMENT = b"\\documentclass{article}\\begin{document}honest\\end{document}"
# A stand-in for the compile broker on its socket: each request answered at once as the
# compile command would (its JSON), with a PDF (or a 96 MiB one) in the project dir.
STAND_IN = """\
import json, os, pathlib, socket, sys, threading
from init.compiles.messages import Final, decode_request
def serve(conn):
    with conn:
        data = b""
        while b"\\n" not in data:
            got = conn.recv(1 << 16)
            if not got:
                return
            data += got
        request = decode_request(data.partition(b"\\n")[0])
        with open(os.environ["STAND_IN_LOG"], "a") as log:
            log.write(request.project + "\\n")
        project_dir = pathlib.Path(request.directory)
        main = (project_dir / request.main).read_bytes()
        pdf = project_dir / "output.pdf"
        pdf.write_bytes(b"%PDF-1.5 stand-in\\n")
        if b"BIGPDF" in main:
            with open(pdf, "r+b") as f:
                f.truncate(96 << 20)
        document = {"status": "ok", "exit_status": 0, "pdf": str(pdf), "seconds": 0.01}
        conn.sendall(Final(0, json.dumps(document) + "\\n").encode())
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(64)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""
DRIVER = "import sys; from init.compiles import api; sys.exit(api.main(sys.argv[1:]))"


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    port: int
    compiles: Path
    log_path: Path
    compiled_log: Path

    def status(self) -> dict[str, int]:
        """Threads, and VmRSS / VmHWM in KiB, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("Threads", "VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
        return fields

    def compiled(self) -> list[str]:
        if not self.compiled_log.exists():
            return []
        return self.compiled_log.read_text().split()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def raw(self, data: bytes, timeout: float = 10.0, half_close: bool = True) -> tuple[int, bytes]:
        """Send `data`, half-close (a client's end, which stops a compile that runs), read the
        whole answer: (status, body)."""
        with self.connect(timeout) as sock:
            sock.sendall(data)
            if half_close:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            answer = read_all(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def post(self, body: bytes, content_type: str = "text/x-tex", query: str = "") -> int:
        request = (
            f"POST /compile{query} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        return self.raw(request, timeout=30, half_close=False)[0]


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    compiles = tmp_path / "compiles"
    compiles.mkdir()
    broker_socket = tmp_path / "broker.sock"
    port = free_port()
    log_path = tmp_path / "api.log"
    env = {
        **os.environ,
        "STAND_IN_LOG": str(tmp_path / "compiled.log"),
        "OVERLEAF_INIT_COMPILE_BROKER_SOCKET": str(broker_socket),
    }
    with log_path.open("wb") as log:
        broker = subprocess.Popen(
            [PYTHON, "-c", STAND_IN, str(broker_socket)], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
        )  # fmt: skip
        proc = subprocess.Popen(
            [PYTHON, "-c", DRIVER, "--listen", f"127.0.0.1:{port}",
             "--compiles-dir", str(compiles), "--max-pending", str(MAX_PENDING),
             "--max-connections", str(MAX_CONNECTIONS), "--max-upload-mb", "4"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env=env, start_new_session=True,
        )  # fmt: skip
    running = Service(proc, port, compiles, log_path, tmp_path / "compiled.log")
    try:
        wait_for(lambda: "listening on" in running.log() or proc.poll() is not None, 20, "the API")
        wait_for(lambda: broker_socket.exists() or broker.poll() is not None, 20, "the broker")
        assert proc.poll() is None and broker.poll() is None, running.log()
        yield running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, running.log()
    finally:
        for started in (proc, broker):
            if started.poll() is None:
                started.kill()
                started.wait()
    assert "Traceback" not in running.log(), running.log()


def honest(service: Service) -> float:
    """Seconds an honest .tex upload takes to come back as a PDF."""
    began = time.monotonic()
    assert service.post(DOCUMENT) == 200
    return time.monotonic() - began


# -- connections -------------------------------------------------------------------------------


def test_400_idle_connections_hold_bounded_threads_and_an_honest_client_gets_through(
    service: Service,
) -> None:
    baseline = service.status()
    idle = [service.connect() for _ in range(400)]
    try:
        time.sleep(0.5)
        under = service.status()
        took = honest(service)
        print(
            f"\n400 idle connections: {under['Threads']} threads (cap {MAX_CONNECTIONS}), "
            f"RSS {baseline['VmRSS'] // 1024} -> {under['VmRSS'] // 1024} MiB; "
            f"an honest compile in {took:.2f} s"
        )
        assert under["Threads"] <= MAX_CONNECTIONS + 4
        assert under["VmRSS"] - baseline["VmRSS"] < 32 * 1024
        assert took < HONEST_WITHIN
        # The idle ones past the cap were closed to make way; the rest close at the deadline.
        began = time.monotonic()
        wait_for(lambda: service.status()["Threads"] <= 2, 15, "the idle connections to end")
        print(f"the last idle connections ended {time.monotonic() - began:.1f} s later")
        for sock in idle:
            sock.settimeout(1)
            assert read_all(sock) in (b"", *[b""])  # closed without an answer, or reset
    finally:
        for sock in idle:
            sock.close()


def test_slow_headers_make_way_and_time_out(service: Service) -> None:
    """Slowloris: each connection sends a header byte now and then, never the end."""
    slow = []
    for _ in range(MAX_CONNECTIONS):
        sock = service.connect()
        sock.sendall(b"POST /compile HTTP/1.1\r\nX-Slow: ")
        slow.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    dripping = threading.Thread(target=trickle, daemon=True)
    dripping.start()
    try:
        time.sleep(1.5)
        took = honest(service)
        print(f"\n{MAX_CONNECTIONS} slow-header connections: an honest compile in {took:.2f} s")
        assert took < HONEST_WITHIN
        began = time.monotonic()
        wait_for(lambda: service.status()["Threads"] <= 2, 15, "the slow headers to time out")
        waited = time.monotonic() - began
        print(f"slow headers cut off {waited:.1f} s later (the 10 s header deadline)")
    finally:
        stop.set()
        dripping.join()
        for sock in slow:
            sock.close()


def test_stalled_uploads_do_not_take_the_slots(service: Service) -> None:
    """16 uploads that stop after a few bytes once took every slot: an honest one got 429."""
    stalled = []
    for _ in range(16):
        sock = service.connect()
        sock.sendall(
            b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"x" * 10
        )
        stalled.append(sock)
    try:
        time.sleep(0.5)
        took = honest(service)
        print(f"\n16 stalled uploads (max-pending {MAX_PENDING}): honest compile {took:.2f} s")
        assert took < HONEST_WITHIN
        assert len(service.compiled()) == 1
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: service.status()["Threads"] <= 2, 10, "the stalled uploads to end")
    assert list(service.compiles.iterdir()) == []  # no spool, no project dir left


def test_stalled_uploads_on_every_connection_make_way_after_the_grace(service: Service) -> None:
    stalled = []
    for _ in range(MAX_CONNECTIONS):
        sock = service.connect()
        sock.sendall(
            b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"x" * 10
        )
        stalled.append(sock)
    try:
        time.sleep(0.5)
        code, _ = service.raw(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert code == 503  # full, and none of them lags long enough yet to make way
        time.sleep(EVICT_GRACE + 0.5)
        took = honest(service)
        print(f"\n{MAX_CONNECTIONS} stalled uploads: after the grace, honest compile {took:.2f} s")
        assert took < HONEST_WITHIN
    finally:
        for sock in stalled:
            sock.close()


def test_a_short_body_is_400_and_never_compiled(service: Service) -> None:
    code, body = service.raw(
        b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\nContent-Length: 100000\r\n\r\n"
        + DOCUMENT[:64]
    )
    assert code == 400 and json.loads(body)["reason"] == "length"
    assert service.compiled() == []
    assert list(service.compiles.iterdir()) == []


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        (b"Content-Length: \xc2\xb2\r\n", 400),
        (b"Content-Length: -1\r\n", 400),
        (b"Content-Length: 10\r\nContent-Length: 12\r\n", 400),
        (b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\n", 411),
        (b"Content-Length: 99999999999999999999999999\r\n", 400),
    ],
    ids=["superscript", "negative", "two", "with-te", "chunked", "huge"],
)
def test_malformed_lengths_are_a_clean_4xx(service: Service, headers: bytes, code: int) -> None:
    request = b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\n" + headers + b"\r\n"
    answer, body = service.raw(request + b"0\r\n\r\n" + DOCUMENT)
    assert answer == code, body
    assert service.compiled() == []
    assert service.proc.poll() is None


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 505),
        (b"BREW /compile HTTP/1.1\r\n\r\n", 501),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-Big: " + b"b" * 60000 + b"\r\n" * 2, 200),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + (b"X-Big: " + b"b" * 30000 + b"\r\n") * 3 + b"\r\n", 431),
        (b"POST /compile?timeout=1e309 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST /compile?main=%ff.tex HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"POST /compile HTTP/1.1\r\nContent-Type: image/png\r\nContent-Length: 1\r\n\r\nx", 415),
        (b"POST /compile?keep=1 HTTP/1.1\r\nContent-Type: text/x-tex\r\n"
         b"Content-Length: 1\r\n\r\nx", 403),
    ],
    ids=["garbage", "version", "method", "long-line", "one-big-header", "many-headers",
         "headers-over-64k", "timeout-inf", "bad-main", "type", "keep"],
)  # fmt: skip
def test_every_malformed_request_is_a_clean_4xx(
    service: Service, request_bytes: bytes, code: int
) -> None:
    answer, _ = service.raw(request_bytes)
    assert answer == code
    assert service.compiled() == []
    assert service.proc.poll() is None


# -- archives and answers ------------------------------------------------------------------------


def pax_bomb(claimed: int = 512 << 20) -> bytes:
    """A gzipped tar whose first member is a pax header of `claimed` bytes (zeros): 509 KiB."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = claimed
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(info.tobuf(format=tarfile.GNU_FORMAT)[:512])]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(claimed >> 20)]
    parts.append(compressor.flush())
    return b"".join(parts)


def test_a_pax_bomb_keeps_the_service_small(service: Service) -> None:
    upload = pax_bomb()
    before = service.status()
    request = (
        b"POST /compile HTTP/1.1\r\nContent-Type: application/gzip\r\n"
        + f"Content-Length: {len(upload)}\r\n\r\n".encode()
        + upload
    )
    began = time.monotonic()
    code, body = service.raw(request)
    took = time.monotonic() - began
    after = service.status()
    print(
        f"\npax bomb ({len(upload) // 1024} KiB gzip, 512 MiB header): {code} in {took:.2f} s, "
        f"RSS {before['VmRSS'] // 1024} -> {after['VmRSS'] // 1024} MiB, "
        f"peak {after['VmHWM'] // 1024} MiB"
    )
    assert code == 413 and json.loads(body)["reason"] == "archive_header"
    assert after["VmHWM"] < before["VmHWM"] + 16 * 1024
    assert service.compiled() == [] and list(service.compiles.iterdir()) == []


def test_a_sparse_member_is_refused(service: Service) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("main.tex")
        info.size = 512
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.realsize": str(128 << 20),
        }
        tar.addfile(info, io.BytesIO(b"1\n0\n1\n".ljust(512, b"x")))
    request = (
        b"POST /compile HTTP/1.1\r\nContent-Type: application/x-tar\r\n"
        + f"Content-Length: {len(buffer.getvalue())}\r\n\r\n".encode()
        + buffer.getvalue()
    )
    code, body = service.raw(request)
    assert code == 400 and "sparse" in json.loads(body)["message"]
    assert list(service.compiles.iterdir()) == []


def test_clients_that_do_not_read_a_big_pdf_do_not_hold_it_in_memory(service: Service) -> None:
    """4 clients not reading a 96 MiB PDF once took the service from 23 to 407 MiB."""
    before = service.status()
    readers = []
    for _ in range(4):
        sock = service.connect(timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = DOCUMENT.replace(b"honest", b"BIGPDF")
        sock.sendall(
            b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        readers.append(sock)
    try:
        for sock in readers:
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
        wait_for(lambda: len(service.compiled()) == 4, 20, "the four compiles")
        time.sleep(1)
        during = service.status()
        took = honest(service)
        print(
            f"\n4 clients not reading a 96 MiB PDF: RSS {before['VmRSS'] // 1024} -> "
            f"{during['VmRSS'] // 1024} MiB (peak {during['VmHWM'] // 1024} MiB); "
            f"an honest compile meanwhile in {took:.2f} s"
        )
        assert during["VmHWM"] < before["VmHWM"] + 24 * 1024
        assert took < HONEST_WITHIN
        # Each project dir is gone already: the answers stream from the open files.
        assert list(service.compiles.iterdir()) == []
    finally:
        for sock in readers:
            sock.close()
    wait_for(lambda: service.status()["Threads"] <= 2, 10, "the answers to end")


def test_a_whole_pdf_still_comes_back_streamed(service: Service) -> None:
    body = DOCUMENT.replace(b"honest", b"BIGPDF")
    with service.connect(timeout=30) as sock:
        sock.sendall(
            b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = read_all(sock)
    head, _, pdf = answer.partition(b"\r\n\r\n")
    assert b"Content-Length: 100663296" in head
    assert len(pdf) == 96 << 20 and pdf.startswith(b"%PDF-1.5 stand-in")


def test_keep_alive_carries_several_requests(service: Service) -> None:
    with service.connect() as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b"compile-api: up" not in answer:
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
