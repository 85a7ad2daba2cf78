"""The installer's `build` source, as values: what to build and how far a build has got.

The recipe is `init/texlive/recipes/texlive.Dockerfile` with `texlive-<scheme>.packages`, the same
files
`scripts/build-images` builds from: Debian's TeX Live packages on a base image already in the
engine (debootstrap + `docker import`, no registry). Pure: no engine, no clock;
`init.texlive.install`
runs the build and maps its failures to reasons.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
DOCKERFILE = RECIPES / "texlive.Dockerfile"
SUITE = "bookworm"
DEFAULT_BASE_IMAGE = f"sharelatex-init/debian:{SUITE}"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
LABEL = "sharelatex-init"
LOOPBACK_HOSTS = ("localhost", "127.", "[::1]")

# What apt says when a mirror cannot be reached (the same words scripts/build-images looks for).
UNREACHABLE = re.compile(
    r"Failed to fetch|Failed getting release|Could not connect|Could not resolve|"
    r"Temporary failure resolving|Connection (refused|timed out)|Unable to connect",
    re.IGNORECASE,
)
DISK_FULL = re.compile(r"no space left on device|ENOSPC|disk quota exceeded", re.IGNORECASE)
_STEP = re.compile(r"^Step (\d+)/(\d+) : ")
_APT_COUNT = re.compile(r"^(\d+) upgraded, (\d+) newly installed")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_QUIET = (" ---> ", "Removing intermediate container", "Successfully built", "Successfully tagged")
RUN_WEIGHT = 100  # a RUN step against any other instruction of the recipe


@dataclass(frozen=True)
class BuildOptions:
    """The operator's choices for the `build` source."""

    base_image: str = DEFAULT_BASE_IMAGE
    scheme: str = "small"


@dataclass(frozen=True)
class BuildPlan:
    """One build, ready for `APIClient.build`."""

    image: str
    base_image: str
    scheme: str
    buildargs: dict[str, str]
    labels: dict[str, str]
    network_mode: str | None


def packages(scheme: str, recipes: Path = RECIPES) -> list[str]:
    """The Debian packages of `scheme`, from its list (comments and blank lines dropped)."""
    lines = (recipes / f"texlive-{scheme}.packages").read_text().splitlines()
    return [word for line in lines for word in line.split("#", 1)[0].split()]


def network_mode(networks: Sequence[str], mirror: str, proxies: Sequence[str] = ()) -> str | None:
    """`host` when the build's apt could not reach the mirror otherwise, else the default.

    An engine started with `--bridge=none` (the tests', a locked-down inner dockerd) gives a
    build container no network at all; a mirror or proxy on loopback is only reached from the
    engine's own network namespace. In docker-in-docker that namespace is the container's, so
    `host` is no wider than what the init itself can reach.
    """
    on_loopback = any(_host_of(url).startswith(LOOPBACK_HOSTS) for url in (mirror, *proxies))
    if "bridge" not in networks or on_loopback:
        return "host"
    return None


def _host_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0].rsplit("@", 1)[-1]


