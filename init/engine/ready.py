"""The engine readiness check: a child of PID 1 that waits for an engine to answer, and reports.

`python -m init.engine.ready --socket S --result F --deadline SECONDS [--sweep]` waits until the
engine answers `/_ping` (or the deadline passes), reads its storage driver and version, removes
the compile containers an earlier run left when asked to (`--sweep`: only right after the engine
itself (re)started; a check asked for by `doctor` never sweeps, a compile may be running), and
writes a `ReadyResult` to F. Exit 0 ready, 1 not ready. `ReadyRequest` and `ReadyResult` are the
contract: PID 1 (init.engine.dind) writes the one and reads the other with the same classes.
Importing this module is cheap; the Docker SDK loads only when `check` runs.

`--self-test [--containerd SOCKET] [--image IMAGE]` asks instead whether the engine works now,
within the deadline: it answers `/_ping` within `PING_TIMEOUT`, its containerd accepts on its
socket, and a container of IMAGE runs to its end (create, start, wait, remove: the path a
compile takes through dockerd, containerd and runc). An engine that answers its ping but cannot
run a container (containerd killed or hung) is found this way (init.engine.dind runs it). It
touches no container but its own, by its own name and label; it uses the light client (no SDK:
60 ms of CPU a run, not 200).

`ping` is the probes' own question (`status --check ready`, `/readyz`): one `/_ping` over a
plain socket, bounded, asked at the moment the probe runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: PID 1 imports this
if TYPE_CHECKING:
    from typing import Any

MODULE = "init.engine.ready"
PING_TIMEOUT = 2.0  # how long a probe waits for /_ping: a hung engine is not ready after this
SELF_TEST_LABEL = "sharelatex-init.self-test"
SELF_TEST_NAME = "sharelatex-init-self-test"
# A command every compile image has (TeX Live images are Debian or Alpine; busybox in tests).
SELF_TEST_COMMAND = ("/bin/sh", "-c", "exit 0")


@dataclass(frozen=True)
class ReadyRequest:
    """What to check, as PID 1 (or `doctor`) asks it."""

    socket: Path
    result: Path
    deadline: float = 60.0  # seconds for the engine to answer (a self-test: all of it)
    sweep: bool = False  # remove leftover compile containers once it answers
    self_test: bool = False  # ask whether it works now (no waiting, no sweep)
    image: str = ""  # self-test: the image to run a container of ("": none)
    containerd: Path | None = None  # self-test: containerd's socket, to see that it accepts
    runtime: str = ""  # self-test: the OCI runtime the container runs under ("": the default)

    def argv(self) -> tuple[str, ...]:
        sweep = ("--sweep",) if self.sweep else ()
        self_test = ("--self-test",) if self.self_test else ()
        image = ("--image", self.image) if self.image else ()
        containerd = ("--containerd", str(self.containerd)) if self.containerd else ()
        runtime = ("--runtime", self.runtime) if self.runtime else ()
        return (
            "--socket", str(self.socket), "--result", str(self.result),
            "--deadline", f"{self.deadline:g}", *sweep, *self_test, *image, *containerd,
            *runtime,
        )  # fmt: skip

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> ReadyRequest:
        import argparse

        parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
        parser.add_argument("--socket", type=Path, required=True)
        parser.add_argument("--result", type=Path, required=True)
        parser.add_argument("--deadline", type=float, default=60.0)
        parser.add_argument("--sweep", action="store_true")
        parser.add_argument("--self-test", action="store_true")
        parser.add_argument("--image", default="")
        parser.add_argument("--containerd", type=Path)
        parser.add_argument("--runtime", default="")
        args = parser.parse_args(list(argv))
        if args.self_test and args.sweep:
            parser.error("a self-test never sweeps: a compile may be running")
        return cls(
            args.socket, args.result, args.deadline, args.sweep, args.self_test, args.image,
            args.containerd, args.runtime,
        )  # fmt: skip


@dataclass(frozen=True)
class ReadyResult:
    """What the check found; `ready` False carries `error`."""

    ready: bool
    error: str = ""
    seconds: float = 0.0
    driver: str = ""
    server_version: str = ""
    api_version: str = ""
    swept: tuple[str, ...] = ()  # short ids of the compile containers removed

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready, "error": self.error, "seconds": self.seconds,
            "driver": self.driver, "server_version": self.server_version,
            "api_version": self.api_version, "swept": list(self.swept),
        }  # fmt: skip

    @classmethod
    def from_json(cls, document: object) -> ReadyResult:
        """The result a check wrote; a document of any other shape is a not-ready result
        saying so (a child that crashed half-way, a file from elsewhere)."""
        if not isinstance(document, dict) or not isinstance(document.get("ready"), bool):
            return cls(False, f"the readiness check wrote no result ({str(document)[:80]})")
        swept = document.get("swept") or []
        return cls(
            ready=document["ready"],
            error=str(document.get("error") or ""),
            seconds=float(document.get("seconds") or 0.0),
            driver=str(document.get("driver") or ""),
            server_version=str(document.get("server_version") or ""),
            api_version=str(document.get("api_version") or ""),
            swept=tuple(str(s) for s in swept) if isinstance(swept, list) else (),
        )

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> ReadyResult:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            return cls(False, f"cannot read the readiness check's result {path}: {e}")


def check(request: ReadyRequest) -> ReadyResult:
    """Wait for the engine, read what matters, sweep if asked."""
    from init.engine.client import wait_ready
    from init.errors import EngineError

    try:
        engine, seconds = wait_ready(f"unix://{request.socket}", request.deadline)
    except EngineError as e:
        return ReadyResult(False, f"no answer on {request.socket} in {request.deadline:g} s: {e}")
    try:
        info = engine.info()
        swept = tuple(engine.sweep()) if request.sweep else ()
    except EngineError as e:
        return ReadyResult(False, f"the engine on {request.socket} answered, then failed: {e}")
    finally:
        engine.close()
    return ReadyResult(
        ready=True,
        seconds=round(seconds, 3),
        driver=info.driver,
        server_version=info.server_version,
        api_version=info.api_version,
        swept=swept,
    )


def ping(socket: Path, timeout: float = PING_TIMEOUT) -> str:
    """ "" when the engine on the unix socket `socket` answers `/_ping` within `timeout` seconds
    (connect and answer together), else what it did instead, to follow "the engine ...". A plain
    socket and the light client's HTTP: a probe asks on every run, the SDK would cost 150 ms.
    PermissionError when this user may not use the socket (it cannot tell)."""
    import socket as sockets
    import time

    from init.engine.client import request

    deadline = time.monotonic() + timeout
    try:
        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM | sockets.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket))
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            response = request(sock, "GET", "/_ping")
            body = response.body()
    except TimeoutError:
        return f"does not answer /_ping within {timeout:g} s (hung or stopped?)"
    except PermissionError:
        raise
    except (FileNotFoundError, ConnectionRefusedError):
        return f"does not listen on {socket} (not running?)"
    except OSError as e:
        return f"cannot be asked on {socket}: {e.strerror or e}"
    if response.status != 200:
        return f"answers /_ping with {response.status}: {body[:80].decode(errors='replace')}"
    return ""


def self_test(request: ReadyRequest) -> ReadyResult:
    """Whether the engine works now: its ping within PING_TIMEOUT, its containerd accepting on
    its socket, then a container of `request.image` run to its end, all within
    `request.deadline`."""
    import time

    started = time.monotonic()
    why = ping(request.socket, min(PING_TIMEOUT, request.deadline))
    if why:
        return ReadyResult(False, f"the engine {why}")
    if request.containerd is not None:
        from init.engine.client import connect_error

        code = connect_error(request.containerd, min(PING_TIMEOUT, request.deadline))
        if code is not None:
            return ReadyResult(
                False,
                "the engine answers its ping but its containerd does not accept connections "
                f"on {request.containerd} ({os.strerror(code)})",
            )
    if not request.image:
        return ReadyResult(True, seconds=round(time.monotonic() - started, 3))
    why = run_one(request.socket, request.image, started + request.deadline, request.runtime)
    seconds = round(time.monotonic() - started, 3)
    if why:
        return ReadyResult(False, f"the engine answers its ping but {why}", seconds)
    return ReadyResult(True, seconds=seconds)


def run_one(socket: Path, image: str, deadline: float, runtime: str = "") -> str:
    """Create, start, wait for and remove one container of `image` that exits 0 at once, by
    the deadline (monotonic), under `runtime` (the compiles' own: a runsc that cannot start a
    sandbox fails here); "" when it did, else why not ("cannot run a container: ...").
    An image not there (yet) is not the engine's fault: "" too."""
    import time

    from init.engine.client import API_VERSION, ApiError, connector, request

    connect = connector(f"unix://{socket}", {})

    def call(method: str, path: str, body: Any = None, query: str = "") -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        with connect(remaining) as sock:
            target = f"/v{API_VERSION}{path}" + (f"?{query}" if query else "")
            response = request(sock, method, target, body)
            raw = response.body()
        if response.status >= 400:
            try:
                message = str(json.loads(raw).get("message", ""))
            except ValueError:
                message = raw.decode(errors="replace")
            raise ApiError(response.status, message)
        return json.loads(raw) if raw else None

    def remove() -> None:
        try:
            call("DELETE", f"/containers/{SELF_TEST_NAME}", query="force=1&v=1")
        except ApiError as e:
            if e.status not in (404, 409):
                raise

    body = {
        "Image": image, "Entrypoint": list(SELF_TEST_COMMAND[:1]),
        "Cmd": list(SELF_TEST_COMMAND[1:]), "Labels": {SELF_TEST_LABEL: "1"},
        "NetworkDisabled": True,
        "HostConfig": {"NetworkMode": "none", **({"Runtime": runtime} if runtime else {})},
    }  # fmt: skip
    step = "create"
    try:
        remove()  # our own, left by a self-test cut short; no other container is touched
        try:
            call("POST", "/containers/create", body, f"name={SELF_TEST_NAME}")
        except ApiError as e:
            if e.status == 404 and "image" in e.message.lower():
                return ""  # the installer has not put it there yet: readiness says so
            raise
        try:
            step = "start"
            call("POST", f"/containers/{SELF_TEST_NAME}/start")
            step = "wait for"
            ended = call("POST", f"/containers/{SELF_TEST_NAME}/wait")
        finally:
            try:
                remove()
            except (OSError, ApiError):
                pass  # the next self-test removes it first, by its name
    except TimeoutError:
        return f"cannot run a container: no answer to the {step} in time"
    except ApiError as e:
        return f"cannot run a container ({step}: {e.message})"
    except OSError as e:
        return f"cannot run a container ({step}: {e.strerror or e})"
    status = (ended or {}).get("StatusCode")
    if status != 0:
        return f"cannot run a container: a container that exits 0 ended with {status}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    request = ReadyRequest.from_argv(sys.argv[1:] if argv is None else argv)
    if request.self_test:
        # Bounded whatever the engine does: a hung engine must not leave a self-test hanging
        # (SIGALRM's default action ends the process; PID 1 reads "no result").
        import signal

        signal.alarm(int(request.deadline) + 2)
        result = self_test(request)
    else:
        result = check(request)
    result.write(request.result)
    return 0 if result.ready else 1


if __name__ == "__main__":
    sys.exit(main())
