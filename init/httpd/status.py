"""The optional HTTP status endpoint: /healthz, /readyz and /status from the init's status file.

PID 1 runs it as a supervised child (`python -m init.httpd.status --listen ADDR --status-file F`)
when OVERLEAF_INIT_HTTP_ADDRESS is set, so a probe or a load balancer can ask over HTTP what
`sharelatex-init status --check healthy|ready` says. Every request reads the file afresh: the
answers are the probes' own (`init.status.check`), never a cached view: a document of an earlier
start of the init is refused, and `/readyz` asks the engine's `/_ping` (2 s at most; the server
is threaded, a hung engine holds up only its own request).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # In its own process: http.server imports http.client, which loads ssl only for an
    # HTTPSConnection this endpoint never makes. Left out, the idle RSS is 4 MiB smaller.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from init import status
from init.config import HTTP_ADDRESS
from init.core.log import Log
from init.httpd import server as httpserve
from init.httpd.server import App, Request, Response

NAME = "http-status"


MODULE = "init.httpd.status"


@dataclass(frozen=True)
class StatusServerRequest:
    """Where to listen and which status file to answer from (PID 1 starts this child with it)."""

    listen: str  # HOST:PORT or [IPv6]:PORT
    status_file: Path

    def argv(self) -> tuple[str, ...]:
        return ("--listen", self.listen, "--status-file", str(self.status_file))


def probe(document: status.Status | None, error: str, what: str) -> tuple[bool, str]:
    """(passes, why) for `what` (healthy or ready), from the status document or the reason it
    could not be read."""
    if document is None:
        return False, error
    return status.check(document, what, status.pid_alive(document.document.pid))


def load(path: Path) -> tuple[status.Status | None, str]:
    """The merged status document, or None and why it cannot be had (the init not running, a
    file it cannot read)."""
    try:
        return status.read_all(path), ""
    except FileNotFoundError:
        return None, f"no status at {path}: is the init running?"
    except (OSError, ValueError) as e:
        return None, f"cannot read {path}: {e}"


def probe_response(passes: bool, why: str, what: str, as_json: bool) -> Response:
    code = HTTPStatus.OK if passes else HTTPStatus.SERVICE_UNAVAILABLE
    if as_json:
        return Response.json(code, {what: passes, "reason": why})
    return Response.text(code, f"{what}: {'yes' if passes else 'no'}: {why}")


def app(status_file: Path, log: Log) -> App:
    def check(what: str) -> httpserve.Handler:
        def handle(request: Request) -> Response:
            document, error = load(status_file)
            passes, why = probe(document, error, what)
            return probe_response(passes, why, what, request.accepts_json())

        return handle

    def show(request: Request) -> Response:
        document, error = load(status_file)
        if document is None:
            return Response.json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": error})
        return Response.json(HTTPStatus.OK, document.to_json())

    return App(
        NAME,
        {
            "/healthz": {"GET": check("healthy")},
            "/readyz": {"GET": check("ready")},
            "/status": {"GET": show},
        },
        log,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m init.httpd.status", description="Serve /healthz, /readyz and /status."
    )
    parser.add_argument(
        "--listen",
        help=f"HOST:PORT or [IPv6]:PORT (default: ${HTTP_ADDRESS})",
    )
    parser.add_argument("--status-file", type=Path, help="where the init writes its status")
    options = parser.parse_args(argv)
    log = Log()
    text, source = options.listen, "--listen"
    if text is None:
        text, source = os.environ.get(HTTP_ADDRESS, ""), HTTP_ADDRESS
    if not text.strip():
        log.error(NAME, f"no address: give --listen HOST:PORT or set {HTTP_ADDRESS}, e.g. :8089")
        return 2
    served = app(status.status_path(os.environ, options.status_file), log)
    return httpserve.run(served, lambda: httpserve.listen(served, text, source))


if __name__ == "__main__":
    sys.exit(main())
