"""The compile runner's settings: its limits, the deadlines that follow from the timeout, where
compile dirs live, and the image, all read from the environment at once.

Every bad value is found in one pass and reported together as a ConfigError (exit 78), each
line naming the variable, the value and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from init import config
from init.compiles.budget import Budget
from init.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from typing import Any

# kpathsea's shell_escape value for each setting of OVERLEAF_INIT_COMPILE_SHELL_ESCAPE.
SHELL_ESCAPE = {"off": "f", "restricted": "p"}
DEFAULT_IDLE = 120.0  # seconds a project's container waits for its next compile
# Inodes of a compile's /tmp (its size alone lets empty files take the kernel's default, half
# the machine's RAM pages): TeX's font caches there take hundreds.
TMPFS_INODES = 16384
KILL_GRACE = 5.0  # seconds past the in-container timeout before the runner removes the container
QUEUE_ALLOWANCE = 300.0  # seconds a compile may wait in the compile command's queue
# The site's compile time limit, as Overleaf has it: COMPILE_TIMEOUT in whole seconds, 180 when
# unset (server-ce/config/settings.js, `compileTimeout: parseIntOrFail(process.env.COMPILE_TIMEOUT
# || 180)`), and at most 600 as the compile service takes it (services/clsi/app/js/
# RequestParser.js, MAX_TIMEOUT; both at overleaf/overleaf 28ad3b03b71c). Community Edition's
# compile service never enforces it (LocalCommandRunner ignores its timeout): the sandbox does.
SITE_TIMEOUT = 180.0
SITE_TIMEOUT_CAP = 600.0


@dataclass(frozen=True)
class Deadlines:
    """Every time bound that follows from a compile's timeout, in seconds: computed here once,
    so that the runner, the container's profile, the engine client and the HTTP service agree.
    Each later bound leaves the one before it KILL_GRACE to act first."""

    timeout: float  # the compile's wall clock: `timeout -s KILL` inside the container
    timed_out_after: float  # a SIGKILLed compile that ran this long was the timeout's
    wait: float  # the runner waits this long, then removes the container itself
    reuse: float  # a project's container is reused only with this much of its life left
    engine_call: float  # an engine request (the exec's output stream too) gives up after this
    cpu_soft: int  # RLIMIT_CPU: a backstop under the wall clock, never before it
    cpu_hard: int
    lifetime: float  # at most this long a project's container lives, whatever runs in it
    command: float  # a caller waits this long for the `compile` command: compile and queue

    @classmethod
    def from_timeout(cls, timeout: float, idle: float = DEFAULT_IDLE) -> Deadlines:
        return cls(
            timeout=timeout,
            timed_out_after=timeout - 0.5,
            wait=timeout + KILL_GRACE,
            reuse=timeout + 2 * KILL_GRACE,
            engine_call=timeout + 3 * KILL_GRACE,
            cpu_soft=int(timeout) + 10,
            cpu_hard=int(timeout) + 15,
            lifetime=max(4 * timeout, timeout + idle) + KILL_GRACE,
            command=timeout + QUEUE_ALLOWANCE,
        )


@dataclass(frozen=True)
class Limits:
    """The resource limits of one compile container (OVERLEAF_INIT_COMPILE_*)."""

    memory: int = 1 << 30  # bytes; swap is held to the same (memswap = memory)
    pids: int = 256
    cpus: float = 1.0
    timeout: float = SITE_TIMEOUT  # seconds of wall clock per compile (the site's, see there)
    tmpfs: int = 256 << 20  # bytes of /tmp (HOME, TEXMFVAR)
    output: int = 512 << 20  # bytes: RLIMIT_FSIZE, the largest file a compile may write
    # The budget of what one compile may add to its dir (init.compiles.budget; 0: unbounded):
    # twice the largest file, so a PDF of the largest size and its aux files always fit, and
    # ten compiles at once fit the compiles filesystem's default (init.engine.compiles_fs).
    disk: int = 1 << 30
    # Files and dirs: a normal compile makes tens, a TikZ-externalized or minted thesis a few
    # thousand (4 files a figure, 1 or 2 a snippet). 20,000 keeps the watcher's walk, which
    # stops at the budget, near 0.2 s at worst (~10 us an entry), so it bites within a second.
    files: int = 20_000
    nofile: int = 1024
    concurrency: int = 0  # compiles at once over every runner process; 0: the CPU count
    idle: float = DEFAULT_IDLE
    shell_escape: str = "off"

    @property
    def budget(self) -> Budget:
        return Budget(self.disk, self.files)

    @property
    def slots(self) -> int:
        return self.concurrency or os.cpu_count() or 1

    @property
    def deadlines(self) -> Deadlines:
        return Deadlines.from_timeout(self.timeout, self.idle)


# One grammar of sizes for every variable (`512m`, `1g`, `1.5GiB`, bytes): config's.
parse_size = config.parse_size


def off_or(parse: Callable[[str], int], low: int) -> Callable[[str], int]:
    """`parse`, where 0 (off) is allowed besides `low` and above (ValueError below it)."""

    def parse_bound(text: str) -> int:
        value = parse(text)
        if value != 0 and value < low:
            raise ValueError(text)
        return value

    return parse_bound


def limits_from_env(environ: Mapping[str, str]) -> Limits:
    """The limits from config.COMPILE_MEMORY ... COMPILE_SHELL_ESCAPE; every bad value at once
    as a ConfigError naming the fix. The time limit is config.COMPILE_TIMEOUT when set, else the
    site's own (site_timeout), else the site's default."""
    problems: list[str] = []
    values: dict[str, Any] = {}

    def read(name: str, key: str, parse: Callable[[str], Any], example: str, low: float) -> None:
        raw = environ.get(name, "").strip()
        if not raw:
            return
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or value < low:
            problems.append(f"{name}={raw!r} is not valid; write e.g. {example}")
        else:
            values[key] = value

    read(config.COMPILE_MEMORY, "memory", parse_size, "1g (at least 64m)", 64 << 20)
    read(config.COMPILE_PIDS, "pids", int, "256 (at least 16)", 16)
    read(config.COMPILE_CPUS, "cpus", float, "1.5 (at least 0.1)", 0.1)
    read(config.COMPILE_TIMEOUT, "timeout", float, "180 (seconds, at least 1)", 1)
    if "timeout" not in values and not environ.get(config.COMPILE_TIMEOUT, "").strip():
        site = site_timeout(environ, problems)
        if site is not None:
            values["timeout"] = site
    read(config.COMPILE_TMPFS, "tmpfs", parse_size, "256m (at least 16m)", 16 << 20)
    read(config.COMPILE_OUTPUT_SIZE, "output", parse_size, "512m (at least 1m)", 1 << 20)
    read(config.COMPILE_DISK, "disk", off_or(parse_size, 1 << 20), "1g (at least 1m; 0: off)", 0)
    read(config.COMPILE_FILES, "files", off_or(int, 100), "20000 (at least 100; 0: off)", 0)
    read(config.COMPILE_CONCURRENCY, "concurrency", int, "4 (0: one per CPU)", 0)
    read(
        config.COMPILE_IDLE, "idle", float,
        "120 (seconds; 0 ends each container after its compile)", 0,
    )  # fmt: skip
    escape = environ.get(config.COMPILE_SHELL_ESCAPE, "").strip().lower()
    if escape:
        if escape in SHELL_ESCAPE:
            values["shell_escape"] = escape
        else:
            problems.append(
                f"{config.COMPILE_SHELL_ESCAPE}={escape!r} is not valid; use off or restricted"
            )
    if problems:
        raise ConfigError(problems)
    return Limits(**values)


def site_timeout(environ: Mapping[str, str], problems: list[str]) -> float | None:
    """The site's compile time limit (config.SITE_COMPILE_TIMEOUT, also OVERLEAF_ and
    SHARELATEX_ prefixed; the unprefixed name first), capped as the compile service caps it;
    None when unset. A value the site itself would reject becomes a problem naming the fix."""
    for prefix in config.PREFIXES:
        name = prefix + config.SITE_COMPILE_TIMEOUT
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            problems.append(
                f"{name}={raw!r} is not valid; write whole seconds, e.g. {SITE_TIMEOUT:g} "
                f"(the site's compile time limit; at most {SITE_TIMEOUT_CAP:g} are used)"
            )
            return None
        return min(float(raw), SITE_TIMEOUT_CAP)
    return None


@dataclass(frozen=True)
class Places:
    """Where compile dirs live as seen here, and behind them on the engine's host."""

    compiles: Path = config.DEFAULT_COMPILES_DIR
    output: Path = config.DEFAULT_OUTPUT_DIR
    host_compiles: Path | None = None  # sibling mode: the bind source of `compiles`
    host_output: Path | None = None


