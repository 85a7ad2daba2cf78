"""`sharelatex-init doctor`: every preflight check, each ok / warn / fail with its fix.

It runs as its own process (never inside PID 1), so it may ask the engine through the Docker
SDK. The checks are the same functions the boot uses; this only gathers and prints them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from init import config
from init.checks import Check, Status
from init.config import Mode, Settings
from init.core import status_file as status_files
from init.engine import cgroups, compiles_fs, dockerd, privilege, storage
from init.engine.side import EngineStatus
from init.errors import ConfigError, InitError

ENGINE_ANSWER_DEADLINE = 3.0


def run_checks(
    environ: Mapping[str, str], status_file: Path, root: Path = Path("/")
) -> list[Check]:
    """The checks for the configuration in `environ` (already merged with the .env files)."""
    try:
        settings = config.load(environ)
    except ConfigError as e:
        return [Check("config", Status.FAIL, problem) for problem in e.problems]
    checks = [Check("config", Status.OK, f"sandboxed compiles: {settings.mode.value}")]
    checks += [Check("config", Status.WARN, warning) for warning in settings.warnings]
    if settings.mode is Mode.OFF:
        checks.append(
            Check(
                "sandbox",
                Status.WARN,
                "compiles are not sandboxed: a document can run code as the compile service",
                "--env SANDBOXED_COMPILES=true with --privileged (docker-in-docker), or add "
                "--env SANDBOXED_COMPILES_SIBLING_CONTAINERS=true "
                "-v /var/run/docker.sock:/var/run/docker.sock (sibling containers)",
            )
        )
    if settings.mode is Mode.DIND:
        checks += dind_checks(settings, environ, status_file, root)
    if settings.mode is Mode.SIBLING:
        checks += sibling_checks(settings, environ)
    if settings.mode is not Mode.OFF:
        checks.append(compiles_fs.check(settings.compiles_dir))
    if settings.mode is not Mode.OFF:  # off: the "sandbox" warning above says it all
        checks.append(compile_runner_check(settings, environ, root))
        checks.append(proxy_check(status_file))
        checks.append(runtime_check(settings, environ, root))
    return checks


def proxy_check(status_file: Path) -> Check:
    """The engine policy proxy the services' DOCKER_HOST names: it answers, and what it refused
    lately (a runner, or an attacker, trying what compiles never need)."""
    from init.engine.client import connect_error

    socket = status_file.with_name("docker.sock")
    try:
        started = status_files.read(status_file).started_at
    except (OSError, ValueError):
        return Check(
            "engine proxy", Status.OK, f"{socket}: the init starts it with the engine (not now)"
        )
    error = connect_error(socket, 1.0)
    if error is not None:
        return Check(
            "engine proxy",
            Status.FAIL,
            f"nothing answers on {socket}, the only engine socket the services get",
            "see the init's log (`proxy:` lines) and `sharelatex-init status`",
        )
    refused = [r for r in status_files.read_refusals(status_files.refusals_path(status_file))
               if r.at >= started]  # fmt: skip
    if not refused:
        return Check("engine proxy", Status.OK, f"{socket}: the services' engine; refused nothing")
    return Check(
        "engine proxy",
        Status.WARN,
        f"{socket} refused {len(refused)} call(s) since the start; last: {refused[-1].line()}",
        "a refusal is a call compiles never need: see which service (uid) made it",
    )


def runtime_check(settings: Settings, environ: Mapping[str, str], root: Path = Path("/")) -> Check:
    """The OCI runtime each compile image runs under, and in docker-in-docker runsc's platform
    and why (sibling mode: the host's engine's runtimes are among the sibling checks)."""
    from init.engine import runtime

    if settings.mode is not Mode.DIND or runtime.RUNSC not in runtime.wanted(settings):
        return Check("runtime", Status.OK, f"compiles run under {runtime.describe(settings)}")
    try:
        layout = dockerd.layout_from_env(environ)
        plan = runtime.plan_registration(settings, layout.extra_args, Path("/nonexistent"), root)
    except ConfigError as e:
        return Check("runtime", Status.FAIL, "; ".join(e.problems))
    platform = plan.platform if plan is not None else runtime.Platform("ptrace", "")
    return Check(
        "runtime",
        Status.OK,
        f"compiles run under {runtime.describe(settings, platform.name)}; {platform.reason}",
    )


def compile_runner_check(
    settings: Settings, environ: Mapping[str, str] | None = None, root: Path = Path("/")
) -> Check:
    """Which runner the services' compiles go through, and why; for their own docker runner,
    what it is given (or why it could not start)."""
    from init.compiles import service_env as compile_env

    choice = compile_env.choose(settings, root)
    if choice.runner == "shim":
        return Check(
            "compile runner",
            Status.OK,
            "each compile in its own container: the services' latexmk, pdflatex, xelatex and "
            f"lualatex are the init's sandboxing shim (first on their PATH); {choice.why}",
        )
    if choice.found is None:
        return Check(
            "compile runner",
            Status.FAIL,
            f"the compile service's own docker runner ({choice.why}), but this image has no "
            "DockerRunner.js: its compile service exits at start ('Sandboxed compiles are only "
            "available with Overleaf Server Pro')",
            f"unset {config.COMPILE_RUNNER} (auto picks the shim here) or set it to shim",
        )
    try:
        user = compile_env.runner_user(environ or {})
    except ConfigError as e:
        return Check("compile runner", Status.FAIL, "; ".join(e.problems))
    where = (
        f"{settings.compiles_dir} (docker-in-docker: the inner engine sees this container's paths)"
        if settings.mode is Mode.DIND
        else "the host's path of the compiles dir (see the sibling checks)"
    )
    return Check(
        "compile runner",
        Status.OK,
        f"the compile service's own docker runner, DockerRunner.js ({choice.why}): "
        f"DOCKER_RUNNER=true, ALLOWED_IMAGES set, its containers run as "
        f"{config.RUNNER_USER}={user} (the compile dirs' owner) and bind {where}; the engine "
        "proxy holds them to the compile profile and removes them once idle",
    )


def sibling_checks(settings: Settings, environ: Mapping[str, str]) -> list[Check]:
    """The socket, who may use it, the engine's API, the host dirs and the marker proof."""
    from init.engine import (
        sibling_check,  # the Docker SDK: only here, never in PID 1
    )

    request = sibling_check.SiblingRequest.for_settings(settings, environ, Path("/dev/null"))
    result = sibling_check.check(request, dict(environ))
    checks = list(result.checks)
    if result.proof.status == "skipped":  # a proof that ran is among the checks already
        checks.append(Check("proof", Status.WARN, f"not run: {result.proof.message}"))
    return checks


