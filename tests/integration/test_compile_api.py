"""The compile API for real: `python -m init.compiles.api` as www-data (as its run script starts
it) on a loopback port, a client of the real compile broker (init.broker, the harness's: one per
site environment) against a private dockerd holding the TeX Live image that scripts/build-images
makes.

Each test posts what an operator would (curl --data-binary) and checks the answer, that the
project dir is gone afterwards and that no compile container is left behind.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import PYTHON, REPO, free_port, require, wait_for
from tests.integration.texlive_engine import WWW_DATA, Compiles, compiles, texlive  # noqa: F401

pytestmark = pytest.mark.root
RUN_SCRIPT = REPO / "rootfs" / "etc" / "service" / "compile-api" / "run"
AS_WWW_DATA = ("setpriv", "--reuid=www-data", "--regid=www-data", "--init-groups")
DOCUMENT = rb"""\documentclass{article}
\begin{document}
Compiled through the API: $e^{i\pi} + 1 = 0$.
\end{document}
"""


def www_data_python() -> tuple[str, dict[str, str]]:
    """A Python www-data can run, with this venv's packages: the venv's own when every dir up to
    its interpreter is open to others (the image's /opt/sharelatex-init), else the system's of
    the same version (a venv whose base Python is under /root)."""
    real = Path(os.path.realpath(PYTHON))
    if all(p.stat().st_mode & stat.S_IXOTH for p in real.parents) and os.access(real, os.X_OK):
        return PYTHON, {}
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    require(system.exists(), f"www-data cannot run {real} and there is no {system}")
    return str(system), {"PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}"}


@dataclass
class Api:
    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log_path: Path

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "",
        timeout: float = 180,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def post(
        self, body: bytes, content_type: str, query: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", f"/compile{query}", body, content_type)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def site(compiles: Compiles) -> Path:  # noqa: F811
    """A compiles root, a run dir and a status file of the services' user, as in the image."""
    os.chmod(compiles.engine.base, 0o755)  # mkdtemp's 0700: www-data must reach the socket
    base = compiles.engine.base / "api"
    (base / "compiles").mkdir(parents=True)
    for directory in (base, base / "compiles"):
        os.chown(directory, WWW_DATA, WWW_DATA)
    return base


def start_api(
    compiles: Compiles,  # noqa: F811
    site: Path,
    name: str,
    broker: bool = True,
    **env: str,
) -> Api:
    """The service as www-data; with a broker for its environment (`broker`), else none."""
    port = free_port()
    log_path = site.parent / f"{name}.log"
    python, python_env = www_data_python()
    environment = (compiles.env if broker else compiles.site_env)(
        OVERLEAF_INIT_COMPILES_DIR=str(site / "compiles"),
        OVERLEAF_INIT_STATUS_FILE=str(site / "status.json"),
        HOME="/var/www",
        **python_env,
        **env,
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*AS_WWW_DATA, python, "-m", "init.compiles.api", "--listen", f"127.0.0.1:{port}",
             "--max-timeout", "60"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment,
            cwd=REPO, start_new_session=True,
        )  # fmt: skip
    api = Api(proc, port, site / "compiles", log_path)
    wait_for(lambda: "listening on" in api.log() or proc.poll() is not None, 20, "the API")
    assert proc.poll() is None, api.log()
    return api


def stop(api: Api) -> None:
    if api.proc.poll() is None:
        api.proc.send_signal(signal.SIGTERM)
        try:
            api.proc.wait(40)
        except subprocess.TimeoutExpired:
            api.proc.kill()
            api.proc.wait(10)


@pytest.fixture(scope="module")
def api(compiles: Compiles, site: Path) -> Iterator[Api]:  # noqa: F811
    running = start_api(compiles, site, "api")
    yield running
    stop(running)


@pytest.fixture
def clean(api: Api, compiles: Compiles) -> Iterator[None]:  # noqa: F811
    """After each test: no project dir and no compile container left."""
    yield
    assert list(api.root.iterdir()) == []
    compiles.wait_no_containers(30)


def tar_gz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def test_a_tex_file_comes_back_as_a_pdf(api: Api, clean: None) -> None:
    assert api.request("GET", "/healthz")[0] == 200
    began = time.monotonic()
    code, headers, body = api.post(DOCUMENT, "text/x-tex")
    took = time.monotonic() - began
    assert code == 200, body.decode(errors="replace")
    assert headers["Content-Type"] == "application/pdf" and body.startswith(b"%PDF-")
    assert len(headers["X-Compile-Project"]) == 24
    print(f"compile through the API: {took:.2f} s ({headers['X-Compile-Seconds']} s compiling)")


def test_a_project_tar_with_its_main_and_engine(api: Api, clean: None) -> None:
    project = {
        "paper.tex": rb"\documentclass{article}\begin{document}\input{parts/one}\end{document}",
        "parts/one.tex": b"Part one, from a subdir.",
    }
    code, _, body = api.post(
        tar_gz(project), "application/x-tar", "?main=paper.tex&engine=lualatex&timeout=60"
    )
    assert code == 200, body.decode(errors="replace")
    assert body.startswith(b"%PDF-")


def test_a_latex_error_is_422_with_the_first_error_and_the_log(api: Api, clean: None) -> None:
    broken = rb"\documentclass{article}\begin{document}\undefinedmacro\end{document}"
    code, _, body = api.post(broken, "application/x-tex")
    assert code == 422, body.decode(errors="replace")
    error = json.loads(body)
    assert error["status"] == "latex_error" and error["exit_status"] == 1
    assert "Undefined control sequence" in error["message"]
    assert any("Undefined control sequence" in line for line in error["errors"])
    assert "Undefined control sequence" in error["log_tail"]


def test_a_document_that_loops_hits_the_timeout_as_413(api: Api, clean: None) -> None:
    looping = rb"\documentclass{article}\begin{document}\def\x{\x}\x\end{document}"
    began = time.monotonic()
    code, _, body = api.post(looping, "text/x-tex", "?timeout=3")
    took = time.monotonic() - began
    assert code == 413, body.decode(errors="replace")
    error = json.loads(body)
    assert (error["status"], error["reason"], error["exit_status"]) == ("limit", "timeout", 2)
    assert took < 30, f"took {took:.1f} s"


def test_an_archive_that_reaches_out_compiles_nothing(api: Api, compiles: Compiles) -> None:  # noqa: F811
    for upload in (
        tar_gz({"main.tex": DOCUMENT}, links={"secret": "/etc/shadow"}),
        tar_gz({"main.tex": DOCUMENT, "../../escape.tex": b"x"}),
    ):
        code, _, body = api.post(upload, "application/x-tar")
        assert code == 400 and json.loads(body)["reason"] == "unsafe_archive"
    assert list(api.root.iterdir()) == []
    assert compiles.containers() == ""


def test_a_compile_that_locks_its_dir_is_still_cleaned(api: Api, clean: None) -> None:
    """A latexmkrc (Perl, it runs) leaves its project dir and a subdir mode 0555 and another
    0000: www-data's rmtree alone would fail and leave them behind."""
    rc = (
        b'mkdir "locked"; mkdir "sealed"; open(my $f, ">", "locked/f"); close $f;\n'
        b'END { chmod 0555, "locked"; chmod 0000, "sealed"; chmod 0555, "."; }\n'
    )
    code, _, body = api.post(tar_gz({"main.tex": DOCUMENT, "latexmkrc": rc}), "application/x-tar")
    assert code == 200, body.decode(errors="replace")
    assert body.startswith(b"%PDF-")
    # `clean` asserts the compiles root is empty again.


def test_keep_is_not_for_clients_and_a_short_body_compiles_nothing(
    api: Api,
    compiles: Compiles,  # noqa: F811
    clean: None,
) -> None:
    code, _, body = api.post(DOCUMENT, "text/x-tex", "?keep=1")
    assert code == 403 and json.loads(body)["reason"] == "keep"
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(
            b"POST /compile HTTP/1.1\r\nContent-Type: text/x-tex\r\n"
            b"Content-Length: 100000\r\n\r\n" + DOCUMENT[:64]
        )
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert compiles.containers() == ""


def descendants(pid: int) -> list[str]:
    """The command lines of `pid`'s children, and theirs."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            found.append(cmdline.decode(errors="replace").strip())
            found.extend(descendants(int(child)))
    return found


def test_a_compile_starts_no_process_of_the_service(
    api: Api,
    compiles: Compiles,  # noqa: F811
    clean: None,
) -> None:
    """The service asks the broker over its socket: no `init.compiles.command` (nor any other
    process) under it while a compile runs, from the upload to the answer."""
    looping = rb"\documentclass{article}\begin{document}\def\x{\x}\x\end{document}"
    answers: list[tuple[int, dict[str, str], bytes]] = []
    client = threading.Thread(
        target=lambda: answers.append(api.post(looping, "text/x-tex", "?timeout=3"))
    )
    seen: list[str] = []
    client.start()
    while client.is_alive():
        seen.extend(descendants(api.proc.pid))
        time.sleep(0.05)
    client.join()
    assert answers and answers[0][0] == 413, answers  # it did compile (and hit its timeout)
    assert seen == [], seen


def test_a_client_that_goes_away_stops_its_compile(
    api: Api,
    compiles: Compiles,  # noqa: F811
    clean: None,
) -> None:
    """A client that closes its connection mid-compile (curl's ^C): nobody is left to take the
    PDF, so the compile is stopped at once, not run on to its timeout (60 s here), holding a
    compile slot and the project's container."""
    looping = rb"\documentclass{article}\begin{document}\def\x{\x}\x\end{document}"
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(
            b"POST /compile?timeout=60 HTTP/1.1\r\nContent-Type: text/x-tex\r\n"
            + f"Content-Length: {len(looping)}\r\n\r\n".encode()
            + looping
        )
        wait_for(lambda: compiles.containers(), 60, "the compile's container")
        wait_for(lambda: list(api.root.iterdir()), 10, "the project dir")
    closed = time.monotonic()
    wait_for(lambda: not list(api.root.iterdir()), 30, "the project dir's removal")
    took = time.monotonic() - closed
    compiles.wait_no_containers(30)  # a stopped compile's container is retired
    assert took < 10, f"took {took:.1f} s"


def test_no_broker_is_503_naming_its_socket_within_the_wait(
    compiles: Compiles,  # noqa: F811
    site: Path,
) -> None:
    """No broker listening: the client's bounded wait (client.DEFAULT_WAIT, 10 s), then the
    compile command's own answer for it (exit 69, status engine), as a 503 to retry."""
    alone = start_api(compiles, site, "api-no-broker", broker=False)
    try:
        began = time.monotonic()
        code, headers, body = alone.post(DOCUMENT, "text/x-tex")
        took = time.monotonic() - began
    finally:
        stop(alone)
    assert code == 503, body.decode(errors="replace")
    assert headers["Retry-After"] == "10"
    error = json.loads(body)
    assert (error["status"], error["exit_status"]) == ("engine", 69)
    assert f"does not answer at {site / 'broker.sock'}" in error["message"], error["message"]
    assert "Traceback" not in alone.log() and "Traceback" not in body.decode()
    assert 9 < took < 20, f"took {took:.1f} s"
    assert list(alone.root.iterdir()) == []
    assert compiles.containers() == ""


def test_texlive_not_there_yet_is_503_with_retry_after(
    compiles: Compiles,  # noqa: F811
    site: Path,
) -> None:
    missing = start_api(
        compiles, site, "api-not-ready", TEX_LIVE_DOCKER_IMAGE="sharelatex-init/texlive:absent"
    )
    try:
        code, headers, body = missing.post(DOCUMENT, "text/x-tex")
    finally:
        stop(missing)
    assert code == 503, body.decode(errors="replace")
    assert headers["Retry-After"] == "30"
    error = json.loads(body)
    assert error["status"] == "not_ready" and error["exit_status"] == 75
    assert "sharelatex-init/texlive:absent" in error["message"]
    assert list(missing.root.iterdir()) == []


def test_sigterm_during_a_compile_ends_it_and_cleans_up(
    compiles: Compiles,  # noqa: F811
    site: Path,
) -> None:
    api = start_api(compiles, site, "api-stop")
    answers: list[tuple[int, dict[str, str], bytes]] = []
    looping = rb"\documentclass{article}\begin{document}\def\x{\x}\x\end{document}"
    client = threading.Thread(target=lambda: answers.append(api.post(looping, "text/x-tex")))
    client.start()
    wait_for(lambda: compiles.containers(), 60, "the compile's container")
    began = time.monotonic()
    api.proc.send_signal(signal.SIGTERM)
    assert api.proc.wait(40) == 0, api.log()
    took = time.monotonic() - began
    client.join(30)
    assert answers and answers[0][0] == 503, answers
    assert json.loads(answers[0][2])["reason"] == "stopped"
    assert list(api.root.iterdir()) == []
    compiles.wait_no_containers(30)
    assert took < 20, f"took {took:.1f} s"


def test_the_run_script_serves_as_www_data(compiles: Compiles, site: Path) -> None:  # noqa: F811
    port = free_port()
    python, python_env = www_data_python()  # the script runs `python3` from PATH here
    bin_dir = site.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").unlink(missing_ok=True)
    (bin_dir / "python3").symlink_to(python)
    env = compiles.env(
        OVERLEAF_INIT_COMPILE_API_ADDRESS=f"127.0.0.1:{port}",
        OVERLEAF_INIT_COMPILES_DIR=str(site / "compiles"),
        PATH=f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        **python_env,
    )
    log_path = site.parent / "run-script.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(RUN_SCRIPT)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "listening on" in log_path.read_text() or proc.poll() is not None, 20)
        assert proc.poll() is None, log_path.read_text()
        status = Path(f"/proc/{proc.pid}/status").read_text()  # exec'd: the same pid
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(WWW_DATA)] * 4
        assert Api(proc, port, site, log_path).request("GET", "/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
