"""The sandboxed compile runner: what a compile may touch, where it runs, how it ended.

A compile runs as `latexmk ...` (or an engine) inside a container of an allow-listed TeX Live
image, through `init.engine.api` (every engine call lives there). This module holds the
rest: the settings from the environment, the checks on project ids and paths, the container
profile as plain values, the queue (flock files), the signal handling, and the classification
of how a compile ended. `init.compiles.command` (the `compile` subcommand) and `init.compiles.shim` (the
`latexmk` on the services' PATH) are its two callers.

Speed: each project gets one long-lived container (its compile dir bound, the whole profile
applied, an idle watchdog as its PID 1) and each compile is a `docker exec` into it: about two
engine round trips instead of create, start, wait and remove. The container ends by itself:
every compile runs under `timeout -s KILL` inside it, and its PID 1 exits once nothing else has
run there for the idle time (or at its maximum lifetime), so a runner or shim that is SIGKILLed
leaves nothing running past the compile's timeout plus the idle time. `--auto-remove` then
removes it.

Profile, against Overleaf's last public docker runner (DockerRunner.js: no network, CapDrop ALL,
no-new-privileges, an optional seccomp file, a CPU-time ulimit, Memory of 1 TiB, a writable root
unless `Readonly`, log driver none, a configurable user): network none; every capability
dropped; no-new-privileges; our own seccomp allow-list with no socket call (the engine's default
if it cannot be loaded, with a warning); read-only root; /tmp (also HOME and TEXMFVAR) a
nosuid, nodev, noexec tmpfs of a fixed size; the compile dir's owner as uid:gid, never root;
memory with swap equal to it; a process limit; a CPU limit; RLIMIT_FSIZE, RLIMIT_NOFILE,
RLIMIT_CPU and no core files; a wall-clock limit that kills the compile; `shell_escape=f`
(kpathsea reads it from the environment, so it holds whatever flags latexmk passes; `p`,
restricted, is an opt-in); the image in the allow-list; log driver none; a private IPC
namespace. A project's `latexmkrc` is Perl and runs: the container, not TeX, is the fence.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
import select
import signal
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from init import config
from init.errors import ConfigError, SandboxError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from typing import Any

# The label PID 1's engine check sweeps by; project and compile id beside it.
COMPILE_LABEL = "sharelatex-init.compile"
PROJECT_LABEL = "sharelatex-init.project"
COMPILE_ID_LABEL = "sharelatex-init.compile-id"
EXPIRES_LABEL = "sharelatex-init.expires"

PREFIX = "SHARELATEX_INIT_COMPILE_"
COMPILES_DIR = "SHARELATEX_INIT_COMPILES_DIR"
OUTPUT_DIR = "SHARELATEX_INIT_OUTPUT_DIR"
RUN_DIR = "SHARELATEX_INIT_COMPILE_RUN_DIR"

# Overleaf's compile dirs are `<projectId>` or `<projectId>-<userId>` (24 hex digits each).
PROJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ENGINES = {"pdflatex": "-pdf", "xelatex": "-xelatex", "lualatex": "-lualatex", "latex": "-dvi"}
SHELL_ESCAPE = {"off": "f", "restricted": "p"}
JOBNAME = "output"
# What a compile sees of the caller's environment: the variables TeX and chktex honour.
PASSED_VARIABLES = ("SOURCE_DATE_EPOCH", "FORCE_SOURCE_DATE", "CHKTEX_OPTIONS",
                    "CHKTEX_EXIT_ON_ERROR", "CHKTEX_ULIMIT_OPTIONS", "CHKTEX_VALIDATE")  # fmt: skip
# latexmk's and TeX's own exits (ok, error, latexmk's "errors in the run"): the project's
# container is kept for the next compile; after any other it is replaced.
CLEAN_EXITS = (0, 1, 12)
KILL_GRACE = 5.0  # seconds past the in-container timeout before the runner removes the container
ERROR_LINES = 8
SECCOMP_PROFILE = Path(__file__).with_name("seccomp.json")  # package data beside this module


class Status(enum.IntEnum):
    """How a compile ended: the exit status of `sharelatex-init compile`."""

    OK = 0
    LATEX_ERROR = 1
    LIMIT = 2
    NOT_READY = 75
    CONFIG = 78


class Limit(enum.Enum):
    """Which sandbox limit a compile hit."""

    TIMEOUT = "timeout"
    MEMORY = "memory"
    PROCESSES = "processes"
    OUTPUT_SIZE = "output size"
    STOPPED = "stopped"  # SIGTERM/SIGINT/SIGHUP to the runner


class NotReady(SandboxError):
    """The TeX Live image is not in the engine (yet)."""

    exit_status = 75


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The resource limits of one compile container (SHARELATEX_INIT_COMPILE_*)."""

    memory: int = 1 << 30  # bytes; swap is held to the same (memswap = memory)
    pids: int = 256
    cpus: float = 1.0
    timeout: float = 240.0  # seconds of wall clock per compile (Community Edition's default)
    tmpfs: int = 256 << 20  # bytes of /tmp (HOME, TEXMFVAR)
    output: int = 512 << 20  # bytes: RLIMIT_FSIZE, the largest file a compile may write
    nofile: int = 1024
    concurrency: int = 0  # compiles at once over every runner process; 0: the CPU count
    idle: float = 120.0  # seconds a project's container waits for its next compile
    shell_escape: str = "off"

    @property
    def slots(self) -> int:
        return self.concurrency or os.cpu_count() or 1

    @property
    def lifetime(self) -> float:
        """At most this long a project's container lives, whatever runs in it."""
        return max(4 * self.timeout, self.timeout + self.idle) + KILL_GRACE


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`512m`, `1g`, `1.5GiB`, `4096` (bytes) -> bytes; ValueError otherwise."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(text)
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def limits_from_env(environ: Mapping[str, str]) -> Limits:
    """SHARELATEX_INIT_COMPILE_{MEMORY,PIDS,CPUS,TIMEOUT,TMPFS,OUTPUT_SIZE,CONCURRENCY,IDLE,
    SHELL_ESCAPE}; every bad value at once as a ConfigError naming the fix."""
    problems: list[str] = []
    values: dict[str, Any] = {}

    def read(name: str, key: str, parse: Callable[[str], Any], example: str, low: float) -> None:
        raw = environ.get(PREFIX + name, "").strip()
        if not raw:
            return
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or value < low:
            problems.append(f"{PREFIX}{name}={raw!r} is not valid; write e.g. {example}")
        else:
            values[key] = value

    read("MEMORY", "memory", parse_size, "1g (at least 64m)", 64 << 20)
    read("PIDS", "pids", int, "256 (at least 16)", 16)
    read("CPUS", "cpus", float, "1.5 (at least 0.1)", 0.1)
    read("TIMEOUT", "timeout", float, "240 (seconds, at least 1)", 1)
    read("TMPFS", "tmpfs", parse_size, "256m (at least 16m)", 16 << 20)
    read("OUTPUT_SIZE", "output", parse_size, "512m (at least 1m)", 1 << 20)
    read("CONCURRENCY", "concurrency", int, "4 (0: one per CPU)", 0)
    read("IDLE", "idle", float, "120 (seconds; 0 ends each container after its compile)", 0)
    escape = environ.get(PREFIX + "SHELL_ESCAPE", "").strip().lower()
    if escape:
        if escape in SHELL_ESCAPE:
            values["shell_escape"] = escape
        else:
            problems.append(f"{PREFIX}SHELL_ESCAPE={escape!r} is not valid; use off or restricted")
    if problems:
        raise ConfigError(problems)
    return Limits(**values)


