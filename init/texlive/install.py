"""A child of PID 1 that installs the TeX Live compile image(s) in the background, and reports.

`python -m init.texlive.install --socket S --status F --images IMG1,IMG2 [--source pull,load,build]
[--tarball-dir D] [--base-image B] [--scheme basic|small|full] [--once]` makes each image present in
the engine, in order (the first is the default compile image): present already, nothing to do;
else each source in turn: `pull` from its registry (the streamed pull's per-layer bytes as one
percentage, rate and ETA), `load` a `docker save` tarball named `tarball_name(image)` from D, or
`build` it offline from Debian's TeX Live packages on the base image B (init.texlive.build;
progress by the build's steps and apt's package counts). Failures are retried under
IMAGE_INSTALL forever (one round with --once), except a wrong image name or a missing base,
which fail at once. F is a JSON document replaced atomically on every state change and at most
twice a second otherwise; `ready` is true once the default image is present. Exit 0 when every
image is present, 1 when one failed, 143 on SIGTERM (finished layers stay in the engine for
next time; the engine cancels a build whose client went away).

`python -m init.texlive.install install [IMAGE...]` (`install_command`) is the same for an
operator at
a terminal: a one-line progress bar on a TTY, plain lines at LOG_INTERVAL otherwise.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import tenacity

from init.config import DOCKER_HOST, TEXLIVE_SCHEMES
from init.engine.client import Engine, EngineRefused
from init.errors import EngineError
from init.texlive import build as texlive_build
from init.texlive.build import BuildOptions, BuildProgress
from init.texlive.contract import SOURCES, ImageState, ImageStatus, InstallerStatus, InstallRequest
from init.texlive.progress import format_eta, format_rate, format_sizes, percent

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
# A build step can be silent for minutes (texlive-full's format and font-map triggers); the
# read timeout only guards against an engine that went away without closing the socket.
BUILD_READ_TIMEOUT = 1800.0
BAR_INTERVAL = 0.2  # seconds between redraws of the terminal's progress bar
DEFAULT_ENGINE = "unix:///var/run/docker.sock"


class Reason(enum.Enum):
    """Why an attempt failed, by meaning; `permanent` ones are not retried."""

    NOT_FOUND = "not_found"
    UNREACHABLE = "unreachable"
    DISK_FULL = "disk_full"
    BROKEN_TARBALL = "broken_tarball"
    NO_TARBALL = "no_tarball"
    NO_BASE = "no_base"
    ENGINE = "engine"
    OTHER = "other"

    @property
    def permanent(self) -> bool:
        return self in (Reason.NOT_FOUND, Reason.NO_TARBALL, Reason.NO_BASE)


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


def progress_line(image: str, pct: float, done: int, total: int, eta: float | None) -> str:
    """The log's progress line: `texlive: pulling IMG: 43% (1.2/2.8 GB), ~3 min left`."""
    line = f"texlive: pulling {image}: {pct:.0f}% ({format_sizes(done, total)})"
    left = format_eta(eta)
    return f"{line}, ~{left} left" if left else line


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
        "context deadline exceeded",
        "server closed idle connection",  # Go's: the registry closed the connection at once
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


