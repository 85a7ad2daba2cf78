"""A child of PID 1 that installs the TeX Live compile image(s) in the background, and reports.

`python -m init.texlive --socket S --status F --images IMG1,IMG2 [--source pull,load]
[--tarball-dir D] [--once]` makes each image present in the engine, in order (the first is the
default compile image): present already, nothing to do; else each source in turn: `pull` from
its registry (the streamed pull's per-layer bytes as one percentage, rate and ETA) or `load` a
`docker save` tarball named `tarball_name(image)` from D. Failures are retried under
IMAGE_INSTALL forever (one round with --once), except a wrong image name, which fails at once.
F is a JSON document replaced atomically on every state change and at most twice a second
otherwise; `ready` is true once the default image is present. Exit 0 when every image is
present, 1 when one failed, 143 on SIGTERM (finished layers stay in the engine for next time).
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.utils
import requests.exceptions
import tenacity

SOURCES = ("pull", "load")
# A pull of a few GB takes minutes and registries come back within minutes: start at a few
# seconds, back off to five minutes, jitter so many sites do not retry in step.
IMAGE_INSTALL = tenacity.Retrying(
    wait=tenacity.wait_exponential(multiplier=2, min=2, max=300) + tenacity.wait_random(0, 2),
    stop=tenacity.stop_never,
    reraise=False,
)
STATUS_INTERVAL = 0.5  # seconds between progress writes of the status file (state changes: at once)
LOG_INTERVAL = 5.0  # seconds between progress lines in the log
RATE_WINDOW = 10.0  # seconds of samples behind the rate (and so the ETA)
TARBALL_CHUNK = 1 << 20


class State(enum.Enum):
    PRESENT = "present"
    INSTALLING = "installing"
    RETRYING = "retrying"
    FAILED = "failed"


class Reason(enum.Enum):
    """Why an attempt failed, by meaning; `permanent` ones are not retried."""

    NOT_FOUND = "not_found"
    UNREACHABLE = "unreachable"
    DISK_FULL = "disk_full"
    BROKEN_TARBALL = "broken_tarball"
    NO_TARBALL = "no_tarball"
    ENGINE = "engine"
    OTHER = "other"

    @property
    def permanent(self) -> bool:
        return self in (Reason.NOT_FOUND, Reason.NO_TARBALL)


class InstallError(Exception):
    """One failed attempt at one source: its reason and the operator's message."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- pure: progress, rate, formatting, classifying ----------------------------------------------


@dataclass
class PullProgress:
    """Bytes done and total over all layers of one pull, from the engine's stream events."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (done, total)
    # A download the engine resumes after a dropped connection reports only what is left as
    # its total: the bytes it already had are this offset.
    offsets: dict[str, int] = field(default_factory=dict)
    retry_note: str = ""  # the engine's own "Retrying in N seconds", while it lasts

    def update(self, event: Mapping[str, Any]) -> None:
        """Fold one decoded event of `APIClient.pull(stream=True, decode=True)` in."""
        layer = event.get("id")
        status = str(event.get("status", ""))
        if not isinstance(layer, str) or not status or ":" in layer:
            return  # the tag line ("latest: Pulling from x"), digest and summary lines
        detail = event.get("progressDetail") or {}
        done, total = self.layers.get(layer, (0, 0))
        if status == "Downloading":
            reported = int(detail.get("total") or 0)
            if self.retry_note and 0 < reported < total:
                self.offsets[layer] = total - reported
            offset = self.offsets.get(layer, 0)
            total = offset + reported if reported else total
            done = offset + int(detail.get("current") or 0) or done
            self.retry_note = ""
        elif status in ("Verifying Checksum", "Download complete", "Extracting", "Pull complete"):
            done = total
        elif status == "Already exists":
            done = total = 0  # bytes nobody has to move count for nothing
        elif status.startswith("Retrying in"):
            self.retry_note = status
        self.layers[layer] = (done, total)

    @property
    def bytes_done(self) -> int:
        return sum(done for done, _ in self.layers.values())

    @property
    def bytes_total(self) -> int:
        return sum(total for _, total in self.layers.values())


def percent(done: int, total: int) -> float:
    """Share of `total` that is `done`, 0-100, one decimal; 0 while the total is unknown."""
    if total <= 0:
        return 0.0
    return round(min(100.0, 100.0 * done / total), 1)


@dataclass
class RateMeter:
    """Bytes per second over the last `window` seconds of samples (times passed in)."""

    window: float = RATE_WINDOW
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, done: int) -> None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if t1 <= t0 or b1 <= b0:
            return 0.0
        return (b1 - b0) / (t1 - t0)


def eta_seconds(done: int, total: int, rate: float) -> float | None:
    """Seconds left at `rate`; None while it cannot be told."""
    if total <= 0 or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def format_sizes(done: int, total: int, sep: str = "/") -> str:
    """Both sizes in the total's unit: `1.2/2.8 GB` (sep " of ": `1.2 of 2.8 GB`)."""
    name, size = next(((n, s) for n, s in _UNITS if total >= s), ("B", 1.0))
    if name == "B":
        return f"{done}{sep}{total} B"
    return f"{done / size:.1f}{sep}{total / size:.1f} {name}"


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