@dataclass(frozen=True)
class Places:
    """Where compile dirs live as seen here, and behind them on the engine's host."""

    compiles: Path = config.DEFAULT_COMPILES_DIR
    output: Path = config.DEFAULT_OUTPUT_DIR
    host_compiles: Path | None = None  # sibling mode: the bind source of `compiles`
    host_output: Path | None = None
    run_dir: Path = Path("/tmp")


@dataclass(frozen=True)
class Settings:
    """Everything a compile needs from the environment."""

    places: Places
    limits: Limits
    image: str
    images: tuple[str, ...]
    engine_url: str
    status_file: Path


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """The runner's settings; ConfigError (exit 78) naming each bad variable."""
    from init.core import status_file as status

    product = config.load(environ)
    problems: list[str] = []
    try:
        limits = limits_from_env(environ)
    except ConfigError as e:
        problems.extend(e.problems)
        limits = Limits()
    paths: dict[str, Path] = {}
    for name, default in (
        (COMPILES_DIR, config.DEFAULT_COMPILES_DIR),
        (OUTPUT_DIR, config.DEFAULT_OUTPUT_DIR),
        (RUN_DIR, Path(f"/tmp/sharelatex-init-compile-{os.geteuid()}")),
    ):
        raw = environ.get(name, "").strip()
        if raw and not raw.startswith("/"):
            problems.append(f"{name}={raw!r} is not an absolute path; give e.g. {default}")
        paths[name] = Path(raw) if raw.startswith("/") else default
    if problems:
        raise ConfigError(problems)
    places = Places(
        compiles=paths[COMPILES_DIR],
        output=paths[OUTPUT_DIR],
        host_compiles=product.host_dir_compiles,
        host_output=product.host_dir_output,
        run_dir=paths[RUN_DIR],
    )
    return Settings(
        places=places,
        limits=limits,
        image=product.texlive_image,
        images=product.all_texlive_images,
        engine_url=environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
        status_file=status.status_path(environ),
    )


