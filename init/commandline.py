"""The command line's grammar (argparse), built and used once, then dropped by `run`.

argparse (with gettext and locale) would otherwise stay in PID 1 for its whole life, about
0.4 MiB of its 12 MiB budget: `init.cli` parses through this module and, for `run`, forgets it
before PID 1's own imports (cli._forget_the_command_line).
"""

from __future__ import annotations

import argparse
import os

DESCRIPTION = "PID 1 for ShareLaTeX / Overleaf containers with sandboxed compiles."
EPILOG = """\
commands:
  run                 be the container's init (the default): startup scripts, services
  status [--json]     what the running init reports
  doctor [--json]     every preflight check, each ok / warn / fail with its fix
  compile DIR         compile one project in its sandbox (exit 0 PDF, 1 LaTeX error,
                      2 a limit hit, 75 TeX Live not ready, 78 configuration)
  texlive install     install the TeX Live image(s) now, with a progress bar on a terminal
  -- CMD [ARGS...]    wrap mode: run CMD as the only child, as tini or dumb-init would
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with the terminal's width read without shutil.

    argparse's formatter imports shutil for `get_terminal_size` alone, and shutil brings bz2,
    lzma and zlib: 0.6 MiB that PID 1 would keep for its whole life. Subparsers are made of
    this class too (argparse's default `parser_class`).
    """

    def _get_formatter(self) -> argparse.HelpFormatter:
        # Every HelpFormatter takes `width`; typeshed's protocol for formatter_class omits it.
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size().columns or 80  # stdout's
    except (ValueError, OSError):
        return 80


def parser(with_compile: bool = True) -> argparse.ArgumentParser:
    """The command line; `compile`'s own options only when compiling (its parser imports the
    compile contract, which PID 1 would otherwise keep)."""
    from pathlib import Path

    parser = _Parser(
        prog="sharelatex-init",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="be the container's init (the default)")
    _add_run_options(run)
    _add_run_options(parser)  # `sharelatex-init --grace 5` means `run --grace 5`
    st = sub.add_parser("status", help="show what the running init reports")
    st.add_argument("--json", action="store_true", help="print the status document as JSON")
    st.add_argument("--status-file", type=Path, help="where the init writes its status")
    st.add_argument(
        "--check",
        choices=("healthy", "ready"),
        help="for probes: exit 0 when healthy (the init and its services run) or ready "
        "(compiles can run), else 1 with the reason",
    )
    if with_compile:
        from init.compiles import command as compile_cmd  # its parser: the runner loads later

        compile_cmd.add_parser(sub)
    else:
        sub.add_parser("compile", help="compile a project dir in its sandbox (see compile -h)")
    tl = sub.add_parser("texlive", help="install the TeX Live image(s) now, with progress")
    tl.add_argument("texlive_args", nargs=argparse.REMAINDER, metavar="install [IMAGE...]")
    doc = sub.add_parser("doctor", help="run every preflight check and say how to fix each")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.add_argument("--status-file", type=Path, help="where the init writes its status")
    doc.add_argument("--config-dir", type=Path, help="dir of *.env files")
    doc.add_argument("--env-file", type=Path, action="append", help="an .env file")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    d = argparse.SUPPRESS  # so options given before or after `run` both count
    p.add_argument("--startup-dir", type=Path, default=d, help="my_init.d scripts to run first")
    p.add_argument("--pre-shutdown-dir", type=Path, default=d, help="run before stopping")
    p.add_argument("--post-shutdown-dir", type=Path, default=d, help="run after stopping")
    p.add_argument("--service-dir", type=Path, default=d, help="runit services (NAME/run)")
    p.add_argument(
        "--container-env", type=Path, default=d, help="my_init's /etc/container_environment"
    )
    p.add_argument("--config-dir", type=Path, default=d, help="dir of *.env files")
    p.add_argument("--env-file", type=Path, action="append", default=d, help="an .env file")
    p.add_argument("--status-file", type=Path, default=d, help="where to write the status")
    p.add_argument(
        "--grace", type=float, default=d, help="seconds to stop services (KILL_PROCESS_TIMEOUT)"
    )
    p.add_argument(
        "--kill-all-timeout",
        type=float,
        default=d,
        help="seconds for the rest to end (KILL_ALL_PROCESSES_TIMEOUT)",
    )
    p.add_argument("--skip-startup-files", action="store_true", default=d)
    p.add_argument("--no-kill-all-on-exit", action="store_true", default=d)
    p.add_argument("--log-format", choices=("text", "json"), default=d)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=d)


def wrap_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sharelatex-init [options] --", description="Run CMD as the only child.")
    parser.add_argument(
        "-g",
        "--process-group",
        action="store_true",
        help="send signals to the child's whole process group, not only to the child",
    )
    return parser
