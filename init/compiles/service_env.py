"""How the services' compiles reach the sandbox: the shim on their PATH, or their own runner.

Community Edition's compile service runs `latexmk` from its PATH, unsandboxed, and refuses to
start when it sees `SANDBOXED_COMPILES=true` or `DOCKER_RUNNER=true` (its docker runner is not
in the public code since 2026-01-22). So, by default, the init writes a sandboxing `latexmk`
(and the engines, `synctex` and `texcount`: every command it runs on a project's files) into a
dir of its own and puts that dir first on the services' PATH: an unmodified Community Edition
image then compiles every project in a container. An image whose compile service has its own
docker runner (Server Pro's, and Community Edition's before 2026-01-22) gets everything that
runner reads instead (`docker_runner_plan`); the engine proxy holds its containers to the
compile profile and sweeps them (init.proxy).
"""

from __future__ import annotations

import os
import pwd
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from init.compiles.contract import SHIMMED_COMMANDS
from init.compiles.environment import ENVIRONMENT_FILE, write_environment
from init.config import (
    ALL_TEXLIVE_IMAGES,
    ALLOWED_IMAGES,
    COMPILE_RUNNER,
    DEFAULT_SERVICE_USER,
    DOCKER_HOST,
    DOCKER_RUNNER,
    HOST_DIR,
    HOST_DIR_COMPILES,
    HOST_DIR_OUTPUT,
    RUNNER_IMAGE,
    RUNNER_USER,
    SANDBOXED,
    SERVICE_USER,
    SIBLING,
    TEXLIVE_IMAGE,
    Mode,
    Settings,
)
from init.engine.side import CompileWiring
from init.errors import ConfigError