def progress_line(image: str, pct: float, done: int, total: int, eta: float | None) -> str:
    """The log's progress line: `texlive: pulling IMG: 43% (1.2/2.8 GB), ~3 min left`."""
    line = f"texlive: pulling {image}: {pct:.0f}% ({format_sizes(done, total)})"
    left = format_eta(eta)
    return f"{line}, ~{left} left" if left else line


def still_installing(image: str, status: Mapping[str, Any]) -> str:
    """What a compile asked for too early is told, from the image's entry in the status file."""
    state = status.get("state")
    if state == State.FAILED.value:
        return f"TeX Live image {image} failed to install: {status.get('reason', '')}"
    if state == State.RETRYING.value:
        return (
            f"TeX Live image {image} is not installed yet: {status.get('reason', '')}; "
            f"next try at {status.get('next_try_at', '')}"
        )
    done, total = int(status.get("bytes_done") or 0), int(status.get("bytes_total") or 0)
    if total <= 0:
        return f"TeX Live image {image} is still installing"
    message = (
        f"TeX Live image {image} is still installing: "
        f"{percent(done, total):.0f}% ({format_sizes(done, total, ' of ')})"
    )
    left = format_eta(status.get("eta_seconds"))
    return f"{message}, about {left} left" if left else message


def classify(text: str, source: str, image: str, registry: str = "") -> InstallError:
    """The reason and the operator's message for an error text from the engine or the OS."""
    lowered = text.lower()
    where = registry or "the registry"
    if "no space left" in lowered or "enospc" in lowered or "disk quota" in lowered:
        return InstallError(
            Reason.DISK_FULL,
            f"disk full while installing {image}: free space under the engine's data root "
            f"(/var/lib/docker) or mount a bigger volume there ({text.strip()})",
        )
    if source == "load":
        return InstallError(
            Reason.BROKEN_TARBALL,
            f"the tarball for {image} is broken: write it again with `docker save {image} -o "
            f"{tarball_name(image)}` ({text.strip()})",
        )
    not_found = ("manifest unknown", "not found", "repository does not exist", "pull access denied")
    if any(marker in lowered for marker in not_found):
        return InstallError(
            Reason.NOT_FOUND,
            f"{image} does not exist in {where}: check TEX_LIVE_DOCKER_IMAGE and "
            f"ALL_TEX_LIVE_DOCKER_IMAGES for a typo in the name or tag ({text.strip()})",
        )
    unreachable = (
        "connection refused", "no such host", "i/o timeout", "timeout", "connection reset",
        "eof", "network is unreachable", "tls handshake", "dial tcp", "broken pipe",
    )  # fmt: skip
    if any(marker in lowered for marker in unreachable):
        return InstallError(
            Reason.UNREACHABLE,
            f"cannot reach {where} for {image}: check the network and proxy settings of the "
            f"engine, or put a `docker save` tarball in the tarball dir ({text.strip()})",
        )
    return InstallError(Reason.OTHER, f"{source} of {image} failed: {text.strip()}")


def tarball_name(image: str) -> str:
    """`registry:5000/texlive/texlive:2024` -> `registry_5000_texlive_texlive_2024.tar`."""
    return image.replace("/", "_").replace(":", "_").replace("@", "_") + ".tar"


def registry_of(image: str) -> str:
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


# -- the status board: shared by the installing thread and the main one -------------------------


@dataclass
class ImageStatus:
    image: str
    state: str = State.INSTALLING.value
    source: str = ""
    percent: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0
    eta_seconds: float | None = None
    reason: str = ""
    next_try_at: str = ""


