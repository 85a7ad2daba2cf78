"""The compile API: POST a .tex file or a tar of a project, get the PDF or a JSON error.

`python -m init.compiles.api --listen ADDR` (the `compile-api` service) puts each upload in a
fresh project dir of its own under the compiles root, asks the compile broker (init.broker) on
its socket, from this process, for what `sharelatex-init compile DIR --project ID --json` does
(the sandbox, its limits and its queue are the broker's), answers with what it said, and
removes the dir. Used by the demo and by operators checking a site:

    curl --data-binary @main.tex -H 'Content-Type: text/x-tex' \\
         -o out.pdf http://127.0.0.1:8090/compile
    tar -C project -cz . | curl --data-binary @- -H 'Content-Type: application/x-tar' \\
         'http://127.0.0.1:8090/compile?main=paper.tex&engine=xelatex&timeout=120'

Answers:
  200 application/pdf   the compile made a PDF (exit 0), streamed from disk
  400                   a bad query parameter; a broken or unsafe archive (an absolute path,
                        `..`, a link out, a device, a sparse file, xz); a body that ended
                        before its Content-Length; a Content-Length that is not one number
  403                   keep=1 when the service was not started with --allow-keep
  411, 413              no Content-Length (or chunked); too big: the upload, the archive's
                        files or its headers (reason upload_size, extracted_size, members,
                        archive_header)
  431                   request headers over 64 KiB
  413                   the document hit a sandbox limit (exit 2: timeout, memory, processes,
                        output size; the reason says which). 413, not 408 or 429, which
                        clients may retry by themselves: the same document hits the same limit
  415                   neither a .tex nor a tar
  422                   a LaTeX error (exit 1): the first error lines and the log's tail
  429 + Retry-After     more uploads at once than --max-pending (counted once a body is in)
  503 + Retry-After     TeX Live is still installing (exit 75): its message, as is; the engine
                        cannot be reached, or no compile broker answers at its socket within
                        10 s (exit 69, status "engine"); the compile was stopped (limit
                        "stopped": this service or the broker stopping);
                        more connections than --max-connections, none of them idle
  507                   the compile dir's disk is full (exit 73): the server's to fix, not the
                        document's; the same compile works once there is room
  500                   anything else (configuration, exit 78; the command failing)

Errors are JSON: {status, reason, message, log_tail, errors, exit_status, project, compile_id}:
status is the compile command's word (latex_error, limit, not_ready, config, engine, no_space) or
this service's (refused, busy); reason the limit that was hit (timeout, memory, processes, output
size), the refusal's (upload_size, unsafe_archive, ...), else the status; message one line for a
person. The engine `latex` answers application/x-dvi.

Hostile clients (init.httpd.server): deadlines on every read and write, a cap on connections
and threads, slots taken only by complete uploads; archives with bounded headers
(init.compiles.archive); a project dir the compile made unwritable still removed.
"""

from __future__ import annotations

import _socket
import argparse
import contextlib
import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any

from init import config
from init.compiles import client
from init.compiles.archive import ArchiveLimits, Refusal, extract, megabytes
from init.compiles.contract import DEFAULT_ENGINE, ENGINES, Limit, Status
from init.compiles.environment import read_environment, with_init_environment
from init.compiles.messages import CommandRequest, Final, MessageError, Stop
from init.compiles.settings import Deadlines, broker_socket
from init.config import COMPILE_API_ADDRESS, COMPILES_DIR
from init.core.log import Log
from init.errors import ConfigError
from init.httpd import server as httpserve
from init.httpd.server import App, BodyError, ConnectionLimits, Request, Response

NAME = "compile-api"
DEFAULT_ADDRESS = "127.0.0.1:8090"
# Where the init writes its compile settings (beside the shims, under its status dir).
DEFAULT_ENVIRONMENT = Path("/run/sharelatex-init/shim/environment.json")
TEX_TYPES = ("text/x-tex", "application/x-tex", "text/plain")
TAR_TYPES = (
    "application/x-tar",
    "application/tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-gtar",
    "application/tar+gzip",
)
_MAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*\.tex$")
LOG_TAIL_LINES = 40
RETRY_AFTER_NOT_READY = 30  # seconds: a TeX Live install moves in minutes, not seconds
RETRY_AFTER_BUSY = 5
RETRY_AFTER_ENGINE = 10  # an inner dockerd restarting
CHUNK = 1 << 16
STOP_GRACE = 15.0  # seconds the running compiles get to end their containers on SIGTERM