def dind_checks(
    settings: Settings, environ: Mapping[str, str], status_file: Path, root: Path
) -> list[Check]:
    try:
        layout = dockerd.layout_from_env(environ)
    except ConfigError as e:
        return [Check("config", Status.FAIL, problem) for problem in e.problems]
    checks = [privilege.check(root), cgroups_check(root)]
    try:
        need = storage.bytes_needed(settings.all_texlive_images)
        choice = storage.plan(layout.data_root, settings.storage_driver, need_bytes=need)
        checks.append(storage.check(choice))
    except InitError as e:
        checks.append(Check("storage", Status.FAIL, e.message, e.fix))
    checks += engine_checks(layout, settings, status_file)
    return checks


def cgroups_check(root: Path) -> Check:
    """What the boot would change in the cgroup mounts: nothing is ok; a read-only tree fails."""
    try:
        plan = cgroups.plan(root)
    except InitError as e:
        return Check("cgroups", Status.FAIL, e.message, e.fix)
    if plan.problem is not None:
        return Check("cgroups", Status.FAIL, plan.problem.message, plan.problem.fix)
    if not plan.actions:
        return Check("cgroups", Status.OK, f"{plan.version.value}: set up for dockerd")
    steps = cgroups.describe(plan)
    return Check(
        "cgroups",
        Status.WARN,
        f"{plan.version.value}: {len(steps)} step(s) left for the init at start: "
        + "; ".join(steps),
    )


def engine_checks(
    layout: dockerd.EngineLayout, settings: Settings, status_file: Path
) -> list[Check]:
    """Whether the inner dockerd answers, and on which storage driver. Asking never sweeps: a
    compile may be running in a container of ours right now."""
    from init.engine import ready  # the Docker SDK: only here, never in PID 1

    reported = _reported_engine(status_file)
    if reported is not None and reported.state == "refused":
        return [Check("dockerd", Status.FAIL, reported.reason, reported.fix)]
    if not layout.socket.exists():
        why = (
            reported.reason if reported else ""
        ) or "dockerd is not running (is the init running?)"
        return [
            Check(
                "dockerd",
                Status.FAIL,
                f"no socket at {layout.socket}: {why}",
                "start the container with `sharelatex-init run` as its entrypoint; "
                "`sharelatex-init status` shows the engine's state",
            )
        ]
    request = ready.ReadyRequest(layout.socket, Path("/dev/null"), ENGINE_ANSWER_DEADLINE)
    result = ready.check(request)
    if not result.ready:
        why = (reported.reason if reported else "") or result.error
        return [
            Check(
                "dockerd",
                Status.FAIL,
                f"not answering on {layout.socket}: {why}",
                "see the init's log for dockerd's last lines; `sharelatex-init status`",
            )
        ]
    checks = [
        Check(
            "dockerd",
            Status.OK,
            f"answering on {layout.socket}, engine {result.server_version or '?'}",
        )
    ]
    if result.driver == "vfs" and settings.storage_driver != "vfs":
        checks.append(
            Check(
                "storage driver",
                Status.FAIL,
                "dockerd fell back to vfs (every image layer a full copy)",
                storage.volume_fix(layout.data_root),
            )
        )
    else:
        checks.append(Check("storage driver", Status.OK, f"dockerd uses {result.driver}"))
    return checks


def _reported_engine(status_file: Path) -> EngineStatus | None:
    """The engine as the running init last reported it, if it did."""
    try:
        return EngineStatus.from_json(status_files.read(status_file).engine)
    except (OSError, ValueError):
        return None


def report(checks: list[Check], as_json: bool) -> str:
    if as_json:
        return json.dumps([c.as_dict() for c in checks], indent=2)
    return "\n".join(c.line() for c in checks)


def exit_status(checks: list[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0