def plan(
    image: str,
    options: BuildOptions,
    environ: Mapping[str, str],
    networks: Sequence[str],
    recipes: Path = RECIPES,
) -> BuildPlan:
    """The build of `image` under `options`, the mirrors and proxies taken from `environ`."""
    mirror = (environ.get("DEBIAN_MIRROR") or DEFAULT_MIRROR).rstrip("/")
    security = environ.get("DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR).rstrip("/")
    proxies = {name: environ[name] for name in PROXY_VARIABLES if environ.get(name)}
    buildargs = {
        "BASE_IMAGE": options.base_image,
        "SUITE": SUITE,
        "DEBIAN_MIRROR": mirror,
        "DEBIAN_SECURITY_MIRROR": security,
        "TEXLIVE_PACKAGES": " ".join(packages(options.scheme, recipes)),
    } | proxies
    labels = {
        f"{LABEL}.image": "texlive",
        f"{LABEL}.suite": SUITE,
        f"{LABEL}.scheme": options.scheme,
        f"{LABEL}.built-by": "installer",
    }
    return BuildPlan(
        image=image,
        base_image=options.base_image,
        scheme=options.scheme,
        buildargs=buildargs,
        labels=labels,
        network_mode=network_mode(
            networks, mirror, [url for name, url in proxies.items() if name.lower() != "no_proxy"]
        ),
    )


def context(dockerfile: Path = DOCKERFILE) -> bytes:
    """The build context: the recipe alone (it copies nothing in), as an uncompressed tar."""
    data = dockerfile.read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class BuildProgress:
    """How far a classic-builder build is, from its output lines: the step, and inside the
    long RUN step apt's own counts (packages fetched, unpacked, set up)."""

    step: int = 0
    steps: int = 0
    apt_total: int = 0
    fetched: int = 0
    unpacked: int = 0
    set_up: int = 0
    weights: list[int] = field(default_factory=list)  # per step, from `step_weights`
    last: str = ""  # the last line worth showing (apt's, mostly)
    tail: list[str] = field(default_factory=list)  # for the failure message
    _partial: str = ""
    _floor: float = 0.0  # apt counts twice (upgrade, install): never show a step back

    def feed(self, chunk: str) -> list[str]:
        """Fold a `stream` chunk in (chunks may split lines); the complete lines it held."""
        text = self._partial + _ESCAPES.sub("", chunk)
        *lines, self._partial = text.replace("\r", "\n").split("\n")
        done = [line.rstrip() for line in lines if line.strip()]
        for line in done:
            self._line(line)
        return done

    def _line(self, line: str) -> None:
        self.tail = [*self.tail[-29:], line]
        if match := _STEP.match(line):
            self.step, self.steps = int(match[1]), int(match[2])
            self.last = line
            return
        if match := _APT_COUNT.match(line):
            # The upgrade's count, then the install's: each starts its own count.
            self.apt_total = int(match[1]) + int(match[2])
            self.fetched = self.unpacked = self.set_up = 0
        elif line.startswith("Get:"):
            self.fetched += 1
        elif line.startswith("Unpacking "):
            self.unpacked += 1
        elif line.startswith("Setting up "):
            self.set_up += 1
        elif line.startswith(_QUIET):
            return  # the builder's own bookkeeping
        self.last = line.strip()

    @property
    def percent(self) -> float:
        """By steps; inside a step, by apt's three passes over its packages."""
        if self.steps <= 0:
            return 0.0
        inside = 0.0
        if self.apt_total > 0:
            passes = min(self.fetched, self.apt_total) + min(self.unpacked, self.apt_total)
            passes += min(self.set_up, self.apt_total)
            inside = passes / (3 * self.apt_total)
        weights = self.weights[: self.steps]
        weights += [1] * (self.steps - len(weights))
        done = sum(weights[: max(0, self.step - 1)]) + weights[self.step - 1] * inside
        share = round(min(99.9, 100.0 * done / sum(weights)), 1)
        self._floor = max(self._floor, share)
        return self._floor

    @property
    def note(self) -> str:
        """`step 8/13, apt: 120/310 packages fetched` (what status and the bar show)."""
        if self.steps <= 0:
            return "starting the build"
        note = f"step {self.step}/{self.steps}"
        if self.apt_total > 0:
            if self.set_up:
                phase, count = "set up", self.set_up
            elif self.unpacked:
                phase, count = "unpacked", self.unpacked
            else:
                phase, count = "fetched", self.fetched
            note += f", apt: {min(count, self.apt_total)}/{self.apt_total} packages {phase}"
        return note


def step_weights(dockerfile: str) -> list[int]:
    """How long each of the recipe's instructions takes, roughly: a RUN is the build, the rest
    is bookkeeping. What the builder adds after them (the API's labels) weighs 1 each too."""
    weights = []
    for line in _logical_lines(dockerfile):
        instruction = line.split(None, 1)[0].upper()
        weights.append(RUN_WEIGHT if instruction == "RUN" else 1)
    return weights


def _logical_lines(dockerfile: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in dockerfile.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        current += " " + stripped if current else stripped
        if current.endswith("\\"):
            current = current[:-1]
        else:
            lines.append(current)
            current = ""
    return lines


def failure_kind(lines: Sequence[str]) -> str | None:
    """`disk_full` or `unreachable` when the build's last lines say so, else None."""
    text = "\n".join(lines)
    if DISK_FULL.search(text):
        return "disk_full"
    if UNREACHABLE.search(text):
        return "unreachable"
    return None


def unreachable_line(lines: Sequence[str]) -> str:
    """apt's line that names the mirror it could not reach."""
    return next((line.strip() for line in lines if UNREACHABLE.search(line)), "")
