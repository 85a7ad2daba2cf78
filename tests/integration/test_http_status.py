"""The HTTP status endpoint for real: `python -m init.httpd.status` on a loopback port, over a
status file written whole as PID 1 writes it; probes change as the file does,
a file that cannot be read is a 503 with the reason, SIGTERM ends it at once with status 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CLEAN_ENV, INIT, PYTHON, require, wait_for

HTTP_STATUS = (PYTHON, "-m", "init.httpd.status")


def write(path: Path, document: dict[str, Any]) -> None:
    """As PID 1 and the installer write their files: whole, in one step (rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice for port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Endpoint:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

    def get(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Callable[..., Endpoint]]:
    started: list[Endpoint] = []

    def start(status_file: Path, listen: str = "127.0.0.1", *extra: str) -> Endpoint:
        port = free_port(listen)
        address = f"[{listen}]:{port}" if ":" in listen else f"{listen}:{port}"
        log_path = tmp_path / f"http-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*HTTP_STATUS, "--listen", address, "--status-file", str(status_file), *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=CLEAN_ENV, start_new_session=True,
            )  # fmt: skip
        running = Endpoint(proc, listen, port, log_path)
        started.append(running)
        wait_for(lambda: "listening on" in running.log() or proc.poll() is not None, 15, "listen")
        assert proc.poll() is None, running.log()
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)


def document(pid: int, **extra: Any) -> dict[str, Any]:
    return {
        "pid": pid,
        "phase": "running",
        "started_at": time.time(),
        "services": [{"name": "web", "state": "up", "pid": pid, "since": time.time()}],
        **extra,
    }


def test_probes_follow_the_status_file(tmp_path: Path, endpoint: Callable[..., Endpoint]) -> None:
    path = tmp_path / "run" / "status.json"
    server = endpoint(path)
    code, _, body = server.get("/healthz")
    assert (code, body) == (
        503,
        f"healthy: no: no status at {path}: is the init running?\n".encode(),
    )

    engine = {"mode": "dind", "ready": False, "state": "starting", "reason": "dockerd starting"}
    write(path, document(os.getpid(), phase="starting", engine=engine))
    assert server.get("/healthz")[0] == 200
    code, _, body = server.get("/readyz")
    assert code == 503 and body == b"ready: no: the init is still starting\n"

    write(path, document(os.getpid(), engine=engine))
    code, headers, body = server.get("/readyz", headers={"Accept": "application/json"})
    assert code == 503 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "ready": False,
        "reason": "compiles cannot run yet: the dind engine is not ready (dockerd starting)",
    }

    write(path, document(os.getpid(), engine={**engine, "ready": True, "state": "ready"}))
    assert server.get("/readyz") == (
        200,
        server.get("/readyz")[1],
        b"ready: yes: compiles can run\n",
    )

    crashing = {"name": "web", "state": "backoff", "reason": "exited with status 1"}
    write(path, document(os.getpid(), services=[crashing]))
    code, _, body = server.get("/healthz")
    assert (code, body) == (503, b"healthy: no: web is backoff: exited with status 1\n")
    assert server.get("/readyz")[0] == 503


def test_a_dead_init_fails_both_probes(tmp_path: Path, endpoint: Callable[..., Endpoint]) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = tmp_path / "status.json"
    write(path, document(gone.pid))
    server = endpoint(path)
    for probe in ("/healthz", "/readyz"):
        code, _, body = server.get(probe)
        assert code == 503 and f"the init (pid {gone.pid}) is not running".encode() in body


def test_status_is_the_merged_json(tmp_path: Path, endpoint: Callable[..., Endpoint]) -> None:
    path = tmp_path / "status.json"
    texlive = {"ready": False, "default": "tl:1", "state": "running"}
    write(path, document(os.getpid(), texlive=texlive))
    entry = {"image": "tl:1", "state": "installing", "bytes_done": 5, "bytes_total": 10}
    write(path.with_name("texlive.json"), {"default": "tl:1", "images": [entry]})
    server = endpoint(path)
    code, headers, body = server.get("/status")
    assert code == 200 and headers["Content-Type"] == "application/json"
    shown = json.loads(body)
    (image,) = shown["texlive"]["images"]
    assert {k: image[k] for k in entry} == entry and shown["pid"] == os.getpid()
    # The probes see the merged document too: the installer's progress is the reason.
    code, _, body = server.get("/readyz")
    assert code == 503 and b"tl:1" in body


