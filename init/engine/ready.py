"""The engine readiness check: a child of PID 1 that waits for an engine to answer, and reports.

`python -m init.engine.ready --socket S --result F --deadline SECONDS [--sweep]` waits until the
engine answers `/_ping` (or the deadline passes), reads its storage driver and version, removes
the compile containers an earlier run left when asked to (`--sweep`: only right after the engine
itself (re)started; a check asked for by `doctor` never sweeps, a compile may be running), and
writes a `ReadyResult` to F. Exit 0 ready, 1 not ready. `ReadyRequest` and `ReadyResult` are the
contract: PID 1 (init.engine.dind) writes the one and reads the other with the same classes.
Importing this module is cheap; the Docker SDK loads only when `check` runs.
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


@dataclass(frozen=True)
class ReadyRequest:
    """What to check, as PID 1 (or `doctor`) asks it."""

    socket: Path
    result: Path
    deadline: float = 60.0  # seconds for the engine to answer
    sweep: bool = False  # remove leftover compile containers once it answers

    def argv(self) -> tuple[str, ...]:
        sweep = ("--sweep",) if self.sweep else ()
        return (
            "--socket", str(self.socket), "--result", str(self.result),
            "--deadline", f"{self.deadline:g}", *sweep,
        )  # fmt: skip

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> ReadyRequest:
        import argparse

        parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
        parser.add_argument("--socket", type=Path, required=True)
        parser.add_argument("--result", type=Path, required=True)
        parser.add_argument("--deadline", type=float, default=60.0)
        parser.add_argument("--sweep", action="store_true")
        args = parser.parse_args(list(argv))
        return cls(args.socket, args.result, args.deadline, args.sweep)


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


def main(argv: Sequence[str] | None = None) -> int:
    request = ReadyRequest.from_argv(sys.argv[1:] if argv is None else argv)
    result = check(request)
    result.write(request.result)
    return 0 if result.ready else 1


if __name__ == "__main__":
    sys.exit(main())