@dataclass(frozen=True)
class CompileSettings:
    """Everything a compile needs from the environment (the product's own settings are
    config.Settings; these are the runner's)."""

    places: Places
    limits: Limits
    image: str
    images: tuple[str, ...]
    engine_url: str
    status_file: Path
    runtimes: tuple[tuple[str, str], ...] = ()  # (image, runtime): config.COMPILE_RUNTIME

    def runtime(self, image: str) -> str:
        """The OCI runtime `image` runs under: runc unless the operator chose runsc for it."""
        return dict(self.runtimes).get(image, "runc")


def settings_from_env(environ: Mapping[str, str]) -> CompileSettings:
    """The runner's settings; ConfigError (exit 78) naming each bad variable."""
    from init.core import status_file as status

    product = config.load(environ)
    problems: list[str] = []
    try:
        limits = limits_from_env(environ)
    except ConfigError as e:
        problems.extend(e.problems)
        limits = Limits()
    if problems:
        raise ConfigError(problems)
    places = Places(
        compiles=product.compiles_dir,  # the variable, else the image generation's default
        output=product.output_dir,
        host_compiles=product.host_dir_compiles,
        host_output=product.host_dir_output,
    )
    return CompileSettings(
        places=places,
        limits=limits,
        image=product.texlive_image,
        images=product.all_texlive_images,
        engine_url=environ.get(config.DOCKER_HOST) or "unix:///var/run/docker.sock",
        status_file=status.status_path(environ),
        runtimes=product.compile_runtimes,
    )


def broker_socket(environ: Mapping[str, str]) -> Path:
    """The compile broker's socket: config.COMPILE_BROKER_SOCKET, else beside the status file."""
    from init.core import status_file as status

    given = environ.get(config.COMPILE_BROKER_SOCKET, "").strip()
    if given:
        return Path(given)
    return status.status_path(environ).parent / config.BROKER_SOCKET_NAME


def check_image(image: str | None, settings: CompileSettings) -> str:
    """The image to use: the default, or one of the allow-list (else ConfigError)."""
    if not image:
        return settings.image
    if image not in settings.images:
        raise ConfigError(
            [
                f"--image {image} is not an allowed TeX Live image; choose one of "
                f"{', '.join(settings.images)} or add it to {config.ALL_TEXLIVE_IMAGES}"
            ]
        )
    return image
