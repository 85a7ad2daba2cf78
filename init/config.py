"""Configuration: the environment plus `.env` files, validated into one frozen `Settings`.

Every problem is found in one pass and reported at once, one line each naming the variable,
the bad value and the fix (exit status 78). The environment is a parameter, never read from a
global, so tests pass plain dicts.
"""

from __future__ import annotations

import enum
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init.errors import ConfigError

DEFAULT_CONFIG_DIR = Path("/etc/sharelatex-init")
# The init's own variables all start with this (and are consumed by it: never passed on to the
# startup scripts or the services). Overleaf 5's images refuse to start when any variable's name
# contains SHARELATEX (`env | cut -d= -f1 | grep SHARELATEX` in server-ce/init_scripts/
# 000_check_for_old_env_vars_5.sh, overleaf/overleaf 12befda2, unchanged through 28ad3b03); the
# 4.x-era spelling is still read, with a notice, and consumed the same way, so that guard never
# sees it either.
OWN_PREFIX = "OVERLEAF_INIT_"
OLD_OWN_PREFIX = "SHARELATEX" + "_INIT_"


class Generation(enum.Enum):
    """Which image the init runs in: where its data lives and which names its variables have."""

    OVERLEAF = "Overleaf 5+"  # /var/lib/overleaf, OVERLEAF_* (2024 on)
    SHARELATEX = "ShareLaTeX 4.x"  # /var/lib/sharelatex, SHARELATEX_*

    @property
    def data_root(self) -> Path:
        return Path("/var/lib/overleaf" if self is Generation.OVERLEAF else "/var/lib/sharelatex")


def detect_generation(root: Path = Path("/")) -> Generation:
    """The image's generation by its own files: Overleaf 5+ keeps its settings in /etc/overleaf
    and its services in /overleaf; ShareLaTeX 4.x in /etc/sharelatex and /var/www/sharelatex.
    Neither (a plain base image): Overleaf 5+'s layout, today's."""
    if (root / "etc/overleaf").is_dir() or (root / "overleaf/services").is_dir():
        return Generation.OVERLEAF
    if (root / "etc/sharelatex").is_dir() or (root / "var/www/sharelatex").is_dir():
        return Generation.SHARELATEX
    return Generation.OVERLEAF


# Overleaf 5+'s; ShareLaTeX 4.x's are under /var/lib/sharelatex (Generation.data_root).
DEFAULT_COMPILES_DIR = Path("/var/lib/overleaf/data/compiles")
DEFAULT_OUTPUT_DIR = Path("/var/lib/overleaf/data/output")
# The image `scripts/build-images` makes from Debian's TeX Live packages.
DEFAULT_TEXLIVE_IMAGE = "sharelatex-init/texlive:bookworm"

PREFIXES = ("", "OVERLEAF_", "SHARELATEX_")

SANDBOXED = "SANDBOXED_COMPILES"
SIBLING = "SANDBOXED_COMPILES_SIBLING_CONTAINERS"
HOST_DIR = "SANDBOXED_COMPILES_HOST_DIR"
HOST_DIR_COMPILES = "SANDBOXED_COMPILES_HOST_DIR_COMPILES"
HOST_DIR_OUTPUT = "SANDBOXED_COMPILES_HOST_DIR_OUTPUT"
TEXLIVE_IMAGE = "TEX_LIVE_DOCKER_IMAGE"
ALL_TEXLIVE_IMAGES = "ALL_TEX_LIVE_DOCKER_IMAGES"
STORAGE_DRIVER = "SANDBOXED_COMPILES_STORAGE_DRIVER"
# What an operator may force on the inner dockerd; vfs is the explicit opt-in for a layered root.
STORAGE_DRIVERS = ("overlay2", "fuse-overlayfs", "btrfs", "zfs", "vfs")
# Docker's own: where the engine is. The services get it pointing at the engine of their mode.
DOCKER_HOST = "DOCKER_HOST"
# What a compile service's own docker runner (Server Pro's DockerRunner.js) reads, beside the
# host dirs above (services/clsi/config/settings.defaults.js at overleaf/overleaf f461dcc9,
# the last commit with DockerRunner.js): the image is TEXLIVE_IMAGE, else TEX_LIVE_DOCKER_IMAGE;
# the containers' user TEXLIVE_IMAGE_USER, else `tex` (uid 1000 in TeX Live images), which
# cannot write the compile dirs the service makes as its own user.
DOCKER_RUNNER = "DOCKER_RUNNER"
ALLOWED_IMAGES = "ALLOWED_IMAGES"  # space-separated
RUNNER_IMAGE = "TEXLIVE_IMAGE"
RUNNER_USER = "TEXLIVE_IMAGE_USER"
PRODUCT_VARIABLES = (
    SANDBOXED,
    SIBLING,
    HOST_DIR,
    HOST_DIR_COMPILES,
    HOST_DIR_OUTPUT,
    TEXLIVE_IMAGE,
    ALL_TEXLIVE_IMAGES,
    STORAGE_DRIVER,
)

