"""`/proc/self/mountinfo`, parsed once for every module that asks what is mounted where."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountLine:
    """One line: `id parent major:minor root mount-point options [optional...] - type source
    super-options`."""

    root: str
    point: str
    options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


def unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> MountLine | None:
    """One mountinfo line; None for a malformed one."""
    fields = line.split()
    try:
        separator = fields.index("-", 6)
        root, point, options = fields[3], fields[4], fields[5]
        fs_type = fields[separator + 1]
    except (ValueError, IndexError):
        return None
    source = fields[separator + 2] if len(fields) > separator + 2 else ""
    super_options = tuple(fields[separator + 3].split(",")) if len(fields) > separator + 3 else ()
    return MountLine(
        unescape(root), unescape(point), tuple(options.split(",")), fs_type, source, super_options
    )


def parse(text: str) -> Iterator[MountLine]:
    """Every well-formed line of a mountinfo file, in order (later mounts last)."""
    for line in text.splitlines():
        mount = parse_line(line)
        if mount is not None:
            yield mount
