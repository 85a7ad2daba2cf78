"""`sharelatex-init compile DIR`: compile one project in its sandbox, and say how it went.

  sharelatex-init compile DIR [--main main.tex] [--engine pdflatex|xelatex|lualatex|latex]
                              [--image IMAGE] [--timeout S] [--project ID] [--json]

Runs `latexmk -cd -jobname=output -auxdir=DIR -outdir=DIR ... DIR/MAIN` (what Community
Edition's compile service runs) in the project's sandbox container, through the compile broker
(init.broker: this command is its client; `answer` is the broker's side); the
PDF and the log are left in DIR as `output.pdf` and `output.log`. DIR under the compiles root
(OVERLEAF_INIT_COMPILES_DIR, default /var/lib/sharelatex/data/compiles) is bound from the
sibling host dir when SANDBOXED_COMPILES_HOST_DIR_COMPILES is set; any other DIR is bound as it
is (by hand, with DOCKER_HOST an engine on the same machine). The project id is --project, else
DIR's name.

Exit status (init.compiles.contract.Status):
  0   the PDF is there
  1   LaTeX error (the first error lines of the log follow)
  2   a sandbox limit was hit: timeout, memory, processes, output size or disk (named)
  69  the engine cannot be reached, or no compile broker answers (its socket is named)
  73  the disk of DIR (or of the output dir) is full, of space or inodes (named, with its room)
  75  the TeX Live image is not in the engine yet (the installer's progress, when it has some)
  78  configuration (one line: the variable or option, the value, the fix)

With --json, one JSON object on stdout, always, whatever the exit status; these keys are
stable (machine callers, e.g. the HTTP compile service, rely on them):

  status       "ok" | "latex_error" | "limit" | "not_ready" | "config" | "engine" | "no_space"
  exit_status  the process's exit status (0, 1, 2, 69, 73, 75, 78)
  reason       one line for a person: what happened and, for a problem, the fix
  limit        "timeout" | "memory" | "processes" | "output size" | "disk" | "stopped" | null
  pdf          absolute path of output.pdf (a regular file, never a link) or null
  log          absolute path of output.log or null
  seconds      wall-clock seconds of the compile itself (0 when it did not run)
  errors       list of the first error lines of the log (empty when none)
  project      the project id used
  compile_id   this compile's id (also the container label sharelatex-init.compile-id)
  written      limit "disk": {"bytes", "files", "seen_after", "stopped_after"}, what the
               compile had added to DIR when it was stopped (all removed since), and the
               seconds until it was seen past its budget and until its processes had ended;
               else null
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from init.compiles.contract import DEFAULT_ENGINE, ENGINES, Status
from init.errors import EX_CONFIG, ConfigError, EngineError, InitError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the CLI imports this)
if TYPE_CHECKING:
    from typing import Any, TextIO

    from init.compiles.outcome import Outcome, Ran
    from init.compiles.profile import Job
    from init.compiles.settings import CompileSettings
    from init.config import UidRange


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """`compile` under the CLI's subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "compile",
        help="compile a project dir in its sandbox (exit 0 PDF, 1 LaTeX error, 2 limit, "
        "75 not ready, 78 config)",
    )
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR", help="the project's compile dir")
    parser.add_argument("--main", default="main.tex", help="the root file (default main.tex)")
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE, help="TeX engine")
    parser.add_argument("--image", help="a TeX Live image of ALL_TEX_LIVE_DOCKER_IMAGES")
    parser.add_argument("--timeout", type=float, help="seconds (default: the configured limit)")
    parser.add_argument("--project", help="the project id (default: DIR's name)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (see docs)")


