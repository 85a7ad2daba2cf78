"""How an image install's progress reads, for the log, `status`, a compile asked for too early,
and a terminal's progress bar. Pure functions of the installer's per-image status entries
(`init.texlive.contract.ImageStatus`): no clocks, no I/O, stdlib only (PID 1's `status` uses them).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from init.texlive.contract import ImageStatus

_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def percent(done: int, total: int) -> float:
    """Share of `total` that is `done`, 0-100, one decimal; 0 while the total is unknown."""
    if total <= 0:
        return 0.0
    return round(min(100.0, 100.0 * done / total), 1)


def format_sizes(done: int, total: int, sep: str = "/") -> str:
    """Both sizes in the total's unit: `1.2/2.8 GB` (sep " of ": `1.2 of 2.8 GB`)."""
    name, size = next(((n, s) for n, s in _UNITS if total >= s), ("B", 1.0))
    if name == "B":
        return f"{done}{sep}{total} B"
    return f"{done / size:.1f}{sep}{total / size:.1f} {name}"


def format_rate(bytes_per_second: float) -> str:
    """`12.3 MB/s`; empty while there is no rate."""
    if bytes_per_second <= 0:
        return ""
    name, size = next(((n, s) for n, s in _UNITS if bytes_per_second >= s), ("B", 1.0))
    return f"{bytes_per_second / size:.1f} {name}/s"


def format_eta(seconds: float | None) -> str:
    """`3 min`, `40 s`, `2 h 5 min`; empty when unknown."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def still_installing(image: str, entry: ImageStatus | None) -> str:
    """What a compile asked for too early is told, from the image's status entry:
    `TeX Live image X is still installing: 43% (1.2 of 2.8 GB), about 3 min left`."""
    if entry is None:
        return f"TeX Live image {image} is still installing"
    state = entry.state
    if state == "failed":
        return f"TeX Live image {image} failed to install: {entry.reason}"
    if state == "retrying":
        return (
            f"TeX Live image {image} is not installed yet: {entry.reason}; "
            f"next try at {entry.next_try_at}"
        )
    if state == "waiting":
        return f"TeX Live image {image} is waiting for the engine to answer"
    done, total = entry.bytes_done, entry.bytes_total
    if total <= 0:  # a build: steps, not bytes
        note = entry.note or entry.reason
        done_part = f"{entry.percent:.0f}%" if entry.percent else ""
        detail = ", ".join(str(x) for x in (done_part, note) if x)
        return f"TeX Live image {image} is still installing" + (f": {detail}" if detail else "")
    message = (
        f"TeX Live image {image} is still installing: "
        f"{percent(done, total):.0f}% ({format_sizes(done, total, ' of ')})"
    )
    left = format_eta(entry.eta_seconds)
    return f"{message}, about {left} left" if left else message


def image_line(entry: ImageStatus) -> str:
    """One image in `sharelatex-init status`: `present (pull)`, `installing 43% (1.2/2.8 GB),
    12.3 MB/s, ~3 min left`, `retrying at T: reason`, `failed: reason`."""
    state = entry.state
    if state == "present":
        return f"present ({entry.source})" if entry.source else "present"
    if state == "retrying":
        return f"retrying at {entry.next_try_at or '?'}: {entry.reason}"
    if state == "failed":
        return f"failed: {entry.reason}"
    if state != "installing":
        return str(state)
    done, total = entry.bytes_done, entry.bytes_total
    how = f" by {entry.source}" if entry.source else ""
    if total <= 0:  # a build: steps, not bytes
        pct, note = entry.percent, entry.note
        return f"installing{how}" + (f" {pct:.0f}%" if pct else "") + (f": {note}" if note else "")
    parts = [f"installing{how} {percent(done, total):.0f}% ({format_sizes(done, total)})"]
    if rate := format_rate(entry.rate):
        parts.append(rate)
    if left := format_eta(entry.eta_seconds):
        parts.append(f"~{left} left")
    return ", ".join(parts)
