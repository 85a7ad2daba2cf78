"""What PID 1 and the TeX Live installer child exchange: the request, and the per-image status.

PID 1 (init.texlive.job) starts `python -m init.texlive.install` with an `InstallRequest`'s argv;
the child reads it back with `InstallRequest.from_argv`, and keeps an `InstallerStatus` in a
file beside the init's status (written by its Board, read by `status`, the probes, a compile
asked for too early). Standard library and init.config only: PID 1 imports this module.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from init.config import TEXLIVE_SCHEMES

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: PID 1 imports this
if TYPE_CHECKING:
    from typing import Any

MODULE = "init.texlive.install"
SOURCES = ("pull", "load", "build")


class ImageState(enum.Enum):
    WAITING = "waiting"  # for the engine (PID 1's view before the installer runs)
    PRESENT = "present"
    INSTALLING = "installing"
    RETRYING = "retrying"
    FAILED = "failed"


@dataclass(frozen=True)
class InstallRequest:
    """Which images, from which sources, into which engine; where to keep the status."""

    socket: Path
    status: Path
    images: tuple[str, ...]  # the first is the default compile image
    sources: tuple[str, ...] = ("pull", "load")
    scheme: str = "small"  # what `build` installs
    base_image: str = ""  # what `build` builds on; "" for the installer's default
    tarball_dir: Path | None = None  # where `load` finds `docker save` tarballs
    once: bool = False  # one round, no retries

    def argv(self) -> tuple[str, ...]:
        args = [
            "--socket", str(self.socket),
            "--status", str(self.status),
            "--images", ",".join(self.images),
            "--source", ",".join(self.sources),
            "--scheme", self.scheme,
        ]  # fmt: skip
        if self.base_image:
            args += ["--base-image", self.base_image]
        if self.tarball_dir is not None:
            args += ["--tarball-dir", str(self.tarball_dir)]
        if self.once:
            args.append("--once")
        return tuple(args)

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> InstallRequest:
        import argparse

        parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
        parser.add_argument("--socket", type=Path, required=True)
        parser.add_argument("--status", type=Path, required=True)
        parser.add_argument("--images", required=True, help="comma list; the first is the default")
        parser.add_argument("--source", default="pull,load", help=f"comma list of {SOURCES}")
        parser.add_argument("--tarball-dir", type=Path)
        parser.add_argument("--base-image", default="")
        parser.add_argument("--scheme", choices=TEXLIVE_SCHEMES, default="small")
        parser.add_argument("--once", action="store_true", help="one round, no retries")
        args = parser.parse_args(list(argv))
        images = comma_list(args.images)
        sources = comma_list(args.source)
        if not images:
            parser.error("--images: give at least one image")
        for source in sources:
            if source not in SOURCES:
                parser.error(f"--source {source!r}: choose from {', '.join(SOURCES)}")
        return cls(
            socket=args.socket,
            status=args.status,
            images=tuple(images),
            sources=tuple(sources),
            scheme=args.scheme,
            base_image=args.base_image,
            tarball_dir=args.tarball_dir,
            once=args.once,
        )


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass
class ImageStatus:
    """One image's entry: the installer updates it as it goes (under its Board's lock)."""

    image: str
    state: str = ImageState.INSTALLING.value
    source: str = ""
    percent: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0
    eta_seconds: float | None = None
    reason: str = ""
    next_try_at: str = ""
    note: str = ""  # a build's progress in words (it moves no bytes): `step 8/13, apt: ...`

    @classmethod
    def from_json(cls, document: object) -> ImageStatus | None:
        if not isinstance(document, dict) or not isinstance(document.get("image"), str):
            return None
        known = {name for name in cls.__dataclass_fields__}
        values = {k: v for k, v in document.items() if k in known}
        try:
            return cls(**values)
        except TypeError:
            return None


@dataclass(frozen=True)
class InstallerStatus:
    """The installer's status file: every image's entry; `ready` once the default is present."""

    default: str
    images: tuple[ImageStatus, ...] = ()
    pid: int = 0
    updated_at: float = 0.0
    note: str = ""  # how the run ended, once it has (stopped by SIGTERM, ...)
    ready: bool = False

    def entry(self, image: str) -> ImageStatus | None:
        return next((i for i in self.images if i.image == image), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "default": self.default,
            "pid": self.pid,
            "updated_at": self.updated_at,
            "note": self.note,
            "images": [asdict(entry) for entry in self.images],
        }

    @classmethod
    def from_json(cls, document: object) -> InstallerStatus | None:
        if not isinstance(document, dict) or not isinstance(document.get("default"), str):
            return None
        entries = document.get("images")
        images = tuple(
            e for e in (ImageStatus.from_json(d) for d in entries or ()) if e is not None
        )
        return cls(
            default=document["default"],
            images=images,
            pid=int(document.get("pid") or 0),
            updated_at=float(document.get("updated_at") or 0.0),
            note=str(document.get("note") or ""),
            ready=document.get("ready") is True,
        )

    @classmethod
    def read(cls, path: Path) -> InstallerStatus | None:
        """The installer's file; None when there is none yet or it is not one."""
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class TexLiveStatus:
    """The installer's part of the init's status document: PID 1's view of the job (state,
    reason, since), with the child's per-image entries merged in by readers (`merged`)."""

    state: str
    default: str
    images: tuple[ImageStatus, ...] = ()
    ready: bool = False
    reason: str = ""
    since: float = 0.0
    status_file: str = ""
    done_seconds: float | None = None
    note: str = ""

    def merged(self, installer: InstallerStatus | None) -> TexLiveStatus:
        """With the installer's own file: its readiness and per-image entries win."""
        if installer is None:
            return self
        import dataclasses

        return dataclasses.replace(
            self, ready=installer.ready, images=installer.images, note=installer.note
        )

    def entry(self, image: str) -> ImageStatus | None:
        return next((i for i in self.images if i.image == image), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "ready": self.ready,
            "reason": self.reason,
            "default": self.default,
            "images": [asdict(entry) for entry in self.images],
            "status_file": self.status_file,
            "since": self.since,
            "done_seconds": self.done_seconds,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, document: object) -> TexLiveStatus | None:
        if not isinstance(document, dict) or not isinstance(document.get("default"), str):
            return None
        entries = document.get("images")
        done = document.get("done_seconds")
        return cls(
            state=str(document.get("state") or "?"),
            default=document["default"],
            images=tuple(
                e for e in (ImageStatus.from_json(d) for d in entries or ()) if e is not None
            ),
            ready=document.get("ready") is True,
            reason=str(document.get("reason") or ""),
            since=float(document.get("since") or 0.0),
            status_file=str(document.get("status_file") or ""),
            done_seconds=float(done) if isinstance(done, (int, float)) else None,
            note=str(document.get("note") or ""),
        )