class Board:
    """The status of every image; writes F atomically, on change at once, else at a low rate."""

    def __init__(
        self,
        path: Path | None,
        images: Sequence[str],
        log: Callable[[str], None],
        progress_lines: bool = True,
    ) -> None:
        self.path = path  # None: no status file (`install` at a terminal)
        self.log = log
        self.progress_lines = progress_lines  # off when a progress bar shows the same
        self.lock = threading.Lock()
        self.images = {image: ImageStatus(image) for image in images}
        self.default = images[0]
        self.dirty = False
        self.last_write = 0.0
        self.last_log: dict[str, float] = {}
        self.note = ""  # how the run ended, once it has

    def change(self, image: str, state: ImageState, **values: Any) -> None:
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
            if note != entry.reason and entry.state == ImageState.INSTALLING.value:
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
            if not self.progress_lines or total <= 0:
                return
            if now - self.last_log.get(image, 0.0) >= LOG_INTERVAL:
                self.last_log[image] = now
                self.log(progress_line(image, entry.percent, done, total, eta))

    def steps(self, image: str, pct: float, note: str, line: str) -> None:
        """A build's progress: a percentage by steps, a note, and the build's last line (to
        the log at LOG_INTERVAL, so apt's lines show up at a low rate)."""
        with self.lock:
            entry = self.images[image]
            entry.percent, entry.note = pct, note
            self.dirty = True
            now = time.monotonic()
            if self.progress_lines and now - self.last_log.get(image, 0.0) >= LOG_INTERVAL:
                self.last_log[image] = now
                self.log(f"texlive: building {image}: {pct:.0f}% ({note}): {line[:120]}")

    def entries(self) -> list[dict[str, Any]]:
        """A copy of every image's entry, for readers in other threads (the progress bar)."""
        with self.lock:
            return [asdict(entry) for entry in self.images.values()]

    def flush(self, force: bool = False) -> None:
        """Write if something changed and the last write is STATUS_INTERVAL old."""
        with self.lock:
            if self.dirty and (force or time.monotonic() - self.last_write >= STATUS_INTERVAL):
                self._write()

    def document(self) -> InstallerStatus:
        return InstallerStatus(
            default=self.default,
            images=tuple(ImageStatus(**asdict(e)) for e in self.images.values()),
            pid=os.getpid(),
            updated_at=time.time(),
            note=self.note,
            ready=self.images[self.default].state == ImageState.PRESENT.value,
        )

    def _write(self) -> None:
        if self.path is None:
            self.dirty = False
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.document().to_json(), indent=1))
        os.replace(tmp, self.path)
        self.dirty = False
        self.last_write = time.monotonic()

    @staticmethod
    def _describe(entry: ImageStatus) -> str:
        if entry.state == ImageState.PRESENT.value:
            how = f" ({entry.source})" if entry.source else " (already in the engine)"
            return f"texlive: {entry.image} present{how}"
        if entry.state == ImageState.RETRYING.value:
            return f"texlive: {entry.image}: {entry.reason}; next try at {entry.next_try_at}"
        if entry.state == ImageState.FAILED.value:
            return f"texlive: {entry.image} failed: {entry.reason}"
        return f"texlive: {entry.image}: installing ({entry.source})"


# -- the engine side ----------------------------------------------------------------------------


def is_present(engine: Engine, image: str) -> bool:
    try:
        return engine.image_present(image)
    except EngineError as e:
        raise engine_error(e, image) from e


def pull(engine: Engine, image: str, board: Board) -> None:
    """Pull `image`, reporting progress; InstallError by meaning."""
    progress, meter = PullProgress(), RateMeter()
    registry = registry_of(image)
    try:
        for event in engine.pull(image):
            if "error" in event:
                raise classify(str(event["error"]), "pull", image, registry)
            progress.update(event)
            now = time.monotonic()
            meter.add(now, progress.bytes_done)
            board.progress(
                image, progress.bytes_done, progress.bytes_total, meter.rate(), progress.retry_note
            )
    except EngineRefused as e:
        raise classify(str(e), "pull", image, registry) from e
    except EngineError as e:
        raise engine_error(e, image) from e


def load(engine: Engine, image: str, tarball_dir: Path | None, board: Board) -> None:
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
        for event in engine.load(chunks()):
            if isinstance(event, dict) and "error" in event:
                raise classify(str(event["error"]), "load", image)
    except EngineRefused as e:
        raise classify(str(e), "load", image) from e
    except EngineError as e:
        raise engine_error(e, image) from e
    if not is_present(engine, image):
        raise InstallError(
            Reason.BROKEN_TARBALL,
            f"the tarball {path} loaded but holds no {image}: save that exact name and tag",
        )