# The init's own settings (no product prefixes): how the TeX Live images get into the engine,
# the optional HTTP status endpoint, and how the services' compiles reach the sandbox.
TEXLIVE_SOURCES = "OVERLEAF_INIT_TEXLIVE_SOURCES"
TEXLIVE_TARBALL_DIR = "OVERLEAF_INIT_TEXLIVE_TARBALL_DIR"
TEXLIVE_BASE_IMAGE = "OVERLEAF_INIT_TEXLIVE_BASE_IMAGE"  # what the `build` source builds on
TEXLIVE_SCHEME = "OVERLEAF_INIT_TEXLIVE_SCHEME"
# The `build` source's package lists (init/texlive/recipes/texlive-SCHEME.packages), smallest
# first.
TEXLIVE_SCHEMES = ("basic", "small", "full")
HTTP_ADDRESS = "OVERLEAF_INIT_HTTP_ADDRESS"
STATUS_FILE_VARIABLE = "OVERLEAF_INIT_STATUS_FILE"  # where PID 1 keeps its status
# The compile broker's socket (init.broker.service); unset: `broker.sock` beside the status file
# (the init's run dir), where the services' shims and `sharelatex-init compile` find it.
COMPILE_BROKER_SOCKET = "OVERLEAF_INIT_COMPILE_BROKER_SOCKET"
BROKER_SOCKET_NAME = "broker.sock"
CONFIG_DIR_VARIABLE = "OVERLEAF_INIT_CONFIG_DIR"  # the dir of *.env files
LOG_LEVEL = "OVERLEAF_INIT_LOG_LEVEL"
CONTAINER_ID = "OVERLEAF_INIT_CONTAINER_ID"  # sibling: this container's id when /proc can't tell
# The inner dockerd of docker-in-docker: where it keeps its state and listens, extra flags.
DOCKER_DATA_ROOT = "OVERLEAF_INIT_DOCKER_DATA_ROOT"
DOCKER_EXEC_ROOT = "OVERLEAF_INIT_DOCKER_EXEC_ROOT"
DOCKER_SOCKET = "OVERLEAF_INIT_DOCKER_SOCKET"
DOCKERD_ARGS = "OVERLEAF_INIT_DOCKERD_ARGS"
DOCKERD_BINARY = "OVERLEAF_INIT_DOCKERD"
DOCKERD_READY_TIMEOUT = "OVERLEAF_INIT_DOCKERD_READY_TIMEOUT"
# my_init's names for the stop's time limits.
KILL_PROCESS_TIMEOUT = "KILL_PROCESS_TIMEOUT"
KILL_ALL_PROCESSES_TIMEOUT = "KILL_ALL_PROCESSES_TIMEOUT"
COMPILE_RUNNER = "OVERLEAF_INIT_COMPILE_RUNNER"
SERVICE_USER = "OVERLEAF_INIT_SERVICE_USER"  # who the services run as (they use the engine)
DEFAULT_SERVICE_USER = "www-data"
SOURCE_NAMES = ("pull", "load", "build")
DEFAULT_SOURCES = ("pull", "load", "build")
DEFAULT_TARBALL_DIR = Path("/var/lib/sharelatex-init/images")  # used when it exists
# shim: a sandboxing `latexmk` first on the services' PATH (Community Edition); docker: the
# services' own docker runner reads DOCKER_RUNNER (Server Pro); auto: docker when one is there.
COMPILE_RUNNERS = ("auto", "shim", "docker")
# The OCI runtime compile containers run under: runc (the engine's default) or gVisor's runsc, an
# application kernel between a document and the host's (init.engine.runtime). A bare word is the
# default; IMAGE=RUNTIME items choose per image of the allow-list, e.g. `runc,old/texlive=runsc`.
COMPILE_RUNTIME = "OVERLEAF_INIT_COMPILE_RUNTIME"
COMPILE_RUNTIMES = ("runc", "runsc")
# runsc's platform in docker-in-docker: auto (KVM where /dev/kvm can serve it, else ptrace),
# or one named (systrap where the runsc has it).
RUNSC_PLATFORM = "OVERLEAF_INIT_RUNSC_PLATFORM"
RUNSC_PLATFORMS = ("auto", "ptrace", "systrap", "kvm")
# docker-in-docker: the compiles root on a filesystem of its own, a loop-mounted ext4 image of
# this size beside it (init.engine.compiles_fs): `auto` (the default: 10 GiB, or half the data
# dir's free space when less, when the image is first made), a size such as 20g, or 0 (off).
COMPILES_SIZE = "OVERLEAF_INIT_COMPILES_SIZE"
COMPILES_SIZE_MIN = 256 << 20

TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})

# The reference grammar of distribution/reference: [host[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_IMAGE_REFERENCE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


class Mode(enum.Enum):
    """How compiles run: not sandboxed, in an inner dockerd, or beside us on the host's."""

    OFF = "off"
    DIND = "dind"
    SIBLING = "sibling"


@dataclass(frozen=True)
class UidRange:
    """The uids compiles run as, one per project (COMPILE_UID_BASE, COMPILE_UID_RANGE;
    init.compiles.identity says why): `size` of them from `base`. The defaults are far above
    ordinary uids and the usual subordinate range (100000-165535), and end below 2^31 for the
    tools that keep a uid in a signed int."""

    base: int = 2_000_000_000
    size: int = 100_000_000

    def uid_for(self, project: str) -> int:
        """The project's own uid: stable (the same on every compile and restart), no state."""
        import zlib

        return self.base + zlib.crc32(project.encode()) % self.size

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.base <= uid < self.base + self.size

    def describe(self) -> str:
        return f"{self.base}-{self.base + self.size - 1}"


DEFAULT_COMPILE_UIDS = UidRange()


@dataclass(frozen=True)
class Settings:
    """What the product's variables say, validated."""

    mode: Mode
    texlive_image: str
    all_texlive_images: tuple[str, ...]
    host_dir_compiles: Path | None = None
    host_dir_output: Path | None = None
    compiles_dir: Path = DEFAULT_COMPILES_DIR
    output_dir: Path = DEFAULT_OUTPUT_DIR
    storage_driver: str | None = None  # None: dockerd's own choice on a real filesystem
    texlive_sources: tuple[str, ...] = DEFAULT_SOURCES
    tarball_dir: Path | None = None
    texlive_base_image: str | None = None  # None: the installer's default (the local base)
    texlive_scheme: str = "small"
    http_address: tuple[str, int] | None = None  # (host, port); None: no HTTP endpoint
    compile_runner: str = "auto"
    generation: Generation = Generation.OVERLEAF
    # (image, runtime) for every image of the allow-list, in its order.
    compile_runtimes: tuple[tuple[str, str], ...] = ()
    runsc_platform: str = "auto"
    compiles_size: int | None = None  # bytes of the compiles filesystem; None: auto; 0: off
    compile_uids: UidRange = DEFAULT_COMPILE_UIDS
    warnings: tuple[str, ...] = field(default=(), compare=False)