def check_image(image: str | None, settings: Settings) -> str:
    """The image to use: the default, or one of the allow-list (else ConfigError)."""
    if not image:
        return settings.image
    if image not in settings.images:
        raise ConfigError(
            [
                f"--image {image} is not an allowed TeX Live image; choose one of "
                f"{', '.join(settings.images)} or add it to ALL_TEX_LIVE_DOCKER_IMAGES"
            ]
        )
    return image


# -- paths ----------------------------------------------------------------------------------


def check_project_id(project: str) -> str:
    """`project` when it is a safe id (letters, digits, `_`, `-`; 1-64; no dot at all)."""
    if not PROJECT_ID.match(project):
        raise ConfigError(
            [
                f"project id {project!r} is not valid; use 1-64 letters, digits, '_' or '-' "
                "(e.g. 5f1e...-5f1e..., as Overleaf names compile dirs), never '..' or '/'"
            ]
        )
    return project


@dataclass(frozen=True)
class CompileDir:
    """A compile dir: where it is here, and the bind source the engine needs for it."""

    path: Path  # resolved, as this process sees it; bound at the same path in the container
    source: Path  # the bind source on the engine's host
    project: str
    uid: int
    gid: int


def within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def host_path(path: Path, places: Places) -> Path:
    """The engine host's path for `path` (resolved): under the compiles (output) root, the
    sibling host dir in its place; elsewhere, as is. ConfigError when sibling mode cannot map
    it."""
    for root, host in (
        (places.compiles, places.host_compiles),
        (places.output, places.host_output),
    ):
        real_root = Path(os.path.realpath(root))
        if within(path, real_root):
            return host / path.relative_to(real_root) if host is not None else path
    if places.host_compiles is not None:
        raise ConfigError(
            [
                f"compile dir {path} is outside the compiles dir {places.compiles}: with sibling "
                "containers only dirs under it reach the host engine; put the project there"
            ]
        )
    return path


def compile_dir(given: Path, places: Places, project: str | None = None) -> CompileDir:
    """Check and resolve a compile dir: symlinks resolved (a dir that only looks as if it were
    under the compiles root is judged by where it really is), a safe project id (given, else the
    dir's name), a non-root owner that the compile runs as."""
    try:
        path = Path(os.path.realpath(given, strict=True))
    except OSError as e:
        raise ConfigError([f"compile dir {given}: {e.strerror}; give an existing dir"]) from e
    if not path.is_dir():
        raise ConfigError([f"compile dir {given} is not a dir; give the project's dir"])
    lexical = Path(os.path.abspath(given))
    if within(lexical, places.compiles) and not within(
        path, Path(os.path.realpath(places.compiles))
    ):
        raise ConfigError(
            [f"compile dir {given} leads out of {places.compiles} (to {path}); remove the link"]
        )
    project = check_project_id(project if project is not None else path.name)
    info = path.stat()
    if info.st_uid == 0:
        raise ConfigError(
            [
                f"compile dir {path} is owned by root and compiles never run as root; "
                "chown it to the services' user (e.g. chown -R www-data: DIR)"
            ]
        )
    return CompileDir(path, host_path(path, places), project, info.st_uid, info.st_gid)


