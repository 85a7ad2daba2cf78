"""The HTTP servers' pure parts: addresses, routing, probe answers, archive safety, the
mapping from the compile command's exit to an HTTP answer, and the compile API's handling of
one request with a stand-in compile command (the real one: tests/integration)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import tarfile
import threading
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from init.compiles import api as compile_api
from init.compiles import archive
from init.compiles.api import Limits, Options, Outcome, Refusal
from init.compiles.archive import ArchiveLimits
from init.compiles.messages import CommandRequest, Final, Stop, decode_request
from init.config import parse_address
from init.core.log import Log
from init.errors import ConfigError
from init.httpd import server as httpserve
from init.httpd import status as http_status
from init.httpd.server import App, Body, Request, Response

# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8089", ("0.0.0.0", 8089)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        (":8089", ("0.0.0.0", 8089)),
        ("[::1]:8089", ("::1", 8089)),
        ("[::]:65535", ("::", 65535)),
        (" localhost:80 ", ("localhost", 80)),
    ],
)
def test_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("8089", "HOST:PORT"),
        ("::1:8089", "brackets"),
        ("0.0.0.0:http", "not a number"),
        ("0.0.0.0:70000", "not a number"),
        ("0.0.0.0:", "not a number"),
    ],
)
def test_bad_addresses_say_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_address(text)


def test_an_unresolvable_address_is_a_config_error_naming_its_variable() -> None:
    app = App("t", {})
    with pytest.raises(ConfigError) as caught:
        httpserve.listen(app, "no-such-host.invalid:8089", "OVERLEAF_INIT_HTTP_ADDRESS")
    assert caught.value.exit_status == 78
    assert caught.value.problems[0].startswith("OVERLEAF_INIT_HTTP_ADDRESS='no-such-host")
    with pytest.raises(ConfigError, match="brackets"):
        httpserve.listen(app, "::1:8089", "OVERLEAF_INIT_HTTP_ADDRESS")


# -- routing ---------------------------------------------------------------------------------


def request(
    method: str,
    path: str,
    query: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> Request:
    length = None if body is None else len(body)
    return Request(
        method, path, dict(query or {}), dict(headers or {}), Body(io.BytesIO(body or b""), length),
        length,
    )  # fmt: skip


def test_unknown_paths_404_other_methods_405_and_head_is_get() -> None:
    app = App("t", {"/x": {"GET": lambda r: Response.text(200, "hi")}})
    assert app.respond(request("GET", "/x")).body == b"hi\n"
    assert app.respond(request("HEAD", "/x")).status == 200
    assert app.respond(request("GET", "/y")).status == 404
    refused = app.respond(request("POST", "/x", body=b"abc"))
    assert refused.status == 405
    assert ("Allow", "GET, HEAD") in refused.headers


def test_a_failing_route_is_a_500_not_a_dead_server() -> None:
    def broken(r: Request) -> Response:
        raise RuntimeError("boom")

    app = App("t", {"/x": {"GET": broken}}, Log(io.StringIO()))
    answer = app.respond(request("GET", "/x"))
    assert answer.status == 500 and b"boom" in answer.body


def test_a_body_reads_no_further_than_its_length() -> None:
    body = Body(io.BytesIO(b"abcdefNEXT REQUEST"), 6)
    assert body.read(4) == b"abcd"
    assert body.read(100) == b"ef"
    assert body.read(100) == b"" and body.remaining == 0


# -- the status endpoint ----------------------------------------------------------------------


def running(pid: int) -> dict[str, Any]:
    return {"pid": pid, "phase": "running", "services": [{"name": "web", "state": "up"}]}


def write(path: Path, document: dict[str, Any]) -> None:
    """As PID 1 and the installer write their files: whole, in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


