"""What the proxy is told by PID 1: where to listen, the raw engine socket, the roots and
images compile containers may use, and the limits every one of them gets."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from init.compiles.settings import Limits
from init.proxy.binds import Root
from init.proxy.sweep import Rules

MODULE = "init.proxy"
NAME = "engine-proxy"
DEFAULT_SOCKET = Path("/run/sharelatex-init/docker.sock")
MAX_BODY = 1 << 20  # bytes: a create with the init's seccomp profile inline is ~12 KiB


@dataclass(frozen=True)
class ProxyConfig:
    listen: Path
    engine: Path  # the raw engine socket
    images: tuple[str, ...]
    roots: tuple[Root, ...]
    limits: Limits = field(default_factory=Limits)
    group: int | None = None  # the listening socket's group (mode 0660); None: root's (0600)
    max_body: int = MAX_BODY
    refusals: Path | None = None  # where the last refusals are kept for `status` and `doctor`

    @property
    def lifetime(self) -> float:
        """The longest a compile container may live: its expiry label is at most this far."""
        return self.limits.deadlines.lifetime

    @property
    def rules(self) -> Rules:
        """When the compile containers are removed (sweep.py)."""
        return Rules(idle=self.limits.idle, reuse=self.limits.deadlines.reuse)

    def protected(self) -> tuple[str, ...]:
        """Paths no bind may expose: the sockets the engine can be reached by."""
        return (str(self.engine), str(self.listen))

    def argv(self) -> tuple[str, ...]:
        args = ["--listen", str(self.listen), "--engine", str(self.engine)]
        if self.group is not None:
            args += ["--group", str(self.group)]
        if self.refusals is not None:
            args += ["--refusals", str(self.refusals)]
        for image in self.images:
            args += ["--image", image]
        for root in self.roots:
            args += ["--root", root.arg()]
        limits = self.limits
        args += [
            "--memory", str(limits.memory), "--pids", str(limits.pids),
            "--cpus", f"{limits.cpus:g}", "--tmpfs", str(limits.tmpfs),
            "--timeout", f"{limits.timeout:g}", "--idle", f"{limits.idle:g}",
            "--max-body", str(self.max_body),
        ]  # fmt: skip
        return tuple(args)


def parse_argv(argv: Sequence[str]) -> ProxyConfig:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="The engine policy proxy: compile runners' calls only, held to the profile.",
    )
    parser.add_argument("--listen", type=Path, default=DEFAULT_SOCKET)
    parser.add_argument("--engine", type=Path, required=True, help="the raw engine socket")
    parser.add_argument("--group", type=int, help="gid of the listening socket (mode 0660)")
    parser.add_argument("--image", action="append", default=[], help="an allowed image")
    parser.add_argument("--root", action="append", default=[], type=Root.parse,
                        help="a dir whose subdirs may be bound: PATH or PATH=HOSTPATH")  # fmt: skip
    defaults = Limits()
    parser.add_argument("--memory", type=int, default=defaults.memory)
    parser.add_argument("--pids", type=int, default=defaults.pids)
    parser.add_argument("--cpus", type=float, default=defaults.cpus)
    parser.add_argument("--tmpfs", type=int, default=defaults.tmpfs)
    parser.add_argument("--timeout", type=float, default=defaults.timeout)
    parser.add_argument("--idle", type=float, default=defaults.idle)
    parser.add_argument("--max-body", type=int, default=MAX_BODY)
    parser.add_argument("--refusals", type=Path, help="keep the last refusals here (JSON)")
    options = parser.parse_args(list(argv))
    limits = Limits(
        memory=options.memory, pids=options.pids, cpus=options.cpus, tmpfs=options.tmpfs,
        timeout=options.timeout, idle=options.idle,
    )  # fmt: skip
    return ProxyConfig(
        listen=options.listen,
        engine=options.engine,
        images=tuple(options.image),
        roots=tuple(options.root),
        limits=limits,
        group=options.group,
        max_body=options.max_body,
        refusals=options.refusals,
    )