def build(
    engine: Engine,
    image: str,
    options: BuildOptions,
    board: Board,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Build `image` offline from Debian's TeX Live on `options.base_image`; InstallError by
    meaning (the base missing is permanent and says how to make it)."""
    if not is_present(engine, options.base_image):
        raise InstallError(
            Reason.NO_BASE,
            f"cannot build {image}: the base image {options.base_image} is not in the engine; "
            f"make it with `scripts/build-images --only base --engine <this engine>` (debootstrap "
            f"+ docker import), or `docker load` one, or name another with --base-image",
        )
    try:
        plan = texlive_build.plan(image, options, environ, [])
        context = texlive_build.context()
    except OSError as e:  # a package installed without its data files
        raise InstallError(
            Reason.NO_BASE,
            f"cannot build {image}: the recipe is missing from this installation ({e}); "
            f"reinstall sharelatex-init with its package data (init/texlive/recipes)",
        ) from e
    try:
        networks = engine.networks()
    except EngineError as e:
        raise engine_error(e, image) from e
    plan = texlive_build.plan(image, options, environ, networks)
    progress = BuildProgress(
        weights=texlive_build.step_weights(texlive_build.DOCKERFILE.read_text())
    )
    board.steps(image, 0.0, progress.note, f"base {plan.base_image}, scheme {plan.scheme}")
    try:
        events = engine.build(
            context,
            BUILD_READ_TIMEOUT,
            tag=image,
            buildargs=plan.buildargs,
            labels=plan.labels,
            network_mode=plan.network_mode,
            rm=True,
            forcerm=True,  # no intermediate container left by a failed step
            pull=False,  # the base is local; there is no registry to ask
        )
        for event in events:
            if "error" in event:
                raise build_failure(str(event["error"]), progress.tail, image, plan)
            if "stream" in event:
                for line in progress.feed(str(event["stream"])):
                    board.steps(image, progress.percent, progress.note, line)
    except EngineRefused as e:
        raise build_failure(str(e), progress.tail, image, plan) from e
    except EngineError as e:
        raise engine_error(e, image) from e
    if not is_present(engine, image):
        raise InstallError(Reason.OTHER, f"the build of {image} ended without the image")


def build_failure(
    error: str, tail: Sequence[str], image: str, plan: texlive_build.BuildPlan
) -> InstallError:
    """The reason and message for a failed build, from the engine's error and apt's last lines."""
    lines = [*tail, error]
    kind = texlive_build.failure_kind(lines)
    mirror = plan.buildargs.get("DEBIAN_MIRROR", "")
    if kind == "disk_full":
        return classify("no space left on device", "build", image)
    if kind == "unreachable":
        return InstallError(
            Reason.UNREACHABLE,
            f"cannot reach the Debian mirror {mirror} to build {image}: check the network and "
            f"proxy, or set DEBIAN_MIRROR (and DEBIAN_SECURITY_MIRROR, empty for none) to a "
            f"mirror this machine reaches ({texlive_build.unreachable_line(lines)})",
        )
    last = " | ".join(line.strip() for line in tail[-3:])
    return InstallError(Reason.OTHER, f"build of {image} failed: {error.strip()} ({last})")


def engine_error(e: BaseException, image: str) -> InstallError:
    """An engine that went away, or a disk that filled up under the transfer (ENOSPC)."""
    if "no space left" in str(e).lower():
        return classify(str(e), "install", image)
    return InstallError(Reason.ENGINE, f"the Docker engine stopped answering during {image}: {e}")


def install_once(
    engine: Engine,
    image: str,
    sources: Sequence[str],
    tarball_dir: Path | None,
    board: Board,
    build_options: BuildOptions | None = None,
) -> str:
    """One round over the sources; the one that worked, or InstallError (permanent when all are)."""
    failures: list[InstallError] = []
    # Without a tarball dir, `load` is not configured rather than failing (the default list).
    usable = [s for s in sources if s != "load" or tarball_dir is not None] or list(sources)
    for source in usable:
        board.change(
            image, ImageState.INSTALLING, source=source, reason="", next_try_at="", note=""
        )
        try:
            if source == "pull":
                pull(engine, image, board)
            elif source == "build":
                build(engine, image, build_options or BuildOptions(), board)
            else:
                load(engine, image, tarball_dir, board)
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
    engine: Engine,
    image: str,
    sources: Sequence[str],
    tarball_dir: Path | None,
    board: Board,
    once: bool,
    build_options: BuildOptions | None = None,
) -> bool:
    """Make `image` present under IMAGE_INSTALL; whether it is."""
    if is_present(engine, image):
        board.change(image, ImageState.PRESENT, percent=100.0, source="")
        return True

    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() + delay))
        board.change(
            image,
            ImageState.RETRYING,
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
                source = install_once(engine, image, sources, tarball_dir, board, build_options)
    except tenacity.RetryError as e:
        error = e.last_attempt.exception()
        board.change(image, ImageState.FAILED, reason=str(error), rate=0.0, eta_seconds=None)
        return False
    except InstallError as e:
        board.change(image, ImageState.FAILED, reason=e.message, rate=0.0, eta_seconds=None)
        return False
    with board.lock:
        entry = board.images[image]
        total = entry.bytes_total
    board.change(
        image,
        ImageState.PRESENT,
        source=source,
        percent=100.0,
        bytes_done=total,
        rate=0.0,
        eta_seconds=0.0,
        note="",
    )
    return True


def install_all(
    base_url: str,
    images: Sequence[str],
    sources: Sequence[str],
    tarball_dir: Path | None,
    board: Board,
    once: bool,
    build_options: BuildOptions | None = None,
) -> bool:
    engine = Engine(base_url, timeout=60)
    try:
        results = [
            install(engine, image, sources, tarball_dir, board, once, build_options)
            for image in images
        ]
    finally:
        engine.close()
    return all(results)


# -- at a terminal: the one-line progress bar ---------------------------------------------------


def progress_bar(entry: Mapping[str, Any], width: int) -> str:
    """One image's line for a terminal `width` columns wide (at most width - 1, so it never
    wraps): `IMG [=====>    ] 43% 1.2/2.8 GB 12.3 MB/s ETA 3 min`; a build shows its step."""
    image, state = str(entry.get("image", "?")), entry.get("state")
    if state != ImageState.INSTALLING.value:
        if state == ImageState.PRESENT.value:
            text = f"{image}: present" + (f" ({entry['source']})" if entry.get("source") else "")
        elif state == ImageState.RETRYING.value:
            text = f"{image}: retrying at {entry.get('next_try_at', '?')}: {entry.get('reason')}"
        else:
            text = f"{image}: {state}: {entry.get('reason', '')}"
        return _fit(text, width - 1)
    done, total = int(entry.get("bytes_done") or 0), int(entry.get("bytes_total") or 0)
    pct = float(entry.get("percent") or 0.0)
    if total > 0:
        details = [f"{pct:.0f}%", format_sizes(done, total)]
        if rate := format_rate(float(entry.get("rate") or 0.0)):
            details.append(rate)
        if left := format_eta(entry.get("eta_seconds")):
            details.append(f"ETA {left}")
    else:
        note = entry.get("note") or entry.get("reason") or f"{entry.get('source') or 'starting'}"
        details = [f"{pct:.0f}%", str(note)]
    tail = " ".join(details)
    room = width - 1 - len(tail) - 4  # the spaces and the brackets
    name = image if room - len(image) >= 10 else _fit(image, max(12, room - 10))
    cells = room - len(name)
    if cells < 5:
        return _fit(f"{name} {tail}", width - 1)
    filled = int(cells * min(pct, 100.0) / 100.0)
    bar = "=" * filled + (">" if filled < cells else "") + " " * max(0, cells - filled - 1)
    return f"{name} [{bar}] {tail}"


def _fit(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(0, width - 3)] + "..." if width > 3 else text[:width]


def current(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The entry a progress bar follows: the first image still on its way."""
    waiting = (ImageState.INSTALLING.value, ImageState.RETRYING.value)
    return next((e for e in entries if e.get("state") in waiting), None)