def test_probes_read_the_file_each_time_and_answer_200_or_503(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    app = http_status.app(path, Log(io.StringIO()))
    missing = app.respond(request("GET", "/healthz"))
    assert missing.status == 503 and b"is the init running?" in missing.body
    write(path, running(os.getpid()))
    assert app.respond(request("GET", "/healthz")).body == b"healthy: yes: the init is running\n"
    ready = app.respond(request("GET", "/readyz", headers={"accept": "application/json"}))
    assert ready.status == 200 and ready.content_type == "application/json"
    assert json.loads(ready.body) == {"ready": True, "reason": "running (compiles not sandboxed)"}
    write(path, {**running(os.getpid()), "engine": {"mode": "dind", "ready": False}})
    assert app.respond(request("GET", "/readyz")).status == 503
    assert app.respond(request("GET", "/healthz")).status == 200


def test_status_is_the_merged_document_and_a_bad_file_is_503(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write(path, {**running(os.getpid()), "texlive": {"ready": False, "default": "tl"}})
    installer = {"ready": True, "default": "tl", "images": [{"image": "tl", "state": "present"}]}
    write(path.with_name("texlive.json"), installer)
    shown = json.loads(http_status.app(path, Log()).respond(request("GET", "/status")).body)
    (image,) = shown["texlive"]["images"]
    assert (image["image"], image["state"], shown["texlive"]["ready"]) == ("tl", "present", True)
    path.write_text("{not json")
    answer = http_status.app(path, Log()).respond(request("GET", "/status"))
    assert answer.status == 503 and "cannot read" in json.loads(answer.body)["error"]


def test_a_dead_init_is_not_healthy(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write(path, running(2**22 + 1))  # above pid_max's default: never a live pid
    answer = http_status.app(path, Log()).respond(request("GET", "/healthz"))
    assert answer.status == 503 and b"is not running" in answer.body


# -- archives --------------------------------------------------------------------------------


def member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    return info


@pytest.mark.parametrize(
    ("info", "says"),
    [
        (member("/etc/passwd"), "absolute"),
        (member("../escape.tex"), "'..'"),
        (member("a/../../b"), "'..'"),
        (member("up", tarfile.SYMTYPE, "../../etc/shadow"), "points out"),
        (member("abs", tarfile.SYMTYPE, "/etc/shadow"), "points out"),
        (member("hard", tarfile.LNKTYPE, "/etc/shadow"), "points out"),
        (member("hard", tarfile.LNKTYPE, "../x"), "points out"),
        (member("tricky", tarfile.SYMTYPE, "sub/../.."), "points out"),
        (member("dev", tarfile.CHRTYPE), "special"),
        (member("fifo", tarfile.FIFOTYPE), "special"),
    ],
)
def test_unsafe_members_are_named(info: tarfile.TarInfo, says: str) -> None:
    assert says in archive.member_problem(info)


@pytest.mark.parametrize(
    "info",
    [
        member("main.tex", size=10),
        member("./figs/a.png", size=10),
        member("figs", tarfile.DIRTYPE),
        member("alias.tex", tarfile.SYMTYPE, "chapters/one.tex"),
        member("copy.tex", tarfile.LNKTYPE, "main.tex"),
    ],
)
def test_ordinary_members_pass(info: tarfile.TarInfo) -> None:
    assert archive.member_problem(info) == ""


def test_archive_limits_stop_at_the_first_member_past_them() -> None:
    limits = ArchiveLimits(max_members=3, max_extracted=100)
    taken: list[str] = []

    def members(n: int, size: int) -> Any:
        for i in range(n):
            taken.append(f"f{i}")
            yield member(f"f{i}", size=size)

    with pytest.raises(Refusal) as many:
        archive.check_archive(members(1000, 1), limits)
    assert (many.value.status, many.value.reason) == (413, "members")
    assert len(taken) == 4  # not the other 996
    with pytest.raises(Refusal) as big:
        archive.check_archive(members(3, 60), limits)
    assert (big.value.status, big.value.reason) == (413, "extracted_size")
    assert len(archive.check_archive(members(3, 30), limits)) == 3


def tar_bytes(*entries: tuple[tarfile.TarInfo, bytes], gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def test_a_gzipped_project_extracts_with_links_inside_it(tmp_path: Path) -> None:
    data = tar_bytes(
        (member("main.tex"), b"\\input{ch/one}"),
        (member("ch", tarfile.DIRTYPE), b""),
        (member("ch/one.tex"), b"hello"),
        (member("again.tex", tarfile.SYMTYPE, "ch/one.tex"), b""),
        gz=True,
    )
    assert archive.extract(io.BytesIO(data), tmp_path, ArchiveLimits()) == 4
    assert (tmp_path / "again.tex").read_text() == "hello"


@pytest.mark.parametrize(
    "entries",
    [
        [(member("../../outside.tex"), b"x")],
        [(member("link", tarfile.SYMTYPE, "/etc"), b""), (member("link/passwd"), b"x")],
        [(member("/tmp/abs.tex"), b"x")],
    ],
)
def test_an_unsafe_archive_writes_nothing(tmp_path: Path, entries: list[Any]) -> None:
    project = tmp_path / "p"
    project.mkdir()
    with pytest.raises(Refusal) as refused:
        archive.extract(io.BytesIO(tar_bytes(*entries)), project, ArchiveLimits())
    assert (refused.value.status, refused.value.reason) == (400, "unsafe_archive")
    assert list(tmp_path.rglob("*")) == [project]


def test_not_a_tar_is_a_bad_archive(tmp_path: Path) -> None:
    with pytest.raises(Refusal) as refused:
        archive.extract(io.BytesIO(b"\\documentclass{article}" * 40), tmp_path, ArchiveLimits())
    assert (refused.value.status, refused.value.reason) == (400, "bad_archive")


def test_the_main_file_is_asked_for_main_tex_or_the_only_one(tmp_path: Path) -> None:
    (tmp_path / "paper.tex").write_text("x")
    assert compile_api.find_main(tmp_path, None) == "paper.tex"
    (tmp_path / "other.tex").write_text("x")
    with pytest.raises(Refusal, match=r"2 \.tex files.*\?main="):
        compile_api.find_main(tmp_path, None)
    assert compile_api.find_main(tmp_path, "other.tex") == "other.tex"
    (tmp_path / "main.tex").write_text("x")
    assert compile_api.find_main(tmp_path, None) == "main.tex"
    with pytest.raises(Refusal, match="not a file"):
        compile_api.find_main(tmp_path, "gone.tex")


# -- query and content type ------------------------------------------------------------------


def test_query_options_are_bounded() -> None:
    limits = Limits(max_timeout=100)
    assert compile_api.parse_options({}, limits) == Options(None, "pdflatex", 60.0, False)
    given = {"main": "src/paper.tex", "engine": "lualatex", "timeout": "100", "keep": "1"}
    assert compile_api.parse_options(given, limits, allow_keep=True) == Options(
        "src/paper.tex", "lualatex", 100, True
    )
    with pytest.raises(Refusal) as not_allowed:
        compile_api.parse_options(given, limits)
    assert (not_allowed.value.status, not_allowed.value.reason) == (403, "keep")
    for bad in (
        {"timeout": "101"},
        {"timeout": "0"},
        {"timeout": "nan"},
        {"engine": "sh"},
        {"main": "../x.tex"},
        {"main": "/etc/x.tex"},
        {"main": "a.sty"},
        {"keep": "yes"},
        {"image": "x"},
    ):
        with pytest.raises(Refusal) as refused:
            compile_api.parse_options(bad, limits)
        assert refused.value.status == 400, bad


def test_content_types() -> None:
    assert compile_api.upload_kind("text/x-tex; charset=utf-8") == "tex"
    assert compile_api.upload_kind("application/x-tex") == "tex"
    assert compile_api.upload_kind("application/x-tar") == "tar"
    assert compile_api.upload_kind("application/gzip") == "tar"
    with pytest.raises(Refusal) as refused:
        compile_api.upload_kind("application/zip")
    assert refused.value.status == 415


def test_project_ids_are_what_the_runner_accepts() -> None:
    from init.compiles.paths import check_project_id

    ids = {compile_api.new_project_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(check_project_id(i) == i and len(i) == 24 for i in ids)


# -- answers from the compile command's exit ---------------------------------------------------


@pytest.mark.parametrize(
    ("exit_status", "result", "http", "retry_after", "reason"),
    [
        (1, {"status": "latex_error", "reason": "LaTeX error: x"}, 422, None, "latex_error"),
        (2, {"status": "limit", "limit": "timeout", "reason": "t"}, 413, None, "timeout"),
        (2, {"status": "limit", "limit": "memory", "reason": "m"}, 413, None, "memory"),
        (2, {"status": "limit", "limit": "stopped", "reason": "s"}, 503, "5", "stopped"),
        (-15, {"status": "limit", "limit": "stopped", "reason": "s"}, 503, "5", "stopped"),
        (75, {"status": "not_ready", "reason": "X is still installing"}, 503, "30", "not_ready"),
        (69, {"status": "engine", "reason": "cannot reach the engine"}, 503, "10", "engine"),
        (78, {"status": "config", "reason": "X=y is wrong"}, 500, None, "config"),
        (-9, {}, 500, None, "failed"),
    ],
)  # fmt: skip
def test_exit_statuses_map_to_http(
    exit_status: int, result: dict[str, Any], http: int, retry_after: str | None, reason: str
) -> None:
    answer = compile_api.failure_response(Outcome(exit_status, result, "stderr line"), "p1")
    assert answer.status == http
    assert dict(answer.headers).get("Retry-After") == retry_after
    document = json.loads(answer.body)
    assert document["reason"] == reason
    assert document["exit_status"] == exit_status and document["project"] == "p1"
    assert document["message"] == (result.get("reason") or "stderr line")


def test_the_log_tail_is_read_from_the_log_path(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = compile_api.log_tail({"log": str(log)})
    assert tail.splitlines() == [f"line {i}" for i in range(60, 100)]
    assert compile_api.log_tail({"log": None}) == ""


# -- one request through the compile API, with a stand-in for the compile broker --------------


def stand_in(conn: socket.socket, requests: list[CommandRequest]) -> None:
    """Answer one request as the broker would answer the compile command's: its JSON."""
    with conn:
        data = b""
        while b"\n" not in data:
            data += conn.recv(1 << 16) or b"\n"
        line, _, data = data.partition(b"\n")
        request = decode_request(line)
        assert isinstance(request, CommandRequest)
        requests.append(request)
        project_dir = Path(request.directory)
        main = (project_dir / request.main).read_text()
        if "HANG" in main:  # until it is stopped: then as a stopped compile answers
            while b"\n" not in data:  # (it may have come with the request)
                data += conn.recv(4096) or b"\n"
            stop = decode_request(data.partition(b"\n")[0])
            assert isinstance(stop, Stop)
            document = {"status": "limit", "limit": "stopped", "reason": "stopped"}
            conn.sendall(Final(2, json.dumps(document), signal=stop.signal).encode())
            return
        if "FAIL" in main:
            log = project_dir / "output.log"
            log.write_text("! Undefined control sequence.\nl.3 \\FAIL\n")
            document = {
                "status": "latex_error",
                "exit_status": 1,
                "reason": "LaTeX error: x",
                "errors": ["! Undefined control sequence."],
                "log": str(log),
                "pdf": None,
                "limit": None,
                "seconds": 0.1,
                "project": request.project,
            }
            conn.sendall(Final(1, json.dumps(document) + "\n").encode())
            return
        pdf = project_dir / "output.pdf"
        pdf.write_bytes(b"%PDF-1.5 stand-in " + main.encode())
        document = {
            "status": "ok",
            "exit_status": 0,
            "reason": "the PDF is ready",
            "pdf": str(pdf),
            "log": None,
            "seconds": 0.25,
            "errors": [],
            "limit": None,
        }
        conn.sendall(Final(0, json.dumps(document) + "\n").encode())


@pytest.fixture
def requests(tmp_path: Path) -> Iterator[list[CommandRequest]]:
    """The requests the stand-in broker at tmp_path/broker.sock got."""
    got: list[CommandRequest] = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "broker.sock"))
    listener.listen(8)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = listener.accept()[0]
                threading.Thread(target=stand_in, args=(conn, got), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield got
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


@pytest.fixture
def service(tmp_path: Path, requests: list[CommandRequest]) -> compile_api.Service:
    compiles = tmp_path / "compiles"
    compiles.mkdir()
    return compile_api.Service(
        compiles, tmp_path / "broker.sock", {"HOME": "/x"}, Limits(max_upload=16384),
        allow_keep=True,
    )  # fmt: skip


def post(service: compile_api.Service, body: bytes, content_type: str, **query: str) -> Response:
    app = compile_api.app(service, compile_api.Compiles(4), Log(io.StringIO()))
    return app.respond(request("POST", "/compile", query, {"content-type": content_type}, body))


def test_a_tex_upload_gets_the_pdf_and_its_dir_is_removed(service: compile_api.Service) -> None:
    answer = post(service, b"\\documentclass{article}", "text/x-tex", timeout="30")
    assert answer.status == 200 and answer.content_type == "application/pdf"
    assert answer.file is not None and answer.body == b""  # streamed from the open file
    assert answer.length() == len(b"%PDF-1.5 stand-in \\documentclass{article}")
    with answer.file:
        assert answer.file.read() == b"%PDF-1.5 stand-in \\documentclass{article}"
    assert ("X-Compile-Seconds", "0.250") in answer.headers
    assert list(service.compiles_dir.iterdir()) == []


def test_keep_leaves_the_project_and_the_broker_gets_the_options(
    service: compile_api.Service, requests: list[CommandRequest]
) -> None:
    upload = tar_bytes((member("paper.tex"), b"hello"), gz=True)
    answer = post(service, upload, "application/x-tar", keep="1", engine="xelatex")
    assert answer.status == 200
    (project_dir,) = service.compiles_dir.iterdir()
    assert dict(answer.headers)["X-Compile-Project"] == project_dir.name
    assert requests == [
        CommandRequest(str(project_dir), "paper.tex", "xelatex", None, 60.0, project_dir.name,
                       json=True, env={"HOME": "/x"})
    ]  # fmt: skip


def test_no_broker_is_503_engine_naming_its_socket(tmp_path: Path) -> None:
    (tmp_path / "compiles").mkdir()
    service = compile_api.Service(tmp_path / "compiles", tmp_path / "gone.sock", broker_wait=0.3)
    answer = post(service, b"x", "text/x-tex")
    assert answer.status == 503 and dict(answer.headers)["Retry-After"] == "10"
    document = json.loads(answer.body)
    assert (document["status"], document["exit_status"]) == ("engine", 69)
    assert f"does not answer at {tmp_path / 'gone.sock'}" in document["message"]
    assert "waited 0.3 s" in document["message"]
    assert list(service.compiles_dir.iterdir()) == []


def test_the_service_stopping_stops_the_compile_by_a_stop(service: compile_api.Service) -> None:
    compiles = compile_api.Compiles(4)
    app = compile_api.app(service, compiles, Log(io.StringIO()))
    answers: list[Response] = []
    upload = request("POST", "/compile", {}, {"content-type": "text/x-tex"}, b"HANG")
    asking = threading.Thread(target=lambda: answers.append(app.respond(upload)))
    asking.start()
    while not compiles.active:
        time.sleep(0.01)
    compiles.stop(10)
    asking.join(10)
    assert answers and answers[0].status == 503
    document = json.loads(answers[0].body)
    assert (document["reason"], document["exit_status"]) == ("stopped", -15)
    assert list(service.compiles_dir.iterdir()) == []


def test_a_latex_error_is_422_with_the_log_tail(service: compile_api.Service) -> None:
    answer = post(service, b"\\FAIL", "application/x-tex")
    assert answer.status == 422
    document = json.loads(answer.body)
    assert document["status"] == "latex_error"
    assert document["errors"] == ["! Undefined control sequence."]
    assert "l.3 \\FAIL" in document["log_tail"]
    assert list(service.compiles_dir.iterdir()) == []


def test_uploads_over_the_limits_are_refused_before_anything_runs(
    service: compile_api.Service,
) -> None:
    too_big = post(service, b"x" * 20000, "text/x-tex")
    assert too_big.status == 413 and json.loads(too_big.body)["reason"] == "upload_size"
    unsafe = post(service, tar_bytes((member("../x.tex"), b"x")), "application/x-tar")
    assert unsafe.status == 400 and json.loads(unsafe.body)["reason"] == "unsafe_archive"
    assert post(service, b"x", "image/png").status == 415
    assert list(service.compiles_dir.iterdir()) == []


def test_too_many_at_once_is_429_once_the_body_is_in(service: compile_api.Service) -> None:
    compiles = compile_api.Compiles(1)
    assert compiles.enter()
    app = compile_api.app(service, compiles, Log(io.StringIO()))
    upload = request("POST", "/compile", {}, {"content-type": "text/x-tex"}, b"x" * 1000)
    answer = app.respond(upload)
    assert answer.status == 429 and dict(answer.headers)["Retry-After"] == "5"
    assert upload.body.remaining == 0  # read whole before the slot was asked for
    assert list(service.compiles_dir.iterdir()) == []


def test_a_missing_compiles_dir_says_which_variable(tmp_path: Path) -> None:
    service = compile_api.Service(tmp_path / "missing", tmp_path / "broker.sock")
    answer = post(service, b"x", "text/x-tex")
    assert answer.status == 500
    assert "OVERLEAF_INIT_COMPILES_DIR" in json.loads(answer.body)["message"]


def test_a_compile_past_its_deadline_is_stopped_and_answered_as_stuck(
    service: compile_api.Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the request's deadline the broker is sent a Stop (as SIGTERM to the command's
    process was) and its answer taken: 500 "stuck", the exit the signal makes."""
    short = types.SimpleNamespace(command=0.3)
    monkeypatch.setattr(compile_api.Deadlines, "from_timeout", lambda timeout: short)
    began = time.monotonic()
    answer = post(service, b"HANG", "text/x-tex")
    assert time.monotonic() - began < 5
    assert answer.status == 500
    document = json.loads(answer.body)
    assert (document["status"], document["exit_status"]) == ("stuck", -15)
    assert "did not end within 0.3 s" in document["message"]
    assert list(service.compiles_dir.iterdir()) == []


def test_removal_never_leaves_the_compiles_root(tmp_path: Path) -> None:
    root = tmp_path / "compiles"
    outside = tmp_path / "precious"
    outside.mkdir()
    (root / "p").mkdir(parents=True)
    (root / "p" / "link").symlink_to(outside)
    (root / "alias").symlink_to(outside)
    log = io.StringIO()
    compile_api.remove_project_dir(root, root / "alias", Log(log))
    compile_api.remove_project_dir(root, outside, Log(log))
    compile_api.remove_project_dir(root, root / "p", Log(log))
    assert outside.is_dir() and not (root / "p").exists()
    assert log.getvalue().count("not removing") == 2