def is_valid_image_reference(reference: str) -> bool:
    """True when `reference` parses as a Docker image reference (name[:tag][@digest])."""
    return len(reference) <= 255 and _IMAGE_REFERENCE.match(reference) is not None


def read_env_files(config_dir: Path | None, env_files: Iterable[Path] = ()) -> dict[str, str]:
    """Every `*.env` in `config_dir` (in name order), then each `--env-file`; later files win."""
    paths: list[Path] = []
    if config_dir is not None and config_dir.is_dir():
        paths.extend(sorted(p for p in config_dir.glob("*.env") if p.is_file()))
    paths.extend(env_files)
    values: dict[str, str] = {}
    problems: list[str] = []
    for path in paths:
        try:
            values.update(_parse_env_file(path))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return values


def _parse_env_file(path: Path) -> dict[str, str]:
    # python-dotenv only logs a line it cannot parse and drops it; an operator's typo must not
    # silently lose a setting, so its parser's error flag becomes a configuration problem.
    from dotenv.parser import parse_stream
    from dotenv.variables import parse_variables

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            [f"--env-file {path}: cannot read it ({e.strerror}); give a readable file"]
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"--env-file {path}: not UTF-8 text; save it as UTF-8"]) from e
    values: dict[str, str] = {}
    problems: list[str] = []
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            line = binding.original.line
            problems.append(
                f"{path}:{line}: cannot parse {binding.original.string.strip()!r}; "
                "write it as NAME=value"
            )
        elif binding.key is not None:
            raw = binding.value or ""
            # ${VAR} expansion as docker compose does, from the file's earlier lines only.
            values[binding.key] = "".join(atom.resolve(values) for atom in parse_variables(raw))
    if problems:
        raise ConfigError(problems)
    return values


def merge_environment(environ: Mapping[str, str], file_values: Mapping[str, str]) -> dict[str, str]:
    """The environment the container runs with: files first, the real environment wins; the
    init's old variable names read as the new (see `renamed`)."""
    merged = dict(file_values)
    merged.update(environ)
    return renamed(merged)[0]


