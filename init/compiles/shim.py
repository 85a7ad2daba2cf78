"""The compile-command shim: `python -m init.compiles.shim latexmk ARGS...` (also pdflatex, xelatex,
lualatex, latex), first on the compile service's PATH through `/run/sharelatex-init/shim/<cmd>`.

Community Edition's compile service (services/clsi, LocalCommandRunner) spawns
`latexmk -cd -jobname=output -auxdir=DIR -outdir=DIR ... DIR/main.tex` by name from PATH, with
the compile dir as its cwd, in its own process group; on timeout it SIGTERMs the group, and it
treats exit status 1 specially. This runs exactly that command in the project's sandbox
container (init.compiles.runner), with the cwd bound at the same absolute path (in sibling mode
from the host path), its output copied to ours, and its exit status passed back as is.

Ending: SIGTERM, SIGINT or SIGHUP removes the container, then the shim dies of that signal (the
service checks for SIGTERM). The caller's death is noticed through PR_SET_PDEATHSIG (a SIGTERM
when the parent goes), and a SIGKILLed shim cannot clean up at all, so the container does not
rely on it: the compile runs under `timeout -s KILL` inside it, and its PID 1 ends it after the
idle time (init.compiles.profile). The shim never runs the command unsandboxed: no engine, no
image or a bad setting is a message on stderr and exit 75 (try again later) or 78
(configuration).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from init.compiles.contract import SHIMMED_COMMANDS
from init.compiles.outcome import NotReady
from init.compiles.paths import compile_dir
from init.compiles.profile import Job
from init.compiles.runner import Runner, die_of, engine_backend
from init.compiles.settings import settings_from_env
from init.errors import EX_CONFIG, EX_TEMPFAIL, ConfigError, EngineError

PR_SET_PDEATHSIG = 1


def follow_parent(parent: int) -> None:
    """SIGTERM to us when the process that started us ends (SIGKILL included)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the prctl took: nobody waits for us
        os.kill(os.getpid(), signal.SIGTERM)


def fail(message: str, status: int) -> int:
    print(f"sharelatex-init shim: {message}", file=sys.stderr, flush=True)
    return status


def warn(line: str) -> None:
    print(f"sharelatex-init shim: warning: {line}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], environ: Mapping[str, str], cwd: str) -> int:
    """Run `argv` (a shimmed command and its arguments) in the sandbox; its exit status."""
    if not argv or os.path.basename(argv[0]) not in SHIMMED_COMMANDS:
        usage = f"python -m init.compiles.shim {{{','.join(SHIMMED_COMMANDS)}}} ARGS..."
        return fail(f"usage: {usage}", EX_CONFIG)
    try:
        settings = settings_from_env(environ)
        directory = compile_dir(Path(cwd), settings.places)
        job = Job(directory, (os.path.basename(argv[0]), *argv[1:]), settings.image, environ)
        backend = engine_backend(settings, environ)
        runner = Runner(settings, backend, warn)
        out = sys.stdout.buffer

        def copy(chunk: bytes) -> None:
            try:
                out.write(chunk)
                out.flush()
            except OSError:
                pass  # the caller stopped reading: the compile goes on

        ran = runner.run(job, copy)
    except ConfigError as e:
        return fail("; ".join(e.problems) + " (the command was not run)", EX_CONFIG)
    except NotReady as e:
        return fail(f"{e} (the command was not run; try again later)", EX_TEMPFAIL)
    except EngineError as e:
        return fail(f"{e} (the command was not run: never outside the sandbox)", EX_TEMPFAIL)
    if ran.stopped_by is not None:
        die_of(ran.stopped_by)
    if ran.timed_out:
        fail(f"timeout: stopped after {settings.limits.timeout:g} s", 0)
    elif ran.oom_killed:
        fail(f"memory: the compile needed more than {settings.limits.memory >> 20} MiB", 0)
    return ran.exit_code if ran.exit_code is not None else 128 + signal.SIGKILL


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    follow_parent(os.getppid())
    return run(args, os.environ, os.getcwd())


if __name__ == "__main__":
    sys.exit(main())