class Terminal:
    """Log lines above a progress bar redrawn in place with `\r` (both from several threads)."""

    def __init__(self, stream: TextIO, columns: Callable[[], int]) -> None:
        self.stream = stream
        self.columns = columns
        self.lock = threading.Lock()
        self.shown = ""

    def line(self, text: str) -> None:
        with self.lock:
            if self.shown:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            if self.shown:
                self.stream.write(self.shown)
            self.stream.flush()

    def bar(self, entry: Mapping[str, Any] | None) -> None:
        with self.lock:
            text = progress_bar(entry, self.columns()) if entry is not None else ""
            if text == self.shown:
                return
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
            self.shown = text

    def close(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.shown = ""


# -- running: the worker thread, signals taken by the main one -----------------------------------


def run_installer(
    board: Board, work: Callable[[], bool], interval: float, tick: Callable[[], None]
) -> int:
    """Run `work` in a thread, `tick` every `interval` s; 0/1 by its outcome, 128+N on signal N.

    Signals are taken by the main thread with sigtimedwait: the pull blocks in a socket read in
    the worker, and a handler that raised there would be a race (STYLE: handlers do no work).
    """
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    outcome: list[bool] = []

    def worker_main() -> None:
        try:
            outcome.append(work())
        except Exception as e:  # a bug must still end the run with a line, not hang it
            board.log(f"texlive: installer crashed: {e!r}")
            outcome.append(False)

    worker = threading.Thread(target=worker_main, name="texlive-install", daemon=True)
    worker.start()
    while worker.is_alive():
        received = signal.sigtimedwait(stops, interval)
        if received is not None:
            board.note = f"stopped by {signal.Signals(received.si_signo).name}"
            board.dirty = True
            board.flush(force=True)
            board.log(f"texlive: {board.note}; finished layers stay in the engine")
            # The worker is a daemon blocked in a read: leaving ends it, and the engine
            # cancels the pull or the build when the connection closes.
            return 128 + received.si_signo
        board.flush()
        tick()
    board.dirty = True
    board.flush(force=True)
    return 0 if outcome and outcome[0] else 1


def _log(line: str) -> None:
    print(line, flush=True)


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help=f"comma list of {', '.join(SOURCES)}, in the order to try")
    parser.add_argument("--tarball-dir", type=Path, help="where `load` finds `docker save` tars")
    parser.add_argument(
        "--base-image",
        help=f"what `build` installs TeX Live on (default {texlive_build.DEFAULT_BASE_IMAGE})",
    )
    parser.add_argument(
        "--scheme",
        choices=TEXLIVE_SCHEMES,
        help="`build`'s TeX Live packages: basic (LaTeX alone), small (the default), or full "
        "(texlive-full, several GB)",
    )


