"""The command line: one boundary that turns every InitError into one line and an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from init import __version__
from init.core import signals
from init.core.log import Level, Log, level_from_env
from init.errors import EX_CONFIG, EX_USAGE, ConfigError, InitError

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


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    held_from = signals.hold()  # first: a stop signal waits for `run`'s loop (init.core.signals)
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if environ is None else environ)
    log = Log(level=level_from_env(env))
    try:
        if "--" in args:
            split = args.index("--")
            return _wrap(args[:split], args[split + 1 :], env, log)
        return _dispatch(args, env, log)
    except ConfigError as e:
        for problem in e.problems:
            log.error("config", problem)
        return EX_CONFIG
    except InitError as e:
        log.error("init", str(e))
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    finally:
        signals.restore(held_from)


def _dispatch(args: list[str], env: dict[str, str], log: Log) -> int:
    parser = _parser()
    options = parser.parse_args(args)
    if options.version:
        print(f"sharelatex-init {__version__}")
        return 0
    command = options.command or "run"
    if command != "run":
        signals.release()  # no loop to take them: each command takes its own, as it always did
    if command == "status":
        return _status(options, env)
    if command == "doctor":
        return _doctor(options, env)
    if command == "compile":
        from init.compiles import command as compile_cmd

        return compile_cmd.run(options, _merged_environment(options, env))
    if command == "texlive":
        return _texlive(options, env)
    return _run(options, env, log)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    from init.compiles import (
        command as compile_cmd,  # its parser only: the runner is imported when it runs
    )

    compile_cmd.add_parser(sub)
    tl = sub.add_parser("texlive", help="install the TeX Live image(s) now, with progress")
    tl.add_argument("texlive_args", nargs=argparse.REMAINDER, metavar="install [IMAGE...]")
    doc = sub.add_parser("doctor", help="run every preflight check and say how to fix each")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.add_argument("--status-file", type=Path, help="where the init writes its status")
    doc.add_argument("--config-dir", type=Path, help="dir of *.env files")
    doc.add_argument("--env-file", type=Path, action="append", help="an .env file")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
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


# Each command imports what it uses when it runs: wrap mode, a long-lived PID 1, pays for
# nothing it does not need (see the idle-rss benchmark).


def _merged_environment(options: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The environment with the .env files under it (the environment wins)."""
    from init import config

    opt = vars(options)
    config_dir = opt.get("config_dir") or Path(
        env.get(config.CONFIG_DIR_VARIABLE) or config.DEFAULT_CONFIG_DIR
    )
    file_values = config.read_env_files(config_dir, opt.get("env_file") or ())
    return config.merge_environment(env, file_values)


def _texlive(options: argparse.Namespace, env: dict[str, str]) -> int:
    if options.texlive_args[:1] != ["install"]:
        print(
            "usage: sharelatex-init texlive install [IMAGE...] [--engine URL] "
            "[--source pull,load,build] [--scheme small|full] [--base-image B] [--retry]",
            file=sys.stderr,
        )
        return EX_USAGE
    from init.texlive.install import install_command  # the Docker SDK: never in PID 1

    return install_command(options.texlive_args[1:], _merged_environment(options, env))


def _doctor(options: argparse.Namespace, env: dict[str, str]) -> int:
    from init import doctor
    from init.core.status_file import status_path

    merged = _merged_environment(options, env)
    checks = doctor.run_checks(merged, status_path(merged, options.status_file))
    print(doctor.report(checks, options.json))
    return doctor.exit_status(checks)


def _run(options: argparse.Namespace, env: dict[str, str], log: Log) -> int:
    import functools

    from init import boot, config
    from init.core import container_env, services
    from init.core.pid1 import BootOptions, Init, Shutdown
    from init.core.status_file import status_path
    from init.engine import dockerd

    _configure_log(log, options)
    opt = vars(options)
    merged = _merged_environment(options, env)
    settings = config.load(merged)
    for warning in settings.warnings:
        log.warning("config", warning)
    log.info("config", f"sandboxed compiles: {settings.mode.value}")
    shutdown = Shutdown(
        grace=_seconds(opt, "grace", merged, config.KILL_PROCESS_TIMEOUT, Shutdown.grace),
        kill_all=_seconds(
            opt, "kill_all_timeout", merged, config.KILL_ALL_PROCESSES_TIMEOUT, Shutdown.kill_all
        ),
    )
    status_file = status_path(merged, opt.get("status_file")).absolute()
    layout = dockerd.layout_from_env(merged)
    options_ = BootOptions(
        startup_dir=opt.get("startup_dir", services.DEFAULT_STARTUP_DIR),
        pre_shutdown_dir=opt.get("pre_shutdown_dir", services.DEFAULT_PRE_SHUTDOWN_DIR),
        post_shutdown_dir=opt.get("post_shutdown_dir", services.DEFAULT_POST_SHUTDOWN_DIR),
        service_dir=opt.get("service_dir", services.DEFAULT_SERVICE_DIR),
        env_files=container_env.EnvFiles(opt.get("container_env", container_env.DEFAULT_DIR)),
        status_file=status_file,
        shutdown=shutdown,
        skip_startup_files=bool(opt.get("skip_startup_files", False)),
        kill_all_on_exit=not opt.get("no_kill_all_on_exit", False),
        docker_side=functools.partial(boot.docker_side, settings, layout, merged, status_file),
        own_services=boot.http_status_service(settings.http_address, status_file),
    )
    return Init(options_, log, config.service_environment(merged)).run()


def _seconds(
    opt: Mapping[str, object], key: str, env: Mapping[str, str], variable: str, default: float
) -> float:
    """A time limit: the flag, else the my_init variable, else the default."""
    value = opt.get(key)
    if isinstance(value, float):
        if value < 0:
            raise ConfigError([f"--{key.replace('_', '-')}={value}: give 0 or more seconds"])
        return value
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise ConfigError([f"{variable}={raw!r} is not a number of seconds; write e.g. 55"])
    return seconds


def _configure_log(log: Log, options: argparse.Namespace) -> None:
    opt = vars(options)
    if opt.get("log_format") == "json":
        log.json_lines = True
    if opt.get("log_level"):
        log.level = Level[str(opt["log_level"]).upper()]


def _status(options: argparse.Namespace, env: Mapping[str, str]) -> int:
    import json

    from init import status

    path = status.status_path(env, options.status_file)
    try:
        document = status.read_all(path)
    except FileNotFoundError:
        print(f"status: no status at {path}: is the init running?", file=sys.stderr)
        return 3
    except (OSError, ValueError) as e:
        print(f"status: cannot read {path}: {e}", file=sys.stderr)
        return 3
    if options.check:
        alive = status.pid_alive(document.document.pid)
        passes, why = status.check(document, options.check, alive)
        print(f"{options.check}: {'yes' if passes else 'no'}: {why}")
        return 0 if passes else 1
    if options.json:
        print(json.dumps(document.to_json(), indent=2, sort_keys=True))
    else:
        print(status.format_text(document))
    return 0


def _wrap(before: list[str], command: list[str], env: dict[str, str], log: Log) -> int:
    from init.core import wrap

    parser = argparse.ArgumentParser(
        prog="sharelatex-init [options] --", description="Run CMD as the only child."
    )
    parser.add_argument(
        "-g",
        "--process-group",
        action="store_true",
        help="send signals to the child's whole process group, not only to the child",
    )
    options = parser.parse_args(before)
    if not command:
        print("sharelatex-init: give a command after --", file=sys.stderr)
        return EX_USAGE
    return wrap.run(wrap.WrapOptions(tuple(command), options.process_group), env, log)