class Board:
    """The status of every image; writes F atomically, on change at once, else at a low rate."""

    def __init__(self, path: Path, images: Sequence[str], log: Callable[[str], None]) -> None:
        self.path = path
        self.log = log
        self.lock = threading.Lock()
        self.images = {image: ImageStatus(image) for image in images}
        self.default = images[0]
        self.dirty = False
        self.last_write = 0.0
        self.last_log: dict[str, float] = {}
        self.note = ""  # how the run ended, once it has

    def change(self, image: str, state: State, **values: Any) -> None:
        """A state change: logged in one line, written at once."""
        with self.lock:
            entry = self.images[image]
            entry.state = state.value
            for key, value in values.items():
                setattr(entry, key, value)
            self.log(self._describe(entry))
            self._write()

    def progress(self, image: str, done: int, total: int, rate: float, note: str = "") -> None:
        with self.lock:
            entry = self.images[image]
            if note != entry.reason and entry.state == State.INSTALLING.value:
                if note and not entry.reason:  # one line, not one per second of countdown
                    self.log(f"texlive: {image}: the download broke off; the engine says {note}")
                entry.reason = note
            entry.bytes_done, entry.bytes_total = done, total
            entry.percent = percent(done, total)
            entry.rate = round(rate)
            eta = eta_seconds(done, total, rate)
            entry.eta_seconds = None if eta is None else round(eta, 1)
            self.dirty = True
            now = time.monotonic()
            if total > 0 and now - self.last_log.get(image, 0.0) >= LOG_INTERVAL:
                self.last_log[image] = now
                self.log(progress_line(image, entry.percent, done, total, eta))

    def flush(self, force: bool = False) -> None:
        """Write if something changed and the last write is STATUS_INTERVAL old."""
        with self.lock:
            if self.dirty and (force or time.monotonic() - self.last_write >= STATUS_INTERVAL):
                self._write()

    def document(self) -> dict[str, Any]:
        return {
            "ready": self.images[self.default].state == State.PRESENT.value,
            "default": self.default,
            "pid": os.getpid(),
            "updated_at": time.time(),
            "note": self.note,
            "images": [asdict(entry) for entry in self.images.values()],
        }

    def _write(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.document(), indent=1))
        os.replace(tmp, self.path)
        self.dirty = False
        self.last_write = time.monotonic()

    @staticmethod
    def _describe(entry: ImageStatus) -> str:
        if entry.state == State.PRESENT.value:
            how = f" ({entry.source})" if entry.source else " (already in the engine)"
            return f"texlive: {entry.image} present{how}"
        if entry.state == State.RETRYING.value:
            return f"texlive: {entry.image}: {entry.reason}; next try at {entry.next_try_at}"
        if entry.state == State.FAILED.value:
            return f"texlive: {entry.image} failed: {entry.reason}"
        return f"texlive: {entry.image}: installing ({entry.source})"


# -- the engine side ----------------------------------------------------------------------------


def is_present(client: docker.APIClient, image: str) -> bool:
    try:
        client.inspect_image(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def pull(client: docker.APIClient, image: str, board: Board) -> None:
    """Pull `image`, reporting progress; InstallError by meaning."""
    repository, tag = docker.utils.parse_repository_tag(image)
    progress, meter = PullProgress(), RateMeter()
    registry = registry_of(image)
    try:
        for event in client.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if "error" in event:
                raise classify(str(event["error"]), "pull", image, registry)
            progress.update(event)
            now = time.monotonic()
            meter.add(now, progress.bytes_done)
            board.progress(
                image, progress.bytes_done, progress.bytes_total, meter.rate(), progress.retry_note
            )
    except docker.errors.APIError as e:
        raise classify(str(e.explanation or e), "pull", image, registry) from e
    except (requests.exceptions.RequestException, OSError) as e:
        raise engine_error(e, image) from e


def load(client: docker.APIClient, image: str, tarball_dir: Path | None, board: Board) -> None:
    """Load `image` from its `docker save` tarball in `tarball_dir`; InstallError by meaning."""
    if tarball_dir is None:
        raise InstallError(Reason.NO_TARBALL, f"no tarball dir for {image}: pass --tarball-dir")
    path = tarball_dir / tarball_name(image)
    try:
        total = path.stat().st_size
    except FileNotFoundError:
        raise InstallError(
            Reason.NO_TARBALL,
            f"no tarball for {image} at {path}: write it with `docker save {image} -o {path}`",
        ) from None
    meter = RateMeter()

    def chunks() -> Iterator[bytes]:
        done = 0
        with path.open("rb") as tarball:
            while chunk := tarball.read(TARBALL_CHUNK):
                done += len(chunk)
                now = time.monotonic()
                meter.add(now, done)
                board.progress(image, done, total, meter.rate())
                yield chunk

    try:
        for event in client.load_image(chunks()):
            if isinstance(event, dict) and "error" in event:
                raise classify(str(event["error"]), "load", image)
    except docker.errors.APIError as e:
        raise classify(str(e.explanation or e), "load", image) from e
    except (requests.exceptions.RequestException, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise classify("no space left on device", "load", image) from e
        raise engine_error(e, image) from e
    if not is_present(client, image):
        raise InstallError(
            Reason.BROKEN_TARBALL,
            f"the tarball {path} loaded but holds no {image}: save that exact name and tag",
        )


def engine_error(e: BaseException, image: str) -> InstallError:
    return InstallError(Reason.ENGINE, f"the Docker engine stopped answering during {image}: {e}")


def install_once(
    client: docker.APIClient,
    image: str,
    sources: Sequence[str],
    tarball_dir: Path | None,
    board: Board,
) -> str:
    """One round over the sources; the one that worked, or InstallError (permanent when all are)."""
    failures: list[InstallError] = []
    # Without a tarball dir, `load` is not configured rather than failing (the default list).
    usable = [s for s in sources if s != "load" or tarball_dir is not None] or list(sources)
    for source in usable:
        board.change(image, State.INSTALLING, source=source, reason="", next_try_at="")
        try:
            if source == "pull":
                pull(client, image, board)
            else:
                load(client, image, tarball_dir, board)
        except InstallError as e:
            failures.append(e)
            continue
        return source
    if len(failures) == 1:
        raise failures[0]
    permanent = all(f.reason.permanent for f in failures)
    first = next((f for f in failures if not f.reason.permanent), failures[0])
    reason = first.reason if not permanent else Reason.NOT_FOUND
    raise InstallError(reason, "; ".join(f.message for f in failures))


def install(
    client: docker.APIClient,
    image: str,
    sources: Sequence[str],
    tarball_dir: Path | None,
    board: Board,
    once: bool,
) -> bool:
    """Make `image` present under IMAGE_INSTALL; whether it is."""
    if is_present(client, image):
        board.change(image, State.PRESENT, percent=100.0, source="")
        return True

    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() + delay))
        board.change(
            image,
            State.RETRYING,
            reason=str(error),
            next_try_at=at,
            rate=0.0,
            eta_seconds=None,
        )

    policy = IMAGE_INSTALL.copy(
        stop=tenacity.stop_after_attempt(1) if once else tenacity.stop_never,
        retry=tenacity.retry_if_exception(
            lambda e: isinstance(e, InstallError) and not e.reason.permanent
        ),
        before_sleep=before_sleep,
    )
    try:
        for attempt in policy:
            with attempt:
                source = install_once(client, image, sources, tarball_dir, board)
    except tenacity.RetryError as e:
        error = e.last_attempt.exception()
        board.change(image, State.FAILED, reason=str(error), rate=0.0, eta_seconds=None)
        return False
    except InstallError as e:
        board.change(image, State.FAILED, reason=e.message, rate=0.0, eta_seconds=None)
        return False
    with board.lock:
        entry = board.images[image]
        total = entry.bytes_total
    board.change(
        image,
        State.PRESENT,
        source=source,
        percent=100.0,
        bytes_done=total,
        rate=0.0,
        eta_seconds=0.0,
    )
    return True