# Where an image keeps its compile service's docker runner (Overleaf 5+, ShareLaTeX 4.x).
DOCKER_RUNNERS = (
    Path("overleaf/services/clsi/app/js/DockerRunner.js"),
    Path("var/www/sharelatex/clsi/app/js/DockerRunner.js"),
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The compile service's document conversions (2026: services/clsi ConversionManager at
# overleaf/overleaf 28ad3b03b71c), each switched on by `=== 'true'`, and what each runs. The
# shim leaves them alone (init.compiles.shim says why); the log says they run unsandboxed.
CONVERSIONS = {
    "ENABLE_PANDOC_CONVERSIONS": ("pandoc", "zip"),
    "ENABLE_PDF_CONVERSIONS": ("pdftocairo",),
}
# What a compile needs of the services' environment, also for `sharelatex-init compile` run by
# hand in the container (`docker exec`), which the init's environment never reaches.
SHARED_VARIABLES = (
    DOCKER_HOST,
    HOST_DIR_COMPILES,
    HOST_DIR_OUTPUT,
    TEXLIVE_IMAGE,
    ALL_TEXLIVE_IMAGES,
)
HOST_DIRS = (HOST_DIR, HOST_DIR_COMPILES, HOST_DIR_OUTPUT)

# (user name) -> (uid, gid); KeyError when there is no such user.
UserIds = Callable[[str], tuple[int, int]]


def passwd_ids(name: str) -> tuple[int, int]:
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@dataclass(frozen=True)
class RunnerChoice:
    """Which runner the services' compiles go through, and why (for the log and `doctor`)."""

    runner: str  # shim or docker
    why: str
    found: Path | None = None  # the image's DockerRunner.js, if it has one


def docker_runner_file(root: Path = Path("/")) -> Path | None:
    """The image's compile service's docker runner, when it has one."""
    return next((root / p for p in DOCKER_RUNNERS if (root / p).is_file()), None)


def choose(settings: Settings, root: Path = Path("/")) -> RunnerChoice:
    """The configured runner, or for `auto` the services' own docker runner when the image
    has one (Server Pro, Community Edition before 2026-01-22), else the shim."""
    found = docker_runner_file(root)
    if settings.compile_runner != "auto":
        return RunnerChoice(
            settings.compile_runner, f"{COMPILE_RUNNER}={settings.compile_runner}", found
        )
    if found is not None:
        return RunnerChoice("docker", f"auto: the image's compile service has {found}", found)
    return RunnerChoice(
        "shim",
        "auto: the image's compile service has no DockerRunner.js (Community Edition since "
        "2026-01-22 refuses DOCKER_RUNNER=true)",
    )


def choose_runner(settings: Settings, root: Path = Path("/")) -> str:
    """`shim` or `docker` (see `choose`)."""
    return choose(settings, root).runner


@dataclass(frozen=True)
class DockerRunnerPlan:
    """What the services' own docker runner is given, and what the log should say of it."""

    environment: dict[str, str]
    user: str  # TEXLIVE_IMAGE_USER: uid:gid of the services' user, the compile dirs' owner
    host_dir_compiles: str
    notes: tuple[str, ...] = ()  # an operator's value replaced, and why


def docker_runner_plan(
    settings: Settings, environ: Mapping[str, str], users: UserIds = passwd_ids
) -> DockerRunnerPlan:
    """Everything DockerRunner.js and its settings read (services/clsi/app/js/DockerRunner.js
    and config/settings.defaults.js at overleaf/overleaf f461dcc9): `environ` is the services'
    environment with the engine side's variables (DOCKER_HOST, in sibling mode the host dirs)
    and the init's own. ConfigError when the runner could not work with it."""
    images = settings.all_texlive_images
    env = {
        DOCKER_RUNNER: "true",
        SANDBOXED: "true",
        # The runner takes TEXLIVE_IMAGE before TEX_LIVE_DOCKER_IMAGE: both name the same.
        RUNNER_IMAGE: settings.texlive_image,
        ALLOWED_IMAGES: " ".join(images),  # the runner splits it on spaces
    }
    notes = []
    given_image = environ.get(RUNNER_IMAGE, "").strip()
    if given_image and given_image != settings.texlive_image:
        notes.append(
            f"{RUNNER_IMAGE}={given_image} replaced by {settings.texlive_image} (choose the "
            f"image with {TEXLIVE_IMAGE} and {ALL_TEXLIVE_IMAGES})"
        )
    user = runner_user(environ, users)
    env[RUNNER_USER] = user
    given_user = environ.get(RUNNER_USER, "").strip()
    if given_user and given_user != user:
        notes.append(
            f"{RUNNER_USER}={given_user} replaced by {user}: the compile service makes each "
            "compile dir as its own user, and only that user can write there"
        )
    if settings.mode is Mode.SIBLING:
        env[SIBLING] = "true"
        compiles = environ.get(HOST_DIR_COMPILES, "").strip()
        if not compiles:
            # The runner's settings throw 'SANDBOXED_COMPILES enabled, but
            # SANDBOXED_COMPILES_HOST_DIR_COMPILES not set': never start it without one.
            raise ConfigError(
                [
                    f"the compile service's docker runner needs {HOST_DIR_COMPILES}, and the "
                    f"host's path of {settings.compiles_dir} is not known; mount the data dir "
                    f"from the host, or give --env {HOST_DIR_COMPILES}=<the host's path>"
                ]
            )
        output = environ.get(HOST_DIR_OUTPUT, "").strip()
    else:
        # Docker-in-docker: the inner engine sees this container's own filesystem.
        compiles, output = str(settings.compiles_dir), str(settings.output_dir)
        env[HOST_DIR] = compiles
    env[HOST_DIR_COMPILES] = compiles
    if output:
        env[HOST_DIR_OUTPUT] = output
    return DockerRunnerPlan(env, user, compiles, tuple(notes))


def runner_user(environ: Mapping[str, str], users: UserIds = passwd_ids) -> str:
    """`uid:gid` of the services' user: the compile service makes compile dirs as that user
    (www-data, 33:33, in Overleaf's images), so its containers must run as that user too.
    ConfigError when the user is unknown or root (the engine proxy refuses root)."""
    name = environ.get(SERVICE_USER, "").strip() or DEFAULT_SERVICE_USER
    try:
        uid, gid = users(name)
    except KeyError:
        raise ConfigError(
            [
                f"{SERVICE_USER}={name!r} is no user in this image; the compile service's "
                "docker runner must run compiles as the services' user (e.g. www-data)"
            ]
        ) from None
    if uid == 0 or gid == 0:
        raise ConfigError(
            [
                f"{SERVICE_USER}={name!r} is root (uid {uid}, gid {gid}): compiles never run as "
                "root; run the services as their own user (e.g. www-data)"
            ]
        )
    return f"{uid}:{gid}"


def shim_script(
    python: str, command: str, directory: Path | None = None, broker: Path | None = None
) -> str:
    """The script for `command`. Given the broker's socket: the broker's thin client, started
    isolated (`-I -S`: no site-packages, no environment variable of Python's; the package by
    its own path), as the whole cost of a compile's start. Else the shim module; given the dir
    it is written to, it names the compile settings written beside it
    (init.compiles.environment)."""
    if broker is not None:
        package_root = Path(__file__).resolve().parents[2]
        code = (
            f"import sys; sys.path.insert(0, {str(package_root)!r}); "
            "from init.compiles.client import main; sys.exit(main())"
        )
        return (
            f"#!/bin/sh\nexec {python} -I -S -c {shlex.quote(code)} --socket "
            f'{shlex.quote(str(broker))} {command} "$@"\n'
        )
    settings = f" --environment {directory / ENVIRONMENT_FILE}" if directory is not None else ""
    return f'#!/bin/sh\nexec {python} -m init.compiles.shim{settings} {command} "$@"\n'


def write_shims(directory: Path, python: str, broker: Path | None = None) -> None:
    """One small script per command in `directory` (replaced whole: never half-written)."""
    directory.mkdir(parents=True, exist_ok=True)
    for command in SHIMMED_COMMANDS:
        target = directory / command
        tmp = directory / f".{command}.tmp"
        tmp.write_text(shim_script(python, command, directory, broker))
        tmp.chmod(0o755)
        os.replace(tmp, target)


def unsandboxed_conversions(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The commands of the compile service's conversions that are on: they run outside the
    sandbox."""
    on = [commands for name, commands in CONVERSIONS.items() if environ.get(name) == "true"]
    return tuple(command for commands in on for command in commands)


def describe_shim(shim_dir: Path, unsandboxed: tuple[str, ...]) -> str:
    """The log's `the services compile through ...` for the shim."""
    *first, last = SHIMMED_COMMANDS
    text = f"the sandboxing {', '.join(first)} and {last} in {shim_dir}"
    if unsandboxed:
        switches = [name for name, commands in CONVERSIONS.items() if commands[0] in unsandboxed]
        text += (
            f"; the document conversions ({', '.join(f'{n}=true' for n in switches)}) run "
            f"{', '.join(unsandboxed)} OUTSIDE the sandbox: unset them to keep every command "
            "on a project's files sandboxed"
        )
    return text


def describe_docker_runner(choice: RunnerChoice, plan: DockerRunnerPlan | None) -> str:
    """The log's `the services compile through ...` for their own docker runner."""
    text = f"their own docker runner, DockerRunner.js ({choice.why})"
    if choice.found is None:
        text += (
            "; this image has no DockerRunner.js: its compile service will refuse "
            f"DOCKER_RUNNER=true and exit at start ({COMPILE_RUNNER}=auto picks what works)"
        )
    if plan is not None:
        text += (
            f"; its containers run as {RUNNER_USER}={plan.user} (the compile dirs' owner), "
            f"bind {plan.host_dir_compiles}/<project>, and the engine proxy holds them to the "
            "compile profile and removes them once idle"
        )
        text += "".join(f"; {note}" for note in plan.notes)
    return text


def environment(
    settings: Settings,
    environ: Mapping[str, str],
    runner: str,
    shim_dir: Path,
    users: UserIds = passwd_ids,
) -> dict[str, str]:
    """What the services' environment gains for sandboxed compiles, on top of the engine
    side's own variables (DOCKER_HOST; in sibling mode the host dirs), which `environ` holds."""
    images = settings.all_texlive_images
    env = {
        TEXLIVE_IMAGE: settings.texlive_image,
        ALL_TEXLIVE_IMAGES: ",".join(images),
    }
    if runner == "docker":
        return {**env, **docker_runner_plan(settings, environ, users).environment}
    env["PATH"] = f"{shim_dir}:{environ.get('PATH') or DEFAULT_PATH}"
    if settings.mode is Mode.DIND:
        # The shim binds this container's own paths in docker-in-docker: an operator's host
        # dir would send the inner engine a path it does not have (config warns of it).
        env.update({name: "" for name in HOST_DIRS if environ.get(name)})
    return env


class ServicesCompile(CompileWiring):
    """The services' way to compile sandboxed, as the engine side wires it in: the shim first
    on their PATH, or the variables of their own docker runner."""

    shared = SHARED_VARIABLES

    def __init__(
        self,
        settings: Settings,
        shim_dir: Path,
        python: str,
        root: Path = Path("/"),
        users: UserIds = passwd_ids,
        broker: Path | None = None,  # the compile broker's socket: the shims are its clients
    ):
        self.broker = broker
        self.settings = settings
        self.shim_dir = shim_dir
        self.python = python
        self.choice = choose(settings, root)
        self.runner = self.choice.runner
        self.users = users
        self.unsandboxed: tuple[str, ...] = ()
        self.plan: DockerRunnerPlan | None = None

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        if self.runner == "shim":
            write_shims(self.shim_dir, self.python, self.broker)
            self.unsandboxed = unsandboxed_conversions(environ)
        else:
            self.plan = docker_runner_plan(self.settings, environ, self.users)
        return environment(self.settings, environ, self.runner, self.shim_dir, self.users)

    def describe(self) -> str:
        if self.runner == "shim":
            return f"{describe_shim(self.shim_dir, self.unsandboxed)} ({self.choice.why})"
        return describe_docker_runner(self.choice, self.plan)

    def publish(self, compile_environment: Mapping[str, str]) -> None:
        write_environment(self.shim_dir, compile_environment)