# -- the job and its container, as values ---------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One compile: the command, where it runs, in what image."""

    directory: CompileDir
    command: tuple[str, ...]
    image: str
    environment: Mapping[str, str] = field(default_factory=dict)
    compile_id: str = field(default_factory=lambda: os.urandom(8).hex())


def latexmk_command(directory: Path, main: str, engine: str) -> tuple[str, ...]:
    """What Community Edition's LatexRunner runs, for `sharelatex-init compile`."""
    if engine not in ENGINES:
        raise ConfigError([f"--engine {engine}: use one of {', '.join(ENGINES)}"])
    if Path(main).is_absolute() or ".." in Path(main).parts:
        raise ConfigError([f"--main {main}: give a file name inside the project, e.g. main.tex"])
    return (
        "latexmk", "-cd", f"-jobname={JOBNAME}", f"-auxdir={directory}", f"-outdir={directory}",
        "-synctex=1", "-interaction=batchmode", "-time", "-halt-on-error", ENGINES[engine],
        str(directory / main),
    )  # fmt: skip


def compile_environment(limits: Limits, caller: Mapping[str, str]) -> dict[str, str]:
    """The compile's environment: HOME and the font caches on the tmpfs, shell escape off."""
    env = {k: caller[k] for k in PASSED_VARIABLES if k in caller}
    env.update(
        HOME="/tmp",
        TEXMFVAR="/tmp/texmf-var",
        VARTEXFONTS="/tmp/texfonts",
        LANG="C.UTF-8",
        # kpathsea takes texmf.cnf variables from the environment first: this holds for every
        # TeX run, whatever flags a caller (or a project's latexmkrc) passes.
        shell_escape=SHELL_ESCAPE[limits.shell_escape],
        openout_any="p",
    )
    return env


# After each compile, whatever it left running (a daemon a latexmkrc forked, in a session of
# its own) is killed: `kill -1` reaches every process of the container but its PID 1 and itself.
_END_LEFTOVERS = 'timeout -s KILL "$0" "$@"; status=$?; kill -KILL -1 2>/dev/null; exit $status'


def exec_command(job: Job, limits: Limits) -> list[str]:
    """The compile inside the container: killed with its whole process group at the timeout,
    by the container itself, so a runner that dies cannot leave it running; and then whatever
    it started that is still there, so the project's next compile finds nothing of it."""
    return ["sh", "-c", _END_LEFTOVERS, f"{limits.timeout:g}", *job.command]


def watchdog_command(limits: Limits) -> list[str]:
    """The container's PID 1: exits (ending the container) once only it has run there for
    `idle` seconds, or at the container's lifetime. Its children are reaped by the shell."""
    step = 1 if limits.idle < 10 else 2
    # SIGTERM (docker stop, dockerd stopping with the site) ends it at once: the sleep runs in
    # the background so the trap is not held up by it.
    script = (
        "trap 'exit 0' TERM INT; "
        f"end=$(( $(date +%s) + {int(limits.lifetime)} )); quiet=0; "
        'while [ "$(date +%s)" -lt "$end" ]; do '
        f"sleep {step} & wait $!; set -- /proc/[0-9]*; "
        f'if [ "$#" -gt 1 ]; then quiet=0; else quiet=$((quiet + {step})); '
        f'[ "$quiet" -ge {max(int(limits.idle), step)} ] && exit 0; fi; '
        "done"
    )
    return ["sh", "-c", script]


def container_name(directory: CompileDir, image: str, limits: Limits) -> str:
    """One container per project and profile: a changed image or limit gets a new one."""
    fingerprint = zlib.crc32(
        json.dumps(
            [
                str(directory.path),
                str(directory.source),
                image,
                directory.uid,
                directory.gid,
                limits.memory,
                limits.pids,
                limits.cpus,
                limits.timeout,
                limits.tmpfs,
                limits.output,
                limits.nofile,
                limits.shell_escape,
            ]
        ).encode()
    )
    return f"sharelatex-init-compile-{directory.project}-{fingerprint:08x}"