def install_all(
    socket_path: Path,
    images: Sequence[str],
    sources: Sequence[str],
    tarball_dir: Path | None,
    board: Board,
    once: bool,
) -> bool:
    client = docker.APIClient(base_url=f"unix://{socket_path}", version="auto", timeout=60)
    results = [install(client, image, sources, tarball_dir, board, once) for image in images]
    return all(results)


def _log(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m init.texlive")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--images", required=True, help="comma list; the first is the default")
    parser.add_argument("--source", default="pull,load", help="comma list of pull, load")
    parser.add_argument("--tarball-dir", type=Path)
    parser.add_argument("--once", action="store_true", help="one round, no retries")
    args = parser.parse_args(argv)
    args.images = [i.strip() for i in args.images.split(",") if i.strip()]
    args.source = [s.strip() for s in args.source.split(",") if s.strip()]
    if not args.images:
        parser.error("--images: give at least one image")
    for source in args.source:
        if source not in SOURCES:
            parser.error(f"--source {source!r}: choose from {', '.join(SOURCES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    board = Board(args.status, args.images, _log)
    board.dirty = True
    board.flush(force=True)
    # Signals taken by the main thread with sigtimedwait: the pull blocks in a socket read in
    # the worker, and a handler that raised there would be a race (STYLE: handlers do no work).
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    outcome: list[bool] = []

    def work() -> None:
        try:
            outcome.append(
                install_all(
                    args.socket, args.images, args.source, args.tarball_dir, board, args.once
                )
            )
        except Exception as e:  # a bug must still end the run with a line, not hang it
            _log(f"texlive: installer crashed: {e!r}")
            outcome.append(False)

    worker = threading.Thread(target=work, name="texlive-install", daemon=True)
    worker.start()
    while worker.is_alive():
        received = signal.sigtimedwait(stops, STATUS_INTERVAL)
        if received is not None:
            board.note = f"stopped by {signal.Signals(received.si_signo).name}"
            board.dirty = True
            board.flush(force=True)
            _log(f"texlive: {board.note}; finished layers stay in the engine")
            # The worker is a daemon blocked in a read: leaving ends it, and the engine
            # cancels the pull when the connection closes.
            return 128 + received.si_signo
        board.flush()
    board.dirty = True
    board.flush(force=True)
    return 0 if outcome and outcome[0] else 1


if __name__ == "__main__":
    sys.exit(main())
