"""How the services' compiles reach the sandbox: the shim on their PATH, or their own runner.

Community Edition's compile service runs `latexmk` from its PATH, unsandboxed, and refuses to
start when it sees `SANDBOXED_COMPILES=true` or `DOCKER_RUNNER=true` (its docker runner is not
in the public code). So, by default, the init writes a sandboxing `latexmk` (and the engines,
`synctex` and `texcount`: every command it runs on a project's files) into a dir of its own
and puts that dir first on the services' PATH: an unmodified Community Edition image then
compiles every project in a container. A Server Pro style image that has its own docker runner
gets the variables that runner reads instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from init.compiles.contract import SHIMMED_COMMANDS
from init.compiles.environment import ENVIRONMENT_FILE, write_environment
from init.config import (
    ALL_TEXLIVE_IMAGES,
    ALLOWED_IMAGES,
    DOCKER_HOST,
    DOCKER_RUNNER,
    HOST_DIR_COMPILES,
    HOST_DIR_OUTPUT,
    SANDBOXED,
    SIBLING,
    TEXLIVE_IMAGE,
    Mode,
    Settings,
)
from init.engine.side import CompileWiring

# Where a Server Pro style image keeps its compile service's docker runner.
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


def choose_runner(settings: Settings, root: Path = Path("/")) -> str:
    """`shim` or `docker`: the configured one, or for `auto` the services' own docker runner
    when the image has one."""
    if settings.compile_runner != "auto":
        return settings.compile_runner
    return "docker" if any((root / p).is_file() for p in DOCKER_RUNNERS) else "shim"


def shim_script(python: str, command: str, directory: Path | None = None) -> str:
    """The script for `command`; given the dir it is written to, it names the compile settings
    written beside it (init.compiles.environment)."""
    settings = f" --environment {directory / ENVIRONMENT_FILE}" if directory is not None else ""
    return f'#!/bin/sh\nexec {python} -m init.compiles.shim{settings} {command} "$@"\n'


def write_shims(directory: Path, python: str) -> None:
    """One small script per command in `directory` (replaced whole: never half-written)."""
    directory.mkdir(parents=True, exist_ok=True)
    for command in SHIMMED_COMMANDS:
        target = directory / command
        tmp = directory / f".{command}.tmp"
        tmp.write_text(shim_script(python, command, directory))
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


def environment(
    settings: Settings, environ: Mapping[str, str], runner: str, shim_dir: Path
) -> dict[str, str]:
    """What the services' environment gains for sandboxed compiles (on top of DOCKER_HOST and
    the host dirs, which the engine side sets)."""
    images = settings.all_texlive_images
    env = {
        TEXLIVE_IMAGE: settings.texlive_image,
        ALL_TEXLIVE_IMAGES: ",".join(images),
    }
    if runner == "docker":
        # What a docker runner of the compile service reads; ALLOWED_IMAGES is space-separated.
        env[DOCKER_RUNNER] = "true"
        env[SANDBOXED] = "true"
        env[ALLOWED_IMAGES] = " ".join(images)
        if settings.mode is Mode.SIBLING:
            env[SIBLING] = "true"
        return env
    env["PATH"] = f"{shim_dir}:{environ.get('PATH') or DEFAULT_PATH}"
    return env


class ServicesCompile(CompileWiring):
    """The services' way to compile sandboxed, as the engine side wires it in: the shim first
    on their PATH, or the variables of their own docker runner."""

    shared = SHARED_VARIABLES

    def __init__(self, settings: Settings, shim_dir: Path, python: str, root: Path = Path("/")):
        self.settings = settings
        self.shim_dir = shim_dir
        self.python = python
        self.runner = choose_runner(settings, root)
        self.unsandboxed: tuple[str, ...] = ()

    def environment(self, environ: Mapping[str, str]) -> dict[str, str]:
        if self.runner == "shim":
            write_shims(self.shim_dir, self.python)
            self.unsandboxed = unsandboxed_conversions(environ)
        return environment(self.settings, environ, self.runner, self.shim_dir)

    def describe(self) -> str:
        if self.runner == "shim":
            return describe_shim(self.shim_dir, self.unsandboxed)
        return "their docker runner"

    def publish(self, compile_environment: Mapping[str, str]) -> None:
        write_environment(self.shim_dir, compile_environment)