def renamed(environ: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """`environ` with each of the init's variables under its old name (SHARELATEX..._INIT_X)
    also under its new one (OVERLEAF_INIT_X) unless that is set; and a notice for each."""
    result = dict(environ)
    notices = []
    for name, value in environ.items():
        if not name.startswith(OLD_OWN_PREFIX):
            continue
        new = OWN_PREFIX + name[len(OLD_OWN_PREFIX) :]
        if new in environ:
            if environ[new] != value:
                notices.append(f"{name} and {new} disagree; using {new}, remove {name}")
            continue
        result[new] = value
        notices.append(
            f"{name} is the old name of {new}; it is read for now, rename it (Overleaf 5's "
            "images refuse to start with a variable named SHARELATEX...)"
        )
    return result, tuple(notices)


def is_consumed(name: str) -> bool:
    """Whether the init keeps `name` to itself: the sandbox switches (Community Edition's
    compile service refuses to start when it sees SANDBOXED_COMPILES=true) and every variable
    of its own, under either spelling."""
    if name.startswith((OWN_PREFIX, OLD_OWN_PREFIX)):
        return True
    return any(name == prefix + switch for prefix in PREFIXES for switch in (SANDBOXED, SIBLING))


def load(environ: Mapping[str, str], root: Path = Path("/")) -> Settings:
    """Validate the product's variables in `environ` (already merged with the `.env` files);
    the compile and output dirs default to the image's generation's (`detect_generation`)."""
    problems: list[str] = []
    warnings: list[str] = []
    values: dict[str, tuple[str, str]] = {}
    for name in PRODUCT_VARIABLES:
        found = _lookup(environ, name, warnings)
        if found is not None:
            values[name] = found

    sandboxed = _boolean(values.get(SANDBOXED), problems)
    sibling = _boolean(values.get(SIBLING), problems)
    if sibling and not sandboxed:
        source = values[SIBLING][0]
        problems.append(
            f"{source}=true needs sandboxed compiles on; "
            f"add --env SANDBOXED_COMPILES=true (or remove {source})"
        )
    mode = Mode.OFF
    if sandboxed:
        mode = Mode.SIBLING if sibling else Mode.DIND

    host_dir = _path(values.get(HOST_DIR), problems)
    host_compiles = _path(values.get(HOST_DIR_COMPILES), problems) or host_dir
    host_output = _path(values.get(HOST_DIR_OUTPUT), problems)
    if host_dir is not None and HOST_DIR_COMPILES in values and host_compiles != host_dir:
        warnings.append(
            f"{values[HOST_DIR][0]} and {values[HOST_DIR_COMPILES][0]} disagree; "
            f"using {values[HOST_DIR_COMPILES][0]}={host_compiles}"
        )

    image, all_images = _images(values, problems)
    storage_driver = None
    if STORAGE_DRIVER in values and values[STORAGE_DRIVER][1].strip():
        source, value = values[STORAGE_DRIVER]
        storage_driver = value.strip()
        if storage_driver not in STORAGE_DRIVERS:
            problems.append(
                f"{source}={value!r} is not a storage driver sharelatex-init allows; "
                f"use one of {', '.join(STORAGE_DRIVERS)} (or unset it to let dockerd choose)"
            )

    sources = _sources(environ.get(TEXLIVE_SOURCES), problems)
    tarball_dir = _path(
        _own(environ, TEXLIVE_TARBALL_DIR),
        problems,
        f"a dir in the container, e.g. {DEFAULT_TARBALL_DIR}",
    )
    if tarball_dir is None and DEFAULT_TARBALL_DIR.is_dir():
        tarball_dir = DEFAULT_TARBALL_DIR
    base_image = environ.get(TEXLIVE_BASE_IMAGE, "").strip() or None
    if base_image is not None and not is_valid_image_reference(base_image):
        problems.append(
            f"{TEXLIVE_BASE_IMAGE}={base_image!r} is not an image reference; "
            "write NAME[:TAG], e.g. sharelatex-init/debian:bookworm"
        )
    scheme = environ.get(TEXLIVE_SCHEME, "").strip().lower() or "small"
    if scheme not in TEXLIVE_SCHEMES:
        problems.append(
            f"{TEXLIVE_SCHEME}={environ[TEXLIVE_SCHEME]!r} is not a TeX Live scheme; "
            f"use {', '.join(TEXLIVE_SCHEMES[:-1])} or {TEXLIVE_SCHEMES[-1]}"
        )
    http_address = None
    if environ.get(HTTP_ADDRESS, "").strip():
        try:
            http_address = parse_address(environ[HTTP_ADDRESS])
        except ValueError as e:
            problems.append(f"{HTTP_ADDRESS}={environ[HTTP_ADDRESS]!r}: {e}")
    runner = environ.get(COMPILE_RUNNER, "").strip().lower() or "auto"
    if runner not in COMPILE_RUNNERS:
        problems.append(
            f"{COMPILE_RUNNER}={environ[COMPILE_RUNNER]!r} is not a compile runner; "
            f"use one of {', '.join(COMPILE_RUNNERS)}"
        )
    runtimes = _runtimes(environ.get(COMPILE_RUNTIME), all_images, problems)
    compile_uids = _compile_uids(environ, problems)
    platform = environ.get(RUNSC_PLATFORM, "").strip().lower() or "auto"
    if platform not in RUNSC_PLATFORMS:
        problems.append(
            f"{RUNSC_PLATFORM}={environ[RUNSC_PLATFORM]!r} is not a gVisor platform; "
            f"use one of {', '.join(RUNSC_PLATFORMS)}"
        )
    compiles_size = _compiles_size(environ.get(COMPILES_SIZE), problems)
    if runner == "docker" and any(r != "runc" for _, r in runtimes):
        # The services' own docker runner creates the compile containers: no Runtime of ours.
        problems.append(
            f"{COMPILE_RUNTIME}={environ[COMPILE_RUNTIME]!r} needs the init's compile runner, but "
            f"{COMPILE_RUNNER}=docker leaves compiles to the services' own docker runner; "
            f"set {COMPILE_RUNNER}=shim (or {COMPILE_RUNTIME}=runc)"
        )

    if problems:
        raise ConfigError(problems)
    generation = detect_generation(root)
    data = generation.data_root / "data"
    compiles_dir = _path(_own(environ, COMPILES_DIR), problems, f"e.g. {data / 'compiles'}")
    output_dir = _path(_own(environ, OUTPUT_DIR), problems, f"e.g. {data / 'output'}")
    if problems:
        raise ConfigError(problems)
    compiles_dir = compiles_dir or data / "compiles"
    output_dir = output_dir or data / "output"
    if mode is not Mode.SIBLING:
        warnings += _host_dir_warnings(values, mode, compiles_dir, output_dir)
    return Settings(
        mode=mode,
        texlive_image=image,
        compiles_dir=compiles_dir,
        output_dir=output_dir,
        generation=generation,
        all_texlive_images=all_images,
        host_dir_compiles=host_compiles,
        host_dir_output=host_output,
        storage_driver=storage_driver,
        texlive_sources=sources,
        tarball_dir=tarball_dir,
        texlive_base_image=base_image,
        texlive_scheme=scheme,
        http_address=http_address,
        compile_runner=runner,
        compile_runtimes=runtimes,
        runsc_platform=platform,
        compiles_size=compiles_size,
        compile_uids=compile_uids,
        warnings=tuple(warnings),
    )


def _host_dir_warnings(
    values: Mapping[str, tuple[str, str]], mode: Mode, compiles_dir: Path, output_dir: Path
) -> list[str]:
    """What becomes of a host dir given outside sibling mode, for either compile runner: off,
    nothing compiles in a container; in docker-in-docker the inner engine sees this container's
    own filesystem, so its own dirs are what compile containers bind (the services' docker
    runner is given them under these names: init.compiles.service_env)."""
    warnings = []
    for name in (HOST_DIR, HOST_DIR_COMPILES, HOST_DIR_OUTPUT):
        if name not in values:
            continue
        source, value = values[name]
        if mode is Mode.OFF:
            warnings.append(
                f"{source}={value} is not used: compiles are not sandboxed "
                f"({SANDBOXED} is not true); it matters only with sibling containers"
            )
            continue
        own = output_dir if name == HOST_DIR_OUTPUT else compiles_dir
        if value.rstrip("/") != str(own):
            warnings.append(
                f"{source}={value} is replaced by {own}: in docker-in-docker the inner engine "
                "sees this container's own paths, and compile containers bind those; remove "
                f"it (it matters only with {SIBLING}=true)"
            )
    return warnings


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the startup scripts, /etc/container_environment and the services see: everything
    but what the init consumes (`is_consumed`). The compile path gets the init's compile
    settings from the init itself (init.compiles.service_env), not from its environment."""
    return {k: v for k, v in environ.items() if not is_consumed(k)}


def _lookup(environ: Mapping[str, str], name: str, warnings: list[str]) -> tuple[str, str] | None:
    """(the variable that was used, its value); the unprefixed name wins over the prefixed."""
    names = [prefix + name for prefix in PREFIXES if prefix + name in environ]
    present = [(n, environ[n]) for n in names]
    if not present:
        return None
    used = present[0]
    for other, value in present[1:]:
        if value != used[1]:
            warnings.append(
                f"{used[0]}={used[1]!r} and {other}={value!r} disagree; using {used[0]}"
            )
    return used


def _boolean(found: tuple[str, str] | None, problems: list[str]) -> bool:
    if found is None:
        return False
    source, value = found
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    problems.append(f"{source}={value!r} is not a boolean; use true or false (also 1/0, yes/no)")
    return False


def _path(
    found: tuple[str, str] | None,
    problems: list[str],
    example: str = "the full path on the host, e.g. /data/sharelatex_data/data/compiles",
) -> Path | None:
    if found is None or found[1] == "":
        return None
    source, value = found
    if not value.startswith("/"):
        problems.append(f"{source}={value!r} is not an absolute path; give {example}")
        return None
    return Path(value)


def _images(
    values: Mapping[str, tuple[str, str]], problems: list[str]
) -> tuple[str, tuple[str, ...]]:
    listed: list[str] = []
    if ALL_TEXLIVE_IMAGES in values:
        source, value = values[ALL_TEXLIVE_IMAGES]
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            if not is_valid_image_reference(item):
                problems.append(
                    f"{source}: {item!r} is not an image reference; "
                    "write NAME[:TAG], e.g. texlive/texlive:latest-full"
                )
            elif item not in listed:
                listed.append(item)
    image = ""
    if TEXLIVE_IMAGE in values and values[TEXLIVE_IMAGE][1].strip():
        source, value = values[TEXLIVE_IMAGE]
        image = value.strip()
        if not is_valid_image_reference(image):
            problems.append(
                f"{source}={value!r} is not an image reference; "
                "write NAME[:TAG], e.g. texlive/texlive:latest-full"
            )
        elif listed and image not in listed:
            problems.append(
                f"{source}={image} is not in {values[ALL_TEXLIVE_IMAGES][0]}; "
                f"add it to the list or choose one of {', '.join(listed)}"
            )
    if not image:
        image = listed[0] if listed else DEFAULT_TEXLIVE_IMAGE
    ordered = [image, *(i for i in listed if i != image)]
    return image, tuple(ordered)


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all addresses) -> (host, port); ValueError saying
    what to write."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("give HOST:PORT, e.g. 127.0.0.1:8089 or 0.0.0.0:8089")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:8089")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535; e.g. 0.0.0.0:8089")
    return host or "0.0.0.0", int(port)


def _own(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """One of the init's own variables as (name, value), like a product variable's lookup."""
    return (name, environ[name]) if name in environ else None


def _runtimes(
    value: str | None, images: tuple[str, ...], problems: list[str]
) -> tuple[tuple[str, str], ...]:
    """(image, runtime) for each image: `runsc`, or `runc,IMAGE=runsc,...` (a bare word is
    the default, IMAGE=RUNTIME an image of the allow-list)."""
    default = "runc"
    chosen: dict[str, str] = {}
    for item in (part.strip() for part in (value or "").split(",")):
        if not item:
            continue
        image, sep, runtime = item.rpartition("=")
        runtime = runtime.strip().lower()
        if runtime not in COMPILE_RUNTIMES:
            problems.append(
                f"{COMPILE_RUNTIME}: {item!r} names no runtime sharelatex-init knows; "
                f"use {' or '.join(COMPILE_RUNTIMES)} (gVisor), or IMAGE=runsc for one image"
            )
        elif not sep:
            default = runtime
        elif image.strip() not in images:
            problems.append(
                f"{COMPILE_RUNTIME}: {image.strip()!r} is not an allowed TeX Live image; "
                f"choose one of {', '.join(images)} or add it to {ALL_TEXLIVE_IMAGES}"
            )
        else:
            chosen[image.strip()] = runtime
    return tuple((image, chosen.get(image, default)) for image in images)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`512m`, `10g`, `1.5GiB`, `4096` (bytes) -> bytes; ValueError otherwise. Every size
    variable's grammar (init.compiles.settings takes it from here)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(text)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _compiles_size(value: str | None, problems: list[str]) -> int | None:
    """COMPILES_SIZE: None for auto (unset, empty or `auto`), 0 for off, else its bytes."""
    text = (value or "").strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("off", "0"):
        return 0
    try:
        size = parse_size(text)
    except ValueError:
        size = -1
    if size < COMPILES_SIZE_MIN:
        problems.append(
            f"{COMPILES_SIZE}={value!r} is not a size of at least 256m; give e.g. 20g, auto "
            "(10g, or half the data dir's free space when less), or 0 (off)"
        )
        return None
    return size


def _sources(value: str | None, problems: list[str]) -> tuple[str, ...]:
    if value is None or not value.strip():
        return DEFAULT_SOURCES
    names = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",") if part.strip()))
    wrong = [name for name in names if name not in SOURCE_NAMES]
    if wrong or not names:
        problems.append(
            f"{TEXLIVE_SOURCES}={value!r}: {', '.join(wrong) or 'nothing'} is not a source; "
            f"use a comma list of {', '.join(SOURCE_NAMES)} in the order to try, e.g. pull,load"
        )
        return DEFAULT_SOURCES
    return names


# -- compiles: the compile runner's variables --
# Each spelled in full, once, so that a grep for the name finds where it is read
# (init.compiles.settings and init.compiles.api).
COMPILE_MEMORY = "OVERLEAF_INIT_COMPILE_MEMORY"
COMPILE_PIDS = "OVERLEAF_INIT_COMPILE_PIDS"
COMPILE_CPUS = "OVERLEAF_INIT_COMPILE_CPUS"
COMPILE_TIMEOUT = "OVERLEAF_INIT_COMPILE_TIMEOUT"
# The site's own compile time limit (Overleaf's web reads it unprefixed, in whole seconds;
# with PREFIXES like the product's variables): the sandbox follows it when COMPILE_TIMEOUT
# above is not set.
SITE_COMPILE_TIMEOUT = "COMPILE_TIMEOUT"
COMPILE_TMPFS = "OVERLEAF_INIT_COMPILE_TMPFS"
COMPILE_OUTPUT_SIZE = "OVERLEAF_INIT_COMPILE_OUTPUT_SIZE"
# A compile's budget of what it may add to its dir: bytes, and files and dirs (0: unbounded).
COMPILE_DISK = "OVERLEAF_INIT_COMPILE_DISK"
COMPILE_FILES = "OVERLEAF_INIT_COMPILE_FILES"
COMPILE_CONCURRENCY = "OVERLEAF_INIT_COMPILE_CONCURRENCY"
COMPILE_IDLE = "OVERLEAF_INIT_COMPILE_IDLE"
COMPILE_SHELL_ESCAPE = "OVERLEAF_INIT_COMPILE_SHELL_ESCAPE"
COMPILES_DIR = "OVERLEAF_INIT_COMPILES_DIR"
OUTPUT_DIR = "OVERLEAF_INIT_OUTPUT_DIR"
COMPILE_API_ADDRESS = "OVERLEAF_INIT_COMPILE_API_ADDRESS"
# The uids compiles run as, one per project (init.compiles.identity): the first, and how many.
COMPILE_UID_BASE = "OVERLEAF_INIT_COMPILE_UID_BASE"
COMPILE_UID_RANGE = "OVERLEAF_INIT_COMPILE_UID_RANGE"
# -- end compiles --

UID_MAX = 2**31 - 1  # the largest compile uid: some tools keep a uid in a signed 32-bit int


def compile_uid_range(environ: Mapping[str, str]) -> UidRange:
    """COMPILE_UID_BASE and COMPILE_UID_RANGE (the defaults when unset); ConfigError naming
    each bad value."""
    problems: list[str] = []
    found = _compile_uids(environ, problems)
    if problems:
        raise ConfigError(problems)
    return found


def _compile_uids(environ: Mapping[str, str], problems: list[str]) -> UidRange:
    default = DEFAULT_COMPILE_UIDS
    values = {"base": default.base, "size": default.size}
    bad = len(problems)
    for name, key, example in (
        (COMPILE_UID_BASE, "base", f"{default.base} (never 0)"),
        (COMPILE_UID_RANGE, "size", f"{default.size} (at least 1)"),
    ):
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            problems.append(f"{name}={raw!r} is not valid; write a whole number, e.g. {example}")
        else:
            values[key] = int(raw)
    found = UidRange(values["base"], values["size"])
    if len(problems) == bad and found.base + found.size - 1 > UID_MAX:
        problems.append(
            f"{COMPILE_UID_BASE}={found.base} with {COMPILE_UID_RANGE}={found.size} ends at uid "
            f"{found.base + found.size - 1}, above {UID_MAX}; lower either"
        )
    return found if len(problems) == bad else default
