"""The command line: one boundary that turns every InitError into one line and an exit status."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from init import __version__
from init.core import deferred, signals
from init.core.log import Level, Log, level_from_env
from init.errors import EX_CONFIG, EX_USAGE, ConfigError, InitError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: PID 1 runs this
if TYPE_CHECKING:
    from argparse import Namespace
    from typing import Any

    Options = dict[str, Any]  # `run`'s options: argparse's, as a plain dict


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    held_from = signals.hold()  # first: a stop signal waits for `run`'s loop (init.core.signals)
    deferred.defer_unused_stdlib()  # before pathlib and dataclasses: not imported above
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


def _parse(args: list[str]) -> Namespace:
    from init import commandline

    return commandline.parser(with_compile=args[:1] == ["compile"]).parse_args(args)


def _dispatch(args: list[str], env: dict[str, str], log: Log) -> int:
    options = _parse(args)
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
    opt = dict(vars(options))  # nothing of argparse's stays referenced once `run` forgets it
    del options
    return _run(opt, env, log)


# Each command imports what it uses when it runs: wrap mode, a long-lived PID 1, pays for
# nothing it does not need (see the idle-rss benchmark).


def _merged_environment(
    options: Namespace | Options, env: dict[str, str], notices: list[str] | None = None
) -> dict[str, str]:
    """The environment with the .env files under it (the environment wins), the init's old
    variable names read as the new ones (a notice for each into `notices`)."""
    from pathlib import Path

    from init import config

    opt = options if isinstance(options, dict) else vars(options)
    named = config.renamed(env)[0]
    config_dir = opt.get("config_dir") or Path(
        named.get(config.CONFIG_DIR_VARIABLE) or config.DEFAULT_CONFIG_DIR
    )
    file_values = config.read_env_files(config_dir, opt.get("env_file") or ())
    merged, said = config.renamed({**file_values, **env})
    if notices is not None:
        notices.extend(said)
    return merged


def _texlive(options: Namespace, env: dict[str, str]) -> int:
    if options.texlive_args[:1] != ["install"]:
        print(
            "usage: sharelatex-init texlive install [IMAGE...] [--engine URL] "
            "[--source pull,load,build] [--scheme basic|small|full] [--base-image B] [--retry]",
            file=sys.stderr,
        )
        return EX_USAGE
    from init.texlive.install import install_command  # the Docker SDK: never in PID 1

    return install_command(options.texlive_args[1:], _merged_environment(options, env))


def _doctor(options: Namespace, env: dict[str, str]) -> int:
    from init import doctor
    from init.core.status_file import status_path

    merged = _merged_environment(options, env)
    checks = doctor.run_checks(merged, status_path(merged, options.status_file))
    print(doctor.report(checks, options.json))
    return doctor.exit_status(checks)


def _run(opt: Options, env: dict[str, str], log: Log) -> int:
    _forget_the_command_line()
    import functools

    from init import boot, config
    from init.core import container_env, services
    from init.core.pid1 import BootOptions, Init, Shutdown
    from init.core.status_file import status_path

    _configure_log(log, opt)
    notices: list[str] = []
    merged = _merged_environment(opt, env, notices)
    settings = config.load(merged)
    for warning in (*notices, *settings.warnings):
        log.warning("config", warning)
    log.info(
        "config",
        f"sandboxed compiles: {settings.mode.value}; {settings.generation.value} layout "
        f"(compiles in {settings.compiles_dir})",
    )
    shutdown = Shutdown(
        grace=_seconds(opt, "grace", merged, config.KILL_PROCESS_TIMEOUT, Shutdown.grace),
        kill_all=_seconds(
            opt, "kill_all_timeout", merged, config.KILL_ALL_PROCESSES_TIMEOUT, Shutdown.kill_all
        ),
    )
    status_file = status_path(merged, opt.get("status_file")).absolute()
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
        docker_side=functools.partial(boot.docker_side, settings, merged, status_file),
        own_services=boot.http_status_service(settings.http_address, status_file),
    )
    return Init(options_, log, config.service_environment(merged)).run()


def _forget_the_command_line() -> None:
    """Free what parsing left behind before PID 1's own imports, so that they reuse its memory.

    The parser is garbage in reference cycles by now, and the options a plain dict; argparse
    (with the grammar in init.commandline) and gettext's locale, which translated argparse's
    messages, are not used again (a later import would load them afresh). CPython keeps freed
    memory for reuse rather than giving it
    back, so this must happen before the imports, not at idle.
    """
    import gc

    import init

    for name in ("init.commandline", "argparse", "gettext", "locale"):
        sys.modules.pop(name, None)
    init.__dict__.pop("commandline", None)  # the import set it on the package too
    gc.collect()


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


def _configure_log(log: Log, opt: Options) -> None:
    if opt.get("log_format") == "json":
        log.json_lines = True
    if opt.get("log_level"):
        log.level = Level[str(opt["log_level"]).upper()]


def _status(options: Namespace, env: Mapping[str, str]) -> int:
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
    from init import commandline

    process_group = commandline.wrap_parser().parse_args(before).process_group
    del commandline
    if not command:
        print("sharelatex-init: give a command after --", file=sys.stderr)
        return EX_USAGE
    _forget_the_command_line()
    from init.core import wrap

    return wrap.run(wrap.WrapOptions(tuple(command), process_group), env, log)