def test_an_unreadable_status_is_503_with_the_reason(
    tmp_path: Path, endpoint: Callable[..., Endpoint]
) -> None:
    path = tmp_path / "status.json"
    path.write_text('{"pid": 1, "phase": "runn')  # a writer that did not replace atomically
    server = endpoint(path)
    code, _, body = server.get("/healthz")
    assert code == 503 and body.startswith(f"healthy: no: cannot read {path}: ".encode())
    code, _, body = server.get("/status")
    assert code == 503 and "cannot read" in json.loads(body)["error"]
    path.unlink()
    path.mkdir()
    code, _, body = server.get("/readyz")
    assert code == 503 and b"Is a directory" in body


def test_methods_paths_and_head(tmp_path: Path, endpoint: Callable[..., Endpoint]) -> None:
    path = tmp_path / "status.json"
    write(path, document(os.getpid()))
    server = endpoint(path)
    code, headers, body = server.get("/healthz", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert server.get("/nope")[0] == 404
    code, headers, _ = server.get("/healthz", method="POST")
    assert code == 405 and headers["Allow"] == "GET, HEAD"
    # Requests are not logged (probes would fill the log), errors are.
    assert server.log().splitlines() == [f"http-status: listening on 127.0.0.1:{server.port}"]


def test_ipv6_loopback(tmp_path: Path, endpoint: Callable[..., Endpoint]) -> None:
    require(socket.has_ipv6 and Path("/proc/net/if_inet6").exists(), "needs IPv6 on loopback")
    path = tmp_path / "status.json"
    write(path, document(os.getpid()))
    server = endpoint(path, "::1")
    assert server.get("/healthz")[0] == 200
    assert f"listening on [::1]:{server.port}" in server.log()


def test_sigterm_ends_it_promptly_with_status_0(
    tmp_path: Path, endpoint: Callable[..., Endpoint]
) -> None:
    path = tmp_path / "status.json"
    write(path, document(os.getpid()))
    server = endpoint(path)
    assert server.get("/healthz")[0] == 200
    rss_kib = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    )
    assert rss_kib < 24 * 1024, f"VmRSS {rss_kib} KiB"
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(5) == 0
    took = time.monotonic() - began
    assert took < 1.0, f"took {took:.2f} s"
    assert server.log().rstrip().endswith("http-status: stopped")
    with pytest.raises(ConnectionRefusedError):
        server.get("/healthz")


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("8089", "OVERLEAF_INIT_HTTP_ADDRESS='8089': give HOST:PORT"),
        ("::1:8089", "in brackets"),
        ("no-such-host.invalid:8089", "OVERLEAF_INIT_HTTP_ADDRESS='no-such-host.invalid:8089'"),
    ],
)
def test_a_bad_address_from_the_variable_exits_78_naming_it(address: str, says: str) -> None:
    done = subprocess.run(
        [*HTTP_STATUS, "--status-file", "/nonexistent/status.json"],
        env={**CLEAN_ENV, "OVERLEAF_INIT_HTTP_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 78
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in lines[0]


def test_a_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*HTTP_STATUS, "--listen", f"127.0.0.1:{port}", "--status-file", str(tmp_path / "s")],
            env=CLEAN_ENV, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 1
    assert "Address already in use; something else listens there" in done.stdout + done.stderr


def test_the_init_cli_and_the_endpoint_agree(
    tmp_path: Path, endpoint: Callable[..., Endpoint]
) -> None:
    """The endpoint answers what `sharelatex-init status --check` answers, word for word."""
    path = tmp_path / "status.json"
    write(path, document(os.getpid(), engine={"mode": "sibling", "ready": False}))
    server = endpoint(path)
    for what in ("healthy", "ready"):
        cli = subprocess.run(
            [*INIT, "status", "--status-file", str(path), "--check", what],
            env=CLEAN_ENV, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        code, _, body = server.get("/healthz" if what == "healthy" else "/readyz")
        assert body.decode() == cli.stdout
        assert (code == 200) == (cli.returncode == 0)