@dataclass(frozen=True)
class ContainerSpec:
    """What the engine is asked to create: plain values, checked by the unit tests."""

    name: str
    image: str
    command: list[str]
    user: str
    working_dir: str
    environment: dict[str, str]
    labels: dict[str, str]
    host_config: dict[str, Any]  # the Engine API's HostConfig
    expires: float

    def create_body(self) -> dict[str, Any]:
        """The body of `POST /containers/create`."""
        return {
            "Image": self.image,
            "Cmd": self.command,
            "User": self.user,
            "WorkingDir": self.working_dir,
            "Env": [f"{k}={v}" for k, v in self.environment.items()],
            "Labels": self.labels,
            "NetworkDisabled": True,
            "AttachStdin": False,
            "AttachStdout": False,
            "AttachStderr": False,
            "Tty": False,
            "HostConfig": self.host_config,
        }


def container_spec(
    job: Job, limits: Limits, seccomp: str | None, now: float | None = None
) -> ContainerSpec:
    """The profile of a project's container (see the module docstring for each choice)."""
    now = time.time() if now is None else now
    security = ["no-new-privileges"]
    if seccomp is not None:
        security.append(f"seccomp={seccomp}")
    cpu_seconds = int(limits.timeout) + 10
    expires = now + limits.lifetime
    return ContainerSpec(
        name=container_name(job.directory, job.image, limits),
        image=job.image,
        command=watchdog_command(limits),
        user=f"{job.directory.uid}:{job.directory.gid}",
        working_dir=str(job.directory.path),
        environment=compile_environment(limits, {}),
        labels={
            COMPILE_LABEL: "1",
            PROJECT_LABEL: job.directory.project,
            COMPILE_ID_LABEL: job.compile_id,
            EXPIRES_LABEL: f"{expires:.0f}",
        },
        host_config={
            # The compile dir at the same absolute path as here (latexmk's arguments name it);
            # a bind mount of a missing source fails rather than making an empty dir.
            "Mounts": [
                {
                    "Type": "bind",
                    "Source": str(job.directory.source),
                    "Target": str(job.directory.path),
                    "ReadOnly": False,
                    "BindOptions": {"Propagation": "rprivate"},
                }
            ],
            "NetworkMode": "none",
            "CapDrop": ["ALL"],
            "SecurityOpt": security,
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={limits.tmpfs},mode=1777"},
            "Memory": limits.memory,
            "MemorySwap": limits.memory,
            "PidsLimit": limits.pids,
            "NanoCpus": int(limits.cpus * 1e9),
            "Ulimits": [
                {"Name": "fsize", "Soft": limits.output, "Hard": limits.output},
                {"Name": "nofile", "Soft": limits.nofile, "Hard": limits.nofile},
                {"Name": "cpu", "Soft": cpu_seconds, "Hard": cpu_seconds + 5},
                {"Name": "core", "Soft": 0, "Hard": 0},
            ],
            "LogConfig": {"Type": "none", "Config": {}},
            "IpcMode": "private",
            "AutoRemove": True,
            "Privileged": False,
            "Init": False,
        },
        expires=expires,
    )


def load_seccomp(warn: Callable[[str], None]) -> str | None:
    """Our seccomp allow-list as the JSON text the engine takes; None (the engine's default
    profile) with a warning when it cannot be read."""
    try:
        text = SECCOMP_PROFILE.read_text(encoding="utf-8")
        document = json.loads(text)
        if document.get("defaultAction") != "SCMP_ACT_ERRNO":
            raise ValueError("not an allow-list")
    except (OSError, ValueError) as e:
        warn(
            f"cannot load init/compiles/seccomp.json ({e}); using the engine's default seccomp profile"
        )
        return None
    return json.dumps(document, separators=(",", ":"))


# -- how it ended ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The result of one compile, as `compile --json` prints it."""

    status: Status
    reason: str
    seconds: float = 0.0
    pdf: Path | None = None
    log: Path | None = None
    errors: tuple[str, ...] = ()
    limit: Limit | None = None
    exit_code: int | None = None  # the command's own exit status (the shim passes it back)

    def document(self) -> dict[str, Any]:
        return {
            "status": self.status.name.lower(),
            "exit_status": int(self.status),
            "reason": self.reason,
            "limit": self.limit.value if self.limit is not None else None,
            "pdf": str(self.pdf) if self.pdf is not None else None,
            "log": str(self.log) if self.log is not None else None,
            "seconds": round(self.seconds, 3),
            "errors": list(self.errors),
        }


