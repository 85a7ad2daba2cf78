"""The compile-command shim: `python -m init.compiles.shim COMMAND ARGS...`, first on the
compile service's PATH through `/run/sharelatex-init/shim/<command>` (init.compiles.service_env).

Community Edition's compile service (services/clsi, LocalCommandRunner) spawns each command by
name from PATH, cwd the compile dir, in its own process group, stdin and stdout piped, stderr
to /dev/null, with no timeout of its own; a stop SIGTERMs the group. The shim runs the same
command in the project's sandbox container (through the compile broker), the dir bound at the
same absolute path (in sibling mode from the host path), its output copied to ours.

What it runs (contract.SHIMMED_COMMANDS): every command the service's CompileManager runs on a
project's files, at overleaf/overleaf 28ad3b03b71c:
  latexmk   (LatexRunner) and the engines;
  synctex   `synctex view -i L:C:DIR/FILE -o DIR/output.pdf`,
            `synctex edit -o P:H:V:DIR/output.pdf`: run where the PDF it names is (DIR, the
            compile dir: synctex reads output.synctex.gz beside it), even when the service's
            cwd is the build's copy under the output dir (compile group `synctex-output`);
            without an absolute -o, in the cwd;
  texcount  `texcount -nocol -inc DIR/main.tex` (the word count).
Not shimmed: chktex is run, if at all, by latexmk inside the sandbox (the service only sets
CHKTEX_* for it). The document conversions of 2026 (ConversionManager: pandoc, zip, pdftocairo;
off unless ENABLE_PANDOC_CONVERSIONS / ENABLE_PDF_CONVERSIONS is true) are left alone: a shim
by their names would shadow them for every service (filestore runs pdftocairo for previews),
they need images of their own, and the second zip writes beside its dir, outside any one bind.
When they are on, the init says at start that they run outside the sandbox (service_env).

Exit status, as the service reads it (1 is its `exited` error; any other is success, and the
compile's status then goes by output.pdf: `success`, else `failure`):
  the command ended        its own status, as is;
  a stop (SIGTERM to the   the container removed, then the shim dies of the signal: the
    group, SIGINT, SIGHUP)   service reports `terminated`;
  a sandbox limit: time,   a note in the compile's log (init.compiles.log_note: a `!` line the
    memory, processes,       editor shows as an error, e.g. `! sharelatex-init: the compile was
    output size              stopped after 180 s (the site's compile time limit).`); after a
                             kill (time, memory, size) a half-written output.pdf is removed, so
                             it cannot read as a success; the command's status when it is 2 or
                             more, else 137 (killed): the service reports `failure`, never a
                             silent success;
  not run                  the reason on stderr (and, for a compile, in its log); 75 (try again
                             later: no engine or no image yet) or 78 (configuration). The
                             command is never run outside the sandbox.

Where it runs: in the compile broker (init.broker), whose thin client the shim is
(init.compiles.client: the shims PID 1 writes run it under `python3 -I -S`; `main` here is the
same client for `python -m init.compiles.shim`). `answer` is the broker's side: the command's
compile dir, its job, the outcome of its run, the log note. A stop signal to the client is sent
on as a stop, and the client dies of it; a client that is SIGKILLed, or whose caller is, stops
its compile at once (the broker sees its connection close, or its parent's pidfd).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from init.compiles import log_note
from init.compiles.contract import ENGINES, SHIMMED_COMMANDS, Limit
from init.compiles.environment import read_environment, with_init_environment
from init.compiles.outcome import NotReady, Ran, largest_file, limit_hit, read_text_nofollow
from init.compiles.paths import CompileDir, compile_dir
from init.compiles.profile import Job
from init.compiles.settings import CompileSettings, Limits
from init.config import UidRange
from init.errors import EX_CONFIG, EX_TEMPFAIL, ConfigError, EngineError

# The commands that write a TeX log: a limit or a refusal is noted there for the user.
COMPILES = ("latexmk", *ENGINES)
# Limits that kill the compile mid-write: what it left of the PDF is not a result.
KILLING_LIMITS = (Limit.TIMEOUT, Limit.MEMORY, Limit.OUTPUT_SIZE, Limit.DISK)
KILLED = 128 + signal.SIGKILL


def synctex_pdf(argv: Sequence[str]) -> str | None:
    """The PDF a `synctex view|edit` command line names with -o (edit: `P:H:V:PATH`)."""
    args = list(argv[1:])
    if not args or args[0] not in ("view", "edit"):
        return None
    value = None
    for i, arg in enumerate(args[:-1]):
        if arg == "-o":
            value = args[i + 1]
    if value is None:
        return None
    if args[0] == "edit":
        parts = value.split(":", 3)
        return parts[3] if len(parts) == 4 else None
    return value


def work_dir(command: str, argv: Sequence[str], cwd: Path) -> Path:
    """The dir bound into the sandbox: for synctex the PDF's own dir (the .synctex.gz beside
    it is what it reads), else the cwd, as the service gave it."""
    if command == "synctex":
        pdf = synctex_pdf(argv)
        if pdf is not None and os.path.isabs(pdf):
            return Path(os.path.dirname(pdf))
    return cwd


def limit_reached(
    ran: Ran, limits: Limits, directory: CompileDir, log: Path | None
) -> Limit | None:
    """Which sandbox limit ended the command, if one did."""
    if ran.exit_code == 0 and not (ran.timed_out or ran.oom_killed or ran.budget):
        return None
    # The dir walk and the log only for a compile: a file of the limit's size is its doing.
    largest = largest_file(directory.path) if log is not None else 0
    log_text = read_text_nofollow(log) if log is not None else ""
    return limit_hit(ran, limits, largest, log_text + ran.output)


def compile_log(command: str, argv: Sequence[str], directory: CompileDir) -> Path | None:
    """The TeX log of a compile command, when it is in the bound dir (else None: no note)."""
    if command not in COMPILES:
        return None
    place = log_note.log_place(argv, directory.path)
    if place is None or os.path.realpath(place[0]) != str(directory.path):
        return None
    return directory.path / f"{place[1]}.log"


def note(log: Path | None, directory: CompileDir | None, line: str, detail: str = "") -> None:
    if log is not None and directory is not None:
        owner = (directory.uid, directory.gid)
        log_note.append(log.parent, log.name, log_note.render(line, detail), owner)


def answer(
    argv: Sequence[str],
    environ: Mapping[str, str],
    cwd: str,
    settings: CompileSettings,
    ids: UidRange,
    execute: Callable[[Job], Ran],
    say: Callable[[str], None],
) -> tuple[int, int | None]:
    """Run `argv` with `execute` (the broker's run of a Job): the exit status and the signal
    to die of (a stop), its lines for stderr given to `say`."""

    def fail(message: str, status: int) -> int:
        say(f"sharelatex-init shim: {message}")
        return status

    if not argv or os.path.basename(argv[0]) not in SHIMMED_COMMANDS:
        usage = f"python -m init.compiles.shim {{{','.join(SHIMMED_COMMANDS)}}} ARGS..."
        return fail(f"usage: {usage}", EX_CONFIG), None
    command = os.path.basename(argv[0])
    directory: CompileDir | None = None
    log: Path | None = None
    try:
        directory = compile_dir(work_dir(command, argv, Path(cwd)), settings.places, ids=ids)
        log = compile_log(command, argv, directory)
        job = Job(directory, (command, *argv[1:]), settings.image, environ)
        ran = execute(job)
    except ConfigError as e:
        reason = "; ".join(e.problems)
        note(log, directory, "the compile did not run: the site's sandbox is misconfigured.",
             "Tell the site's administrator: " + reason)  # fmt: skip
        return fail(f"{reason} (the command was not run)", EX_CONFIG), None
    except NotReady as e:
        note(log, directory, "the compile did not run: the TeX Live image is not ready yet.",
             f"Try again in a few minutes. ({e})")  # fmt: skip
        return fail(f"{e} (the command was not run; try again later)", EX_TEMPFAIL), None
    except EngineError as e:
        note(log, directory, "the compile did not run: its sandbox cannot be reached.",
             "Try again later; if it persists, tell the site's administrator.")  # fmt: skip
        return fail(f"{e} (the command was not run: never outside the sandbox)", EX_TEMPFAIL), None
    if ran.stopped_by is not None:
        return KILLED, ran.stopped_by
    limit = limit_reached(ran, settings.limits, directory, log)
    if limit is None:
        return (ran.exit_code if ran.exit_code is not None else KILLED), None
    line, detail = log_note.stop_reason(limit, settings.limits)
    fail(line, 0)
    if log is not None:
        note(log, directory, line, detail)
        if limit in KILLING_LIMITS:
            log_note.remove(log.parent, f"{log.stem}.pdf")
    code = ran.exit_code
    return (code if code is not None and code > 1 else KILLED), None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m init.compiles.shim COMMAND ARGS...`: the command sent to the compile broker
    (init.compiles.client), whose socket is config.COMPILE_BROKER_SOCKET or beside the status
    file. The shims PID 1 writes run the client itself, under `python3 -I -S`."""
    from init.compiles.client import DEFAULT_WAIT, call
    from init.compiles.messages import ShimRequest
    from init.compiles.settings import broker_socket

    args = list(sys.argv[1:] if argv is None else argv)
    environ: Mapping[str, str] = os.environ
    if args[:1] == ["--environment"] and len(args) > 1:
        # The init's compile settings (written beside the shims: the services' environment
        # does not carry the init's own variables); the services' own environment wins.
        environ = with_init_environment(os.environ, read_environment(Path(args[1])))
        args = args[2:]
    request = ShimRequest(tuple(args), os.getcwd(), dict(os.environ))
    return call(str(broker_socket(environ)), request, DEFAULT_WAIT, who="sharelatex-init shim")


if __name__ == "__main__":
    sys.exit(main())
