"""A compile as the broker sends it: the project's container (today's profile from
init.compiles.profile, the agent as its command, so the agent and every compile it runs are
the project's own uid in the dir's group) and the agent's request (the command, directory,
environment and timeout, and the dir the agent's tidy hands back to its group)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from init.broker import agent
from init.broker.protocol import Request
from init.compiles.paths import CompileDir
from init.compiles.profile import (
    ContainerSpec,
    Job,
    compile_environment,
    container_spec,
)
from init.compiles.settings import KILL_GRACE, Limits

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# What the broker's containers carry beside the compile label: its sweep takes only these.
BROKER_LABEL = "sharelatex-init.broker"


@dataclass(frozen=True)
class Target:
    """Where a project's compile runs: the container's name (which says its profile), the
    body that creates it, and the compile dir (shared with the project's uid before each
    compile: init.compiles.identity)."""

    project: str
    name: str
    body: Mapping[str, Any]
    directory: CompileDir


def agent_body(
    spec: ContainerSpec, idle: float, lifetime: float, owner: str = "1"
) -> dict[str, Any]:
    """The body of `POST /containers/create`: the project's profile, the agent as PID 1 with
    its stdin open to whoever attaches first (StdinOnce: the broker letting go is its EOF);
    labelled with its broker (`owner`: its socket), whose sweep takes it."""
    body = spec.create_body()
    body["Labels"] = {**body["Labels"], BROKER_LABEL: owner}
    body.update(
        Entrypoint=agent.entrypoint(),
        Cmd=agent.arguments(idle, lifetime),
        OpenStdin=True,
        StdinOnce=True,
        AttachStdin=True,
        AttachStdout=True,
        AttachStderr=True,
    )
    return body


def target(
    job: Job,
    limits: Limits,
    seccomp: str | None,
    runtime: str = "runc",
    now: float | None = None,
    owner: str = "1",
) -> Target:
    """The project's container for `job`: its name is today's with `-agent` (another
    profile, another container), its agent idles out KILL_GRACE after the broker would have
    retired it."""
    spec = container_spec(job, limits, seccomp, now=time.time() if now is None else now,
                          runtime=runtime)  # fmt: skip
    body = agent_body(spec, limits.idle + KILL_GRACE, limits.deadlines.lifetime, owner)
    return Target(job.directory.project, f"{spec.name}-agent", body, job.directory)


def request(job: Job, limits: Limits) -> Request:
    """The agent's request for `job`: its command, directory, environment and wall clock,
    and the agent's tidy before and after it (every process killed, /tmp emptied entirely,
    font caches too, so nothing but the project's files carries over; what the compile made
    in its dir handed back to the dir's group)."""
    return Request(
        id=job.compile_id,
        argv=job.command,
        cwd=str(job.directory.path),
        timeout=limits.timeout,
        env=compile_environment(limits, job.environment),
        tidy=str(job.directory.path),
    )