def first_errors(log_text: str, lines: int = ERROR_LINES) -> tuple[str, ...]:
    """The first error of a TeX log: its `!` line and the lines after it up to the `l.N`
    context, or a `file:line: error` line (-file-line-error)."""
    found: list[str] = []
    all_lines = log_text.splitlines()
    for i, line in enumerate(all_lines):
        if line.startswith("! ") or re.match(r"^[^:\s]+:\d+: ", line):
            for follow in all_lines[i : i + lines]:
                found.append(follow)
                if re.match(r"^l\.\d+ ", follow):
                    break
            break
    return tuple(found[:lines])


_FORK_FAILED = re.compile(r"fork|Resource temporarily unavailable|Cannot allocate", re.IGNORECASE)


@dataclass(frozen=True)
class Ran:
    """What the engine saw of one compile."""

    exit_code: int | None  # None: no exit status (the container was removed)
    seconds: float
    timed_out: bool = False
    oom_killed: bool = False
    stopped_by: int | None = None  # the signal that made the runner stop it
    output: str = ""  # the command's output (its tail)


def largest_file(directory: Path) -> int:
    """Size of the largest regular file under `directory`, links not followed."""
    largest = 0
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                largest = max(largest, info.st_size)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return largest


def regular_file(directory: Path, name: str) -> Path | None:
    """`directory/name` if it is a regular file there (never through a symlink), else None."""
    path = directory / name
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return path if stat.S_ISREG(info.st_mode) else None


def read_text_nofollow(path: Path, limit: int = 4 << 20) -> str:
    """A file's head, opened with O_NOFOLLOW so a planted link cannot redirect it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, limit).decode("latin-1")
    finally:
        os.close(fd)


def limit_hit(ran: Ran, limits: Limits, largest: int, log_text: str) -> Limit | None:
    """Which limit ended the compile, if one did."""
    if ran.stopped_by is not None:
        return Limit.STOPPED
    if ran.timed_out:
        return Limit.TIMEOUT
    if ran.oom_killed:
        return Limit.MEMORY
    if ran.exit_code == 0:
        return None
    if largest >= limits.output:
        return Limit.OUTPUT_SIZE
    if ran.exit_code == 128 + signal.SIGXFSZ:
        return Limit.OUTPUT_SIZE
    if _FORK_FAILED.search(ran.output) or "Cannot fork" in log_text:
        return Limit.PROCESSES
    return None


def limit_message(limit: Limit, limits: Limits, ran: Ran) -> str:
    if limit is Limit.TIMEOUT:
        return f"timeout: the compile ran longer than {limits.timeout:g} s and was stopped"
    if limit is Limit.MEMORY:
        return f"memory: the compile needed more than {limits.memory >> 20} MiB and was killed"
    if limit is Limit.OUTPUT_SIZE:
        return f"output size: the compile wrote a file of {limits.output >> 20} MiB, the limit"
    if limit is Limit.PROCESSES:
        return f"processes: the compile hit the limit of {limits.pids} processes"
    name = signal.Signals(ran.stopped_by).name if ran.stopped_by else "a signal"
    return f"stopped: the runner got {name} and removed the compile's container"


def classify(ran: Ran, job: Job, limits: Limits) -> Outcome:
    """The outcome of a latexmk run of `sharelatex-init compile` (jobname `output`)."""
    directory = job.directory.path
    pdf = regular_file(directory, f"{JOBNAME}.pdf") or regular_file(directory, f"{JOBNAME}.dvi")
    log = regular_file(directory, f"{JOBNAME}.log")
    log_text = read_text_nofollow(log) if log is not None else ""
    limit = limit_hit(ran, limits, largest_file(directory), log_text + ran.output)
    errors = first_errors(log_text)
    common = {"seconds": ran.seconds, "log": log, "errors": errors, "exit_code": ran.exit_code}
    if limit is not None:
        return Outcome(Status.LIMIT, limit_message(limit, limits, ran), limit=limit, **common)  # type: ignore[arg-type]
    if ran.exit_code == 0 and pdf is not None:
        return Outcome(Status.OK, "the PDF is ready", pdf=pdf, **common)  # type: ignore[arg-type]
    if errors:
        reason = f"LaTeX error: {errors[0].removeprefix('! ')}"
    elif ran.exit_code == 0:
        reason = f"latexmk made no {JOBNAME}.pdf (a link or another file type is never taken)"
    else:
        tail = [line for line in ran.output.splitlines() if line.strip()][-3:]
        reason = f"latexmk exited with status {ran.exit_code}: {' / '.join(tail)}"
    return Outcome(Status.LATEX_ERROR, reason, pdf=pdf if ran.exit_code == 0 else None, **common)  # type: ignore[arg-type]


def not_ready_message(image: str, status_file: Path) -> str:
    """Why `image` cannot be used yet: the TeX Live installer's status, or how to get it."""
    from init.core.status_file import texlive_status_path
    from init.texlive.contract import InstallerStatus
    from init.texlive.progress import still_installing

    installer = InstallerStatus.read(texlive_status_path(status_file))
    entry = installer.entry(image) if installer is not None else None
    if entry is not None:
        return still_installing(image, entry)
    return (
        f"TeX Live image {image} is not in the engine; the init installs it in the background "
        f"(see `sharelatex-init status`), or build it with `scripts/build-images --only texlive`"
        f" / `docker pull {image}`"
    )