def _check_sources(parser: argparse.ArgumentParser, sources: Sequence[str]) -> None:
    for source in sources:
        if source not in SOURCES:
            parser.error(f"--source {source!r}: choose from {', '.join(SOURCES)}")


def main(argv: Sequence[str] | None = None) -> int:
    """The child of PID 1 (see the module's docstring); `install ...` is the operator's command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["install"]:
        return install_command(argv[1:], os.environ)
    request = InstallRequest.from_argv(argv)
    board = Board(request.status, request.images, _log)
    board.dirty = True
    board.flush(force=True)
    options = BuildOptions(
        base_image=request.base_image or texlive_build.DEFAULT_BASE_IMAGE,
        scheme=request.scheme,
    )
    return run_installer(
        board,
        lambda: install_all(
            f"unix://{request.socket}",
            request.images,
            request.sources,
            request.tarball_dir,
            board,
            request.once,
            options,
        ),
        STATUS_INTERVAL,
        lambda: None,
    )


# -- `sharelatex-init texlive install [IMAGE...]` ------------------------------------------------


def add_install_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `texlive install`, for the CLI's subparser (and `install_command`)."""
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="images to install (default: TEX_LIVE_DOCKER_IMAGE, then ALL_TEX_LIVE_DOCKER_IMAGES)",
    )
    parser.add_argument(
        "--engine", help=f"engine URL (default: $DOCKER_HOST, else {DEFAULT_ENGINE})"
    )
    _add_source_arguments(parser)
    parser.add_argument(
        "--retry", action="store_true", help="retry failures with backoff until they succeed"
    )
    parser.add_argument("--status", type=Path, help="also keep a status file (JSON) here")


def install_command(
    argv: Sequence[str], environ: Mapping[str, str], stream: TextIO | None = None
) -> int:
    """`texlive install`: the configured (or named) images into the engine, with a progress bar
    on a terminal and plain lines at LOG_INTERVAL otherwise. 0: all present; 1: one failed;
    78: a configuration error (one line each); 130 on Ctrl-C."""
    from init import config
    from init.errors import ConfigError

    parser = argparse.ArgumentParser(
        prog="sharelatex-init texlive install",
        description="Install the TeX Live compile image(s) into the Docker engine.",
    )
    add_install_arguments(parser)
    args = parser.parse_args(list(argv))
    out = stream or sys.stdout
    try:
        settings = config.load(environ)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return e.exit_status
    images = args.images or list(settings.all_texlive_images)
    sources = _comma_list(args.source) if args.source else list(settings.texlive_sources)
    _check_sources(parser, sources)
    tarball_dir = args.tarball_dir or settings.tarball_dir
    engine = args.engine or environ.get(DOCKER_HOST) or DEFAULT_ENGINE
    options = BuildOptions(
        base_image=args.base_image
        or settings.texlive_base_image
        or texlive_build.DEFAULT_BASE_IMAGE,
        scheme=args.scheme or settings.texlive_scheme,
    )

    terminal: Terminal | None = None
    log: Callable[[str], None] = lambda line: print(line, file=out, flush=True)  # noqa: E731
    if out.isatty():
        terminal = Terminal(out, lambda: shutil.get_terminal_size((80, 24)).columns)
        log = terminal.line
    board = Board(args.status, images, log, progress_lines=terminal is None)

    def tick() -> None:
        if terminal is not None:
            terminal.bar(current(board.entries()))

    try:
        return run_installer(
            board,
            lambda: install_all(
                engine, images, sources, tarball_dir, board, not args.retry, options
            ),
            BAR_INTERVAL if terminal else STATUS_INTERVAL,
            tick,
        )
    finally:
        if terminal is not None:
            terminal.close()


if __name__ == "__main__":
    sys.exit(main())
