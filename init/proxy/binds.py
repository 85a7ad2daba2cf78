"""Bind sources judged by where they really are: a dir strictly under the compiles or output
root, after symlinks are resolved, never a root itself, never holding an engine socket.

The source a client names is a path on the engine's host. In docker-in-docker that is this
container's own filesystem; in sibling mode it is the host's, seen here through the compile
and output dirs' bind mounts: each root is a pair (here, on the engine's host). The source is
mapped to here, resolved (a link planted under the compiles root that leads out of it is
refused), and the engine is sent the resolved path mapped back, so a link cannot be followed
differently on the host than it was here.

What remains (a proxy cannot close it): a caller that owns a dir under the root may swap it for
a link between this check and the engine's mount (the engine resolves the source again). The
container's profile (no capabilities, no network, a read-only root) holds whatever it mounts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from init.proxy.decision import Refused


@dataclass(frozen=True)
class Root:
    """A dir whose subdirs a compile container may bind: where it is here, and on the host."""

    here: PurePosixPath
    host: PurePosixPath

    @classmethod
    def parse(cls, text: str) -> Root:
        """`PATH` (the same on both sides) or `PATH=HOSTPATH`."""
        here, _, host = text.partition("=")
        if not here.startswith("/") or (host and not host.startswith("/")):
            raise ValueError(f"{text!r}: give absolute paths, PATH or PATH=HOSTPATH")
        return cls(PurePosixPath(here), PurePosixPath(host or here))

    def arg(self) -> str:
        return str(self.here) if self.here == self.host else f"{self.here}={self.host}"


# (path) -> (resolved path, is a dir); FileNotFoundError when it does not exist.
Resolver = Callable[[str], tuple[str, bool]]


def resolve_on_disk(path: str) -> tuple[str, bool]:
    real = os.path.realpath(path, strict=True)
    return real, stat.S_ISDIR(os.stat(real).st_mode)


def check_source(
    source: str,
    roots: Sequence[Root],
    protected: Sequence[str] = (),
    resolve: Resolver = resolve_on_disk,
) -> str:
    """The host path to send the engine for bind source `source`; Refused unless it is a dir
    strictly under one of `roots` once resolved, with no path of `protected` (the engine
    sockets, the proxy's) at or under it."""
    if not source.startswith("/"):
        raise Refused(f"bind source {source[:80]!r} is not an absolute path (volumes are refused)")
    path = PurePosixPath(source)
    if ".." in path.parts:
        raise Refused(f"bind source {source[:80]!r} contains '..'")
    for root in roots:
        if path == root.host:
            raise Refused(f"bind source {source[:80]!r} is the root {root.host} itself")
        if root.host not in path.parents:
            continue
        here = root.here / path.relative_to(root.host)
        try:
            real_root, _ = resolve(str(root.here))
            real, is_dir = resolve(str(here))
        except FileNotFoundError:
            raise Refused(f"bind source {source[:80]!r} does not exist") from None
        except OSError as e:
            raise Refused(
                f"bind source {source[:80]!r} cannot be resolved ({e.strerror})"
            ) from None
        real_path, root_path = PurePosixPath(real), PurePosixPath(real_root)
        if root_path not in real_path.parents:
            raise Refused(
                f"bind source {source[:80]!r} leads to {real[:80]}, outside {root.here} "
                "(a symlink under the root)"
                if real_path != root_path
                else f"bind source {source[:80]!r} is the root {root.here} itself"
            )
        if not is_dir:
            raise Refused(f"bind source {source[:80]!r} is not a directory")
        for guarded in protected:
            guarded_path = PurePosixPath(guarded)
            if guarded_path == real_path or real_path in guarded_path.parents:
                raise Refused(f"bind source {source[:80]!r} holds the engine socket {guarded}")
        return str(root.host / real_path.relative_to(root_path))
    allowed = " or ".join(str(r.host) for r in roots) or "(none configured)"
    raise Refused(f"bind source {source[:80]!r} is not under {allowed}")