# -- queue: a number of compiles at once, one per project ------------------------------------


class Queue:
    """flock files in the run dir, shared by every runner and shim process of this user."""

    def __init__(self, run_dir: Path, slots: int) -> None:
        self.run_dir = run_dir
        self.slots = slots

    def prepare(self) -> None:
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.run_dir)
        except OSError as e:
            raise ConfigError(
                [f"{RUN_DIR}={self.run_dir}: cannot make it ({e.strerror}); give a writable dir"]
            ) from e
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(
                [f"{RUN_DIR}={self.run_dir} is not a dir of this user; give a dir it owns"]
            )

    @contextlib.contextmanager
    def turn(self, project: str) -> Iterator[None]:
        """Wait for the project's own turn, then for a free slot."""
        self.prepare()
        with self._lock(self.run_dir / f"project-{project}.lock", block=True):
            for slot in range(self.slots):
                lock = self._lock(self.run_dir / f"slot-{slot}.lock", block=False)
                try:
                    lock.__enter__()
                except BlockingIOError:
                    continue
                try:
                    yield
                finally:
                    lock.__exit__(None, None, None)
                return
            # All busy: queue on one (spread by pid), as flock wakes waiters in turn.
            with self._lock(self.run_dir / f"slot-{os.getpid() % self.slots}.lock", block=True):
                yield

    @staticmethod
    @contextlib.contextmanager
    def _lock(path: Path, block: bool) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)

    def record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"


def read_record(path: Path) -> dict[str, Any]:
    """The runner's note of a project's container (its expiry); {} when none or unreadable."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def write_record(path: Path, document: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


# -- signals while a compile runs ------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    """SIGTERM/SIGINT/SIGHUP recorded, not acted on: the handler only notes the signal and the
    wakeup fd wakes the runner's select; the runner stops the container and then re-raises the
    signal on itself so its caller sees it die of it (Community Edition checks for SIGTERM)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1

    def __enter__(self) -> StopSignals:
        self._previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self.read_fd)
        os.close(self.write_fd)

    def wait(self, done_fd: int, timeout: float) -> bool:
        """Until `done_fd` is readable (True), a stop signal, or the timeout (False)."""
        deadline = time.monotonic() + timeout
        while self.received is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                ready, _, _ = select.select([done_fd, self.read_fd], [], [], left)
            except InterruptedError:
                continue
            if done_fd in ready:
                return True
            if self.read_fd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.read_fd, 64)
        return False


def die_of(signum: int) -> None:
    """End this process by `signum`, as if it had never been caught."""
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)


# -- the runner -----------------------------------------------------------------------------