@dataclass(frozen=True)
class Limits:
    max_upload: int = 50 * 1024 * 1024  # bytes of the request body
    max_extracted: int = 200 * 1024 * 1024  # bytes of the files in an archive
    max_members: int = 5000
    default_timeout: float = 60.0  # seconds, the compile's own (--timeout)
    max_timeout: float = 600.0
    max_pending: int = 16  # uploads being compiled or queued at once (their bodies all in)
    max_header: int = ArchiveLimits.max_header  # one pax header or GNU long name in an archive
    max_headers: int = ArchiveLimits.max_headers

    @property
    def archive(self) -> ArchiveLimits:
        return ArchiveLimits(
            self.max_extracted, self.max_members, self.max_header, self.max_headers
        )


def refused(refusal: Refusal, project: str = "") -> Response:
    """The JSON answer to an upload this service will not compile."""
    return error_response(
        refusal.status, "refused", refusal.reason, refusal.message, project=project
    )


@dataclass(frozen=True)
class Options:
    """What the query asks for, validated."""

    main: str | None  # None: main.tex, or the one .tex at the top of an archive
    engine: str
    timeout: float
    keep: bool


def parse_options(query: Mapping[str, str], limits: Limits, allow_keep: bool = False) -> Options:
    """The query's main, engine, timeout and keep; Refusal(400) naming the one that is wrong,
    403 for keep=1 unless the operator started the service with --allow-keep."""
    unknown = sorted(set(query) - {"main", "engine", "timeout", "keep"})
    if unknown:
        raise Refusal(
            400, "query", f"unknown parameter {unknown[0]!r}; use main, engine, timeout, keep"
        )
    main = query.get("main") or None
    if main is not None and not (
        len(main) <= 255 and _MAIN.match(main) and ".." not in main.split("/")
    ):
        raise Refusal(400, "query", f"main={main!r}: give a relative path to a .tex file, no '..'")
    engine = query.get("engine") or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise Refusal(400, "query", f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    try:
        timeout = float(query.get("timeout") or limits.default_timeout)
    except ValueError:
        timeout = -1.0
    if not 1 <= timeout <= limits.max_timeout:
        raise Refusal(
            400,
            "query",
            f"timeout={query.get('timeout')!r}: give seconds from 1 to {limits.max_timeout:g}",
        )
    keep = query.get("keep", "0")
    if keep not in ("0", "1"):
        raise Refusal(400, "query", f"keep={keep!r}: use 1 to keep the project dir, or 0")
    if keep == "1" and not allow_keep:
        # A kept dir is disk the client keeps: for an operator looking into a compile only.
        raise Refusal(403, "keep", "keep=1 is for operators: the service runs without --allow-keep")
    return Options(main, engine, timeout, keep == "1")


def upload_kind(content_type: str) -> str:
    """`tex` or `tar` from the Content-Type; Refusal(415) for anything else."""
    media = content_type.split(";")[0].strip().lower()
    if media in TEX_TYPES:
        return "tex"
    if media in TAR_TYPES:
        return "tar"
    raise Refusal(
        415,
        "content_type",
        f"Content-Type {media or '(none)'!r}: send text/x-tex for a .tex file or "
        "application/x-tar (gzip too) for a project",
    )


def new_project_id() -> str:
    """24 hex digits: the shape of the site's own project ids (a MongoDB ObjectId)."""
    return secrets.token_hex(12)


# -- archives (init.compiles.archive checks and extracts them) ------------------------------


def find_main(project: Path, asked: str | None) -> str:
    """The main file: the one asked for, else main.tex, else the only .tex at the top."""
    if asked is not None:
        if not (project / asked).is_file():
            raise Refusal(400, "main", f"main={asked!r} is not a file in the project")
        return asked
    if (project / "main.tex").is_file():
        return "main.tex"
    top = sorted(p.name for p in project.glob("*.tex") if p.is_file())
    if len(top) == 1:
        return top[0]
    raise Refusal(
        400,
        "main",
        "no main.tex and "
        + (f"{len(top)} .tex files at the top" if top else "no .tex file at the top")
        + ": say which with ?main=FILE.tex",
    )


# -- answers from the compile command --------------------------------------------------------


def error_response(
    status: int,
    outcome: str,
    reason: str,
    message: str,
    *,
    log_tail: str = "",
    exit_status: int | None = None,
    project: str = "",
    retry_after: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    document: dict[str, Any] = {
        **(extra or {}),
        "status": outcome,
        "reason": reason,
        "message": message,
        "log_tail": log_tail,
        "exit_status": exit_status,
        "project": project,
    }
    headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
    return Response.json(status, document, headers=headers)


@dataclass(frozen=True)
class Outcome:
    """How the compile command ended: its exit status, its --json document, its stderr."""

    exit_status: int
    result: Mapping[str, Any] = field(default_factory=dict)
    stderr: str = ""


def status_for(outcome: Outcome) -> tuple[int, int | None]:
    """(HTTP status, Retry-After or None) for a compile that made no PDF."""
    if outcome.result.get("limit") == Limit.STOPPED.value:
        # The runner was stopped (it then dies of the signal), not the document: try later.
        return HTTPStatus.SERVICE_UNAVAILABLE, RETRY_AFTER_BUSY
    if outcome.exit_status == Status.LATEX_ERROR:
        return HTTPStatus.UNPROCESSABLE_ENTITY, None
    if outcome.exit_status == Status.LIMIT:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, None
    if outcome.exit_status == Status.NOT_READY:
        return HTTPStatus.SERVICE_UNAVAILABLE, RETRY_AFTER_NOT_READY
    if outcome.exit_status == Status.ENGINE:
        return HTTPStatus.SERVICE_UNAVAILABLE, RETRY_AFTER_ENGINE
    if outcome.exit_status == Status.NO_SPACE:
        return HTTPStatus.INSUFFICIENT_STORAGE, None
    return HTTPStatus.INTERNAL_SERVER_ERROR, None


def status_word(exit_status: int) -> str:
    """The compile command's status word for an exit status, when its JSON gave none."""
    if exit_status == Status.OK:
        return "no_pdf"  # exit 0, and yet no PDF to send
    try:
        return Status(exit_status).word
    except ValueError:
        return "failed"


def failure_response(outcome: Outcome, project: str) -> Response:
    """The JSON error for a compile that made no PDF, from what the command printed: its
    status word, the limit (or the status) as the reason, its own line as the message."""
    result = outcome.result
    code, retry_after = status_for(outcome)
    status = str(result.get("status") or status_word(outcome.exit_status))
    message = str(result.get("reason") or "")
    if not message:
        message = _tail(outcome.stderr, 5) or (
            f"the compile command exited with status {outcome.exit_status} and said nothing"
        )
    errors = result.get("errors")
    return error_response(
        code,
        status,
        str(result.get("limit") or status),
        message,
        log_tail=log_tail(result) or _tail(outcome.stderr, LOG_TAIL_LINES),
        exit_status=outcome.exit_status,
        project=project,
        retry_after=retry_after,
        extra={
            "errors": [str(e) for e in errors] if isinstance(errors, list) else [],
            "compile_id": result.get("compile_id"),
        },
    )


def log_tail(result: Mapping[str, Any]) -> str:
    """The last lines of the compile's log: its "log" is a path to it, or its text."""
    log = result.get("log")
    if not isinstance(log, str) or not log:
        return ""
    if "\n" not in log and log.startswith("/"):
        try:
            with open(log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                return _tail(f.read().decode(errors="replace"), LOG_TAIL_LINES)
        except OSError:
            return ""
    return _tail(log, LOG_TAIL_LINES)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# -- the service -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    """Where projects go, the broker that runs them (its socket, how long to wait for it, the
    environment its requests carry), and the limits."""

    compiles_dir: Path
    broker: Path  # the compile broker's socket (init.compiles.settings.broker_socket)
    environ: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    allow_keep: bool = False  # --allow-keep: clients may ask to keep their project dir
    broker_wait: float = client.DEFAULT_WAIT  # seconds for a broker that is (re)starting


class Compiles:
    """The uploads in flight: their count (for --max-pending), and a stop every compile's
    connection to the broker watches, so that SIGTERM can stop them and wait for their
    answers and cleanup."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.stopping = False
        self.changed = threading.Condition()
        # Readable once the service stops (never drained: every compile sees it).
        self.stopped_fd, self._stop = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def enter(self) -> bool:
        with self.changed:
            if self.stopping or self.active >= self.limit:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self.changed:
            self.active -= 1
            self.changed.notify_all()

    def stop(self, grace: float) -> None:
        """Refuse new uploads, stop every running compile (each asks the broker to stop it, as
        a SIGTERM to the compile command did), and wait up to `grace` for the requests."""
        deadline = time.monotonic() + grace
        with self.changed:
            if not self.stopping:
                self.stopping = True
                os.write(self._stop, b"x")
            while self.active and (left := deadline - time.monotonic()) > 0:
                self.changed.wait(left)


def run_compile(
    service: Service,
    compiles: Compiles,
    project_dir: Path,
    project: str,
    options: Options,
    client_fd: int | None = None,
) -> Outcome:
    """The compile of `project_dir`, asked of the broker over its socket: the Outcome as the
    compile command's process would have given it (its exit status, its JSON, its stderr).
    Past its deadline, when the service stops, or when the HTTP client closes its connection
    (`client_fd`: nobody is left to take the PDF), the broker is asked to stop it (a Stop, as
    the command's client sends on SIGTERM); no answer within STOP_GRACE: the connection is
    closed, which stops it too."""
    request = CommandRequest(
        directory=str(project_dir), main=options.main or "main.tex", engine=options.engine,
        timeout=options.timeout, project=project, json=True, env=dict(service.environ),
    )  # fmt: skip
    path = str(service.broker)
    try:
        sock = client.connect(path, service.broker_wait, compiles.stopped_fd)
    except client.BrokerDown as e:
        return _unavailable(client.down_line(path, e, service.broker_wait), project)
    except KeyboardInterrupt:  # the service stopped while the broker was awaited
        return _stopped(project)
    allowed = Deadlines.from_timeout(options.timeout).command
    try:
        sock.sendall(request.encode())
        return _follow(sock, compiles.stopped_fd, allowed, project, client_fd)
    except OSError as e:
        return _unavailable(f"the compile broker's connection failed: {e.strerror}", project)
    finally:
        sock.close()  # a compile still running is stopped by the broker when it sees this


def _follow(
    sock: _socket.socket, stopped_fd: int, allowed: float, project: str, client_fd: int | None
) -> Outcome:
    answers = client.Answers()
    deadline = time.monotonic() + allowed
    # poll, not select: with many connections open, fd numbers pass select's 1024.
    watched = select.poll()
    watched.register(sock.fileno(), select.POLLIN)
    watched.register(stopped_fd, select.POLLIN)
    if client_fd is not None:
        # Only its end: a request the client pipelined behind this one is no reason to stop.
        watched.register(client_fd, select.POLLRDHUP)
    stopping = False  # a Stop was sent
    stuck: dict[str, Any] = {}

    def stop(why: dict[str, Any]) -> None:
        nonlocal stopping, deadline
        if stopping:
            return
        stuck.update(why)
        sock.sendall(Stop(signal.SIGTERM).encode())
        stopping = True
        deadline = time.monotonic() + STOP_GRACE

    while True:
        left = deadline - time.monotonic()
        if left <= 0 and stopping:  # no answer to the Stop: the broker stops it on the close
            return Outcome(-signal.SIGKILL, stuck or _stopped(project).result)
        if left <= 0:
            stop({
                "status": "stuck",
                "reason": f"the compile command did not end within {allowed:g} s "
                "(its timeout and the time it may queue); it was stopped",
            })  # fmt: skip
            continue
        ready = {fd for fd, _ in watched.poll(left * 1000)}
        if sock.fileno() in ready:  # first: an answer that came with the client's end stands
            data = sock.recv(1 << 16)
            if not data:
                return _unavailable("the compile broker ended during the compile; compile "
                                    "again", project)  # fmt: skip
            try:
                messages = answers.feed(data)
            except MessageError as e:
                return _unavailable(f"the compile broker sent {e}", project)
            for message in messages:
                if isinstance(message, Final):
                    return _finished(message, stuck)
        if stopped_fd in ready:
            watched.unregister(stopped_fd)
            stop({})  # the service is stopping: the broker's answer says "stopped"
        if client_fd is not None and client_fd in ready:
            watched.unregister(client_fd)
            stop({"status": "stopped", "reason": "the client closed its connection"})


def _finished(final: Final, stuck: Mapping[str, Any]) -> Outcome:
    """The Outcome of the broker's Final: what the command's process would have exited with
    (killed by its signal: minus it, as Popen says) and printed."""
    exit_status = -final.signal if final.signal else final.status
    return Outcome(exit_status, dict(stuck) or _last_json(final.stdout), final.stderr)


def _unavailable(line: str, project: str) -> Outcome:
    """No broker to compile with: the command's own answer (exit 69, status engine)."""
    document = {"status": Status.ENGINE.word, "exit_status": int(Status.ENGINE),
                "reason": line, "project": project}  # fmt: skip
    return Outcome(int(Status.ENGINE), document)


def _stopped(project: str) -> Outcome:
    document = {"status": Status.LIMIT.word, "limit": Limit.STOPPED.value, "project": project,
                "reason": "the compile API is stopping; try again shortly"}  # fmt: skip
    return Outcome(-signal.SIGTERM, document)


def _last_json(stdout: str) -> dict[str, Any]:
    """The --json document: the last line of stdout that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict):
            return document
    try:  # printed with indentation
        whole = json.loads(stdout)
    except ValueError:
        return {}
    return whole if isinstance(whole, dict) else {}


def check_length(request: Request, limits: Limits) -> int:
    """The upload's Content-Length; Refusal when it is missing or too big."""
    length = request.content_length
    if length is None:
        raise Refusal(411, "length", "send the body with a Content-Length")
    if length > limits.max_upload:
        raise Refusal(413, "upload_size", f"the upload is over {megabytes(limits.max_upload)}")
    return length


def receive(request: Request, sink: IO[bytes], limits: Limits) -> None:
    """Copy the request body into `sink`; Refusal when it is missing, too big or short (the
    client closed or stalled before its Content-Length: never compiled as if whole)."""
    check_length(request, limits)
    try:
        while chunk := request.body.read(CHUNK):
            sink.write(chunk)
        sink.flush()
    except BodyError as e:
        raise Refusal(400, "length", str(e)) from e
    except OSError as e:  # the compiles root's disk full
        raise Refusal(507, "disk", f"cannot store the upload: {e.strerror}") from e


def handle_compile(service: Service, compiles: Compiles, log: Log, request: Request) -> Response:
    """POST /compile: the PDF, or the JSON error.

    The body is spooled whole (to an unnamed file in the compiles root: not /tmp, which may be
    memory) before a slot of --max-pending is taken, so clients that stall their uploads hold
    connections, never the slots of those whose uploads are in."""
    try:
        options = parse_options(request.query, service.limits, service.allow_keep)
        kind = upload_kind(request.headers.get("content-type", ""))
        check_length(request, service.limits)
    except Refusal as e:
        return refused(e)
    with contextlib.ExitStack() as stack:
        try:
            spool = stack.enter_context(tempfile.TemporaryFile(dir=service.compiles_dir))
        except OSError as e:
            return _no_compiles_dir(service, log, e)
        try:
            receive(request, spool, service.limits)
        except Refusal as e:
            return refused(e)
        spool.seek(0)
        if not compiles.enter():
            if compiles.stopping:
                return error_response(
                    503,
                    "busy",
                    Limit.STOPPED.value,
                    "the compile API is stopping; try again shortly",
                    retry_after=RETRY_AFTER_BUSY,
                )
            return error_response(
                429,
                "busy",
                "pending",
                f"{compiles.limit} uploads are being compiled already; try again shortly",
                retry_after=RETRY_AFTER_BUSY,
            )
        try:
            return _compile_spooled(
                service, compiles, log, spool, options, kind, request.connection
            )
        finally:
            compiles.leave()


def _no_compiles_dir(service: Service, log: Log, e: OSError) -> Response:
    log.error(NAME, f"cannot write in {service.compiles_dir}: {e.strerror}")
    return error_response(
        500,
        "error",
        "compiles_dir",
        f"cannot make a project dir in {service.compiles_dir}: {e.strerror}; "
        f"check {COMPILES_DIR} and that the dir is writable by this service",
    )


def _compile_spooled(
    service: Service,
    compiles: Compiles,
    log: Log,
    spool: IO[bytes],
    options: Options,
    kind: str,
    client_fd: int | None = None,
) -> Response:
    project = new_project_id()
    project_dir = service.compiles_dir / project
    try:
        project_dir.mkdir(mode=0o755)
    except OSError as e:
        return _no_compiles_dir(service, log, e)
    try:
        return _compile_upload(
            service, compiles, spool, project_dir, project, options, kind, client_fd
        )
    finally:
        if not options.keep:
            remove_project_dir(service.compiles_dir, project_dir, log)


def _compile_upload(
    service: Service,
    compiles: Compiles,
    spool: IO[bytes],
    project_dir: Path,
    project: str,
    options: Options,
    kind: str,
    client_fd: int | None = None,
) -> Response:
    try:
        if kind == "tex":
            main = options.main or "main.tex"
            (project_dir / main).parent.mkdir(parents=True, exist_ok=True)
            with open(project_dir / main, "wb") as f:
                shutil.copyfileobj(spool, f, CHUNK)
        else:
            extract(spool, project_dir, service.limits.archive)
            main = find_main(project_dir, options.main)
    except Refusal as e:
        return refused(e, project)
    started = time.monotonic()
    outcome = run_compile(
        service, compiles, project_dir, project, _with_main(options, main), client_fd
    )
    if outcome.exit_status != Status.OK:
        return failure_response(outcome, project)
    pdf = _pdf_path(outcome.result, project_dir, main)
    try:
        # Opened now, sent after the dir is gone: the open file keeps its data, and the answer
        # streams from disk (never the whole PDF in memory for a client that reads slowly).
        opened = open_output(pdf, project_dir)
    except OSError as e:
        return failure_response(
            Outcome(int(Status.OK), {"reason": f"exit 0 but no PDF at {pdf}: {e.strerror}"}),
            project,
        )
    seconds = outcome.result.get("seconds") or time.monotonic() - started
    return Response(
        200,
        content_type="application/x-dvi" if pdf.suffix == ".dvi" else "application/pdf",
        headers=(
            ("X-Compile-Project", project),
            ("X-Compile-Seconds", f"{float(seconds):.3f}"),
        ),
        file=opened,
    )


def open_output(path: Path, project_dir: Path) -> IO[bytes]:
    """The compile's output file, opened for reading: a regular file in the project dir, never
    through a link the compile left there (it would name any file this service can read)."""
    if path.parent != project_dir:
        raise OSError(errno.EPERM, "not in the project dir")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _with_main(options: Options, main: str) -> Options:
    return Options(main, options.engine, options.timeout, options.keep)


def _pdf_path(result: Mapping[str, Any], project_dir: Path, main: str) -> Path:
    pdf = result.get("pdf")
    if isinstance(pdf, str) and pdf:
        return Path(pdf) if Path(pdf).is_absolute() else project_dir / pdf
    return project_dir / "output.pdf"


def remove_project_dir(compiles_dir: Path, project_dir: Path, log: Log) -> None:
    """Remove a project dir this service made, and nothing else: it must be a direct child of
    the compiles root and not a link (rmtree does not follow the links inside). Dirs the
    compile made unwritable (mode 0555, 0000) are opened up first, never through a link."""
    if project_dir.parent != compiles_dir or project_dir.is_symlink():
        log.error(NAME, f"not removing {project_dir}: not a project dir of {compiles_dir}")
        return
    try:
        unlock_tree(project_dir)
    except OSError as e:
        log.debug(NAME, f"opening up {project_dir}: {e}")
    try:
        shutil.rmtree(project_dir)
    except OSError as e:
        log.error(NAME, f"cannot remove {project_dir}: {e}")


def unlock_tree(top: Path) -> None:
    """Give every dir under `top` (itself too) mode 0700, so that its entries can be removed.

    Each dir is opened with O_PATH and O_NOFOLLOW relative to its parent's fd and changed
    through /proc/self/fd: a link, wherever it points, is never followed, and a dir without
    read permission is reached all the same."""
    fd = os.open(top, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _unlock(fd)
    finally:
        os.close(fd)


def _unlock(fd: int) -> None:
    path = f"/proc/self/fd/{fd}"
    os.chmod(path, 0o700)
    with os.scandir(path) as entries:
        names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            child = os.open(
                name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd
            )
        except OSError:
            continue  # gone, or no longer a dir
        try:
            _unlock(child)
        finally:
            os.close(child)


def app(service: Service, compiles: Compiles, log: Log) -> App:
    def healthz(request: Request) -> Response:
        return Response.text(200, f"compile-api: up, {compiles.active} compiling")

    def compile_(request: Request) -> Response:
        return handle_compile(service, compiles, log, request)

    return App(NAME, {"/healthz": {"GET": healthz}, "/compile": {"POST": compile_}}, log)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The service."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m init.compiles.api",
        description="POST /compile a .tex file or a tar of a project; get the PDF or a JSON error.",
    )
    parser.add_argument(
        "--listen",
        help=f"HOST:PORT or [IPv6]:PORT (default ${COMPILE_API_ADDRESS}, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--compiles-dir",
        type=Path,
        help=f"where project dirs go (${COMPILES_DIR}, else the image's data dir's)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=Limits.max_upload / 2**20)
    parser.add_argument("--max-extracted-mb", type=float, default=Limits.max_extracted / 2**20)
    parser.add_argument("--max-members", type=int, default=Limits.max_members)
    parser.add_argument("--max-timeout", type=float, default=Limits.max_timeout)
    parser.add_argument("--max-pending", type=int, default=Limits.max_pending)
    parser.add_argument(
        "--max-connections",
        type=int,
        default=ConnectionLimits.max_connections,
        help="open connections at once, each with its thread (default %(default)s)",
    )
    parser.add_argument(
        "--allow-keep",
        action="store_true",
        help="let clients ask to keep their project dir (keep=1): for an operator's debugging",
    )
    parser.add_argument(
        "--environment",
        type=Path,
        default=DEFAULT_ENVIRONMENT,
        help="the init's compile settings (its own variables do not reach the services)",
    )
    options = parser.parse_args(argv)
    log = Log()
    env = with_init_environment(env, read_environment(options.environment))
    if options.listen is not None:
        text, source = options.listen, "--listen"
    elif env.get(COMPILE_API_ADDRESS, "").strip():
        text, source = env[COMPILE_API_ADDRESS], COMPILE_API_ADDRESS
    else:
        text, source = DEFAULT_ADDRESS, "--listen"
    try:
        compiles_dir = options.compiles_dir or config.load(env).compiles_dir
    except ConfigError as e:
        for problem in e.problems:
            log.error(NAME, problem)
        return e.exit_status
    limits = Limits(
        max_upload=int(options.max_upload_mb * 2**20),
        max_extracted=int(options.max_extracted_mb * 2**20),
        max_members=options.max_members,
        default_timeout=min(Limits.default_timeout, options.max_timeout),
        max_timeout=options.max_timeout,
        max_pending=options.max_pending,
    )
    service = Service(
        compiles_dir.absolute(),
        broker_socket(env),
        environ=env,
        limits=limits,
        allow_keep=options.allow_keep,
    )
    compiles = Compiles(limits.max_pending)
    served = app(service, compiles, log)
    connections = ConnectionLimits(max_connections=max(1, options.max_connections))
    return httpserve.run(
        served,
        lambda: httpserve.listen(served, text, source, connections),
        on_stop=lambda: compiles.stop(STOP_GRACE + 5),
    )


if __name__ == "__main__":
    sys.exit(main())