def run(options: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The `compile` command, as a client of the compile broker (init.compiles.client): its exit
    status; the result on stdout (text or JSON) as the broker made it. No broker answering:
    69, with one line (or, with --json, the one JSON object) naming its socket."""
    from init.compiles.client import DEFAULT_WAIT, call
    from init.compiles.environment import with_init_environment
    from init.compiles.messages import CommandRequest
    from init.compiles.settings import broker_socket
    from init.core import status_file

    try:  # inside the site's container: compile as its services do
        path = status_file.status_path(environ, getattr(options, "status_file", None))
        document = status_file.read(path)
        environ = with_init_environment(environ, document.compile_environment)
    except (OSError, ValueError):
        pass  # no init running here: by hand on a host
    try:
        check_locally(options, environ)
    except ConfigError as e:
        failed = _failure(Status.CONFIG, "\n".join(e.problems))
        return _report(options, failed, options.project, "", sys.stdout, sys.stderr)
    request = CommandRequest(
        directory=os.path.abspath(options.directory), main=options.main, engine=options.engine,
        image=options.image, timeout=options.timeout, project=options.project,
        json=options.json, env=dict(environ),
    )  # fmt: skip

    def down(line: str) -> int:
        if not options.json:
            print(f"compile: {line}", file=sys.stderr)
            return int(Status.ENGINE)
        failed = _failure(Status.ENGINE, line)
        return _report(options, failed, options.project, "", sys.stdout, sys.stderr)

    sys.stdout.flush()
    return call(str(broker_socket(environ)), request, DEFAULT_WAIT, down=down)


def check_locally(options: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """What can be refused without the broker, at once and by name (ConfigError): the site's
    compile settings as this environment has them (the broker reads the same at its start),
    and the options that do not depend on the dir."""
    from init.compiles.paths import check_project_id
    from init.compiles.profile import latexmk_command
    from init.compiles.settings import settings_from_env

    settings_from_env(environ)
    if options.project is not None:
        check_project_id(options.project)
    if options.timeout is not None and options.timeout < 1:
        raise ConfigError([f"--timeout {options.timeout:g}: give at least 1 second"])
    latexmk_command(Path("/"), options.main, options.engine)


def answer(
    options: argparse.Namespace,
    environ: Mapping[str, str],
    load: Callable[[], tuple[CompileSettings, UidRange]],
    execute: Callable[[CompileSettings, Job], Ran],
    out: TextIO,
    err: TextIO,
) -> tuple[int, int | None]:
    """The compile `options` ask for, run by `execute` with the settings `load` gives: its
    exit status and the signal to die of (a stop); the report written to `out` and `err`."""
    from init.compiles.outcome import NotReady, classify
    from init.compiles.paths import compile_dir
    from init.compiles.profile import Job, latexmk_command
    from init.compiles.settings import check_image

    project = options.project
    compile_id = ""
    try:
        settings, ids = load()
        if options.timeout is not None:
            if options.timeout < 1:
                raise ConfigError([f"--timeout {options.timeout:g}: give at least 1 second"])
            limits = dataclasses.replace(settings.limits, timeout=options.timeout)
            settings = dataclasses.replace(settings, limits=limits)
        image = check_image(options.image, settings)
        directory = compile_dir(options.directory, settings.places, options.project, ids)
        project = directory.project
        command = latexmk_command(directory.path, options.main, options.engine)
        job = Job(directory, command, image, environ)
        compile_id = job.compile_id
        ran = execute(settings, job)
        outcome = classify(ran, job, settings.limits)
    except ConfigError as e:
        failed = _failure(Status.CONFIG, "\n".join(e.problems))
        return _report(options, failed, project, "", out, err), None
    except NotReady as e:
        return _report(options, _failure(Status.NOT_READY, str(e)), project, "", out, err), None
    except EngineError as e:
        failed = _failure(Status.ENGINE, str(e))
        return _report(options, failed, project, compile_id, out, err), None
    return _report(options, outcome, project, compile_id, out, err), ran.stopped_by


def _failure(status: Status, reason: str) -> Outcome:
    from init.compiles.outcome import Outcome

    return Outcome(status, reason)


def _report(
    options: argparse.Namespace,
    outcome: Outcome,
    project: str | None,
    compile_id: str,
    out: TextIO,
    err: TextIO,
) -> int:
    code = int(outcome.status)
    if options.json:
        document = outcome.document()
        document.update(project=project, compile_id=compile_id or None, exit_status=code)
        print(json.dumps(document), file=out)
        return code
    stream = out if outcome.status is Status.OK else err
    for line in outcome.reason.splitlines():
        print(f"compile: {line}", file=stream)
    if outcome.status is Status.OK and outcome.pdf is not None:
        print(f"compile: {outcome.pdf} ({outcome.seconds:.2f} s)", file=stream)
    for line in outcome.errors if outcome.status is not Status.OK else ():
        print(f"  {line}", file=stream)
    if outcome.log is not None and outcome.status is not Status.OK:
        print(f"compile: the log is {outcome.log}", file=stream)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m init.compiles.command")
    configure(parser)
    options = parser.parse_args(argv)
    try:
        return run(options, os.environ)
    except InitError as e:
        print(f"compile: {e}", file=sys.stderr)
        return e.exit_status if e.exit_status else EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())