class Runner:
    """Runs jobs in their project's container through an engine backend."""

    def __init__(
        self,
        settings: Settings,
        backend: Any,  # init.engine.api.DockerBackend (kept out of this module's imports)
        warn: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.warn = warn
        self.queue = Queue(settings.places.run_dir, settings.limits.slots)
        self._seccomp: str | None = None
        self._seccomp_loaded = False

    @property
    def seccomp(self) -> str | None:
        if not self._seccomp_loaded:
            self._seccomp = load_seccomp(self.warn)
            self._seccomp_loaded = True
        return self._seccomp

    def run(self, job: Job, output: Callable[[bytes], None] = lambda chunk: None) -> Ran:
        """Queue, then run `job` in its project's container; the signal that stopped it is in
        `Ran.stopped_by` (the caller decides to die of it)."""
        with self.queue.turn(job.directory.project), StopSignals() as signals:
            if signals.received is not None:
                return Ran(None, 0.0, stopped_by=signals.received)
            container = self._container(job)
            return self._exec(container, job, signals, output)

    def _container(self, job: Job) -> str:
        """The project's running container: the one noted in the run dir while it has time
        left for a whole compile, else a new one (NotReady when the image is missing)."""
        limits = self.settings.limits
        record_path = self.queue.record_path(container_name(job.directory, job.image, limits))
        record = read_record(record_path)
        left = float(record.get("expires", 0)) - time.time()
        if record.get("id") and left > limits.timeout + 2 * KILL_GRACE:
            return str(record["id"])  # no engine call: the exec says if it is gone
        if record.get("id"):
            self.backend.remove(str(record["id"]))
        spec = container_spec(job, limits, self.seccomp)
        try:
            container_id = self.backend.start(spec)
        except self.backend.ImageMissing as e:
            raise NotReady(not_ready_message(job.image, self.settings.status_file)) from e
        write_record(record_path, {"id": container_id, "expires": spec.expires})
        return str(container_id)

    def _forget(self, job: Job) -> None:
        """Drop the note of the project's container (it is gone or being removed)."""
        limits = self.settings.limits
        self.queue.record_path(container_name(job.directory, job.image, limits)).unlink(
            missing_ok=True
        )

    def _exec(
        self, container: str, job: Job, signals: StopSignals, output: Callable[[bytes], None]
    ) -> Ran:
        limits = self.settings.limits
        env = {**compile_environment(limits, job.environment)}
        command = exec_command(job, limits)
        started, began = time.monotonic(), time.time()
        try:
            execution = self.backend.exec(
                container, command, f"{job.directory.uid}:{job.directory.gid}",
                str(job.directory.path), env,
            )  # fmt: skip
        except self.backend.Gone:
            # It ended (idle, lifetime, the engine restarted): start another, once.
            self._forget(job)
            container = self._container(job)
            execution = self.backend.exec(
                container, command, f"{job.directory.uid}:{job.directory.gid}",
                str(job.directory.path), env,
            )  # fmt: skip
        done_r, done_w = os.pipe2(os.O_CLOEXEC)
        tail = bytearray()

        def pump() -> None:
            try:
                for chunk in execution.stream():
                    output(chunk)
                    tail.extend(chunk)
                    del tail[: max(0, len(tail) - 65536)]
            except Exception as e:  # the stream ends with the container; the exit says why
                tail.extend(f"\n(stream ended: {e})".encode())
            finally:
                os.write(done_w, b"x")

        reader = threading.Thread(target=pump, name="compile-output", daemon=True)
        reader.start()
        try:
            finished = signals.wait(done_r, limits.timeout + KILL_GRACE)
        finally:
            os.close(done_r)
        seconds = time.monotonic() - started
        if not finished:
            # A stop signal, or the in-container timeout did not end it: remove the container.
            self.backend.remove(container)
            self._forget(job)
            reader.join(5)
            if not reader.is_alive():  # else it still writes to it: the fd goes with the process
                os.close(done_w)
            return Ran(
                None,
                seconds,
                timed_out=signals.received is None,
                stopped_by=signals.received,
                output=tail.decode(errors="replace"),
            )
        reader.join()
        os.close(done_w)
        exit_code = execution.exit_code()
        text = tail.decode(errors="replace")
        timed_out = exit_code == 128 + signal.SIGKILL and seconds >= limits.timeout - 0.5
        oom = False
        if exit_code not in (0, None) and not timed_out:
            oom = self.backend.oom_killed(container, began)
        if oom or timed_out or limits.idle == 0 or exit_code not in CLEAN_EXITS:
            # A fresh container for the next compile: an OOM flag stays on a container, and
            # an odd exit may have left processes behind (a fork bomb's sleepers).
            self.backend.remove(container)
            self._forget(job)
        return Ran(exit_code, seconds, timed_out=timed_out, oom_killed=oom, output=text)
