"""A child of PID 1 that checks sibling-containers mode against the host's engine, and reports.

`python -m init.engine.sibling_check --socket S --result F [...]` checks the mounted socket (a socket,
usable by the services' user, an engine new enough), inspects this container to find the host
paths behind the compiles and output dirs, compares them with `SANDBOXED_COMPILES_HOST_DIR*`,
and, given `--image`, proves the mapping: a tiny container on the host engine writes a marker
through the host path and this side reads it back. The result goes to F as JSON; the exit
status is 0 when nothing failed, 1 otherwise. The Docker SDK lives here, never in PID 1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import docker
import docker.errors
import requests.exceptions
import tenacity
from docker.types import Mount as DockerMount

from init.checks import Check, Status
from init.config import DEFAULT_COMPILES_DIR, DEFAULT_OUTPUT_DIR, HOST_DIR, HOST_DIR_OUTPUT
from init.engine import sibling
from init.engine.ready import COMPILE_LABEL
from init.errors import EngineError

# The host's engine is up before this container; a short patience covers a busy engine only.
ENGINE_ANSWER = tenacity.Retrying(
    wait=tenacity.wait_exponential(multiplier=0.05, min=0.05, max=1.0),
    retry=tenacity.retry_if_exception_type(
        (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
    ),
)
PROOF_DEADLINE = 30  # seconds for the marker container to start, write and exit
PROOF_PREFIX = ".sharelatex-init-proof-"


@dataclass(frozen=True)
class Request:
    """What to check: the command line, as a value."""

    result: Path
    socket: Path | None = None
    service_user: str = sibling.DEFAULT_SERVICE_USER
    compiles_dir: Path = DEFAULT_COMPILES_DIR
    output_dir: Path = DEFAULT_OUTPUT_DIR
    host_dir_compiles: PurePosixPath | None = None
    host_dir_output: PurePosixPath | None = None
    compiles_variable: str = HOST_DIR
    output_variable: str = HOST_DIR_OUTPUT
    container_id: str = ""
    image: str = ""
    deadline: float = 5.0
    grant_group: bool = False  # the init at boot: add the user to the socket's group it was given


@dataclass
class Report:
    """The result being gathered; `as_json` is the file PID 1 and doctor read."""

    checks: list[Check] = field(default_factory=list)
    socket: dict[str, Any] | None = None
    service_user: dict[str, Any] | None = None
    api_version: str | None = None
    server_version: str | None = None
    container_id: str | None = None
    container_id_source: str | None = None
    host_dir_compiles: str | None = None
    host_dir_output: str | None = None
    derived: bool = False
    proof: dict[str, str] = field(
        default_factory=lambda: {"status": "skipped", "message": "an earlier check failed"}
    )

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return not any(c.status is Status.FAIL for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": sibling.problems(self.checks),
            "warnings": sibling.warnings(self.checks),
            "notes": [f"{c.name}: {c.message}" for c in self.checks if c.status is Status.OK],
            "checks": [c.as_dict() for c in self.checks],
            "socket": self.socket,
            "service_user": self.service_user,
            "api_version": self.api_version,
            "server_version": self.server_version,
            "container_id": self.container_id,
            "container_id_source": self.container_id_source,
            "host_dir_compiles": self.host_dir_compiles,
            "host_dir_output": self.host_dir_output,
            "derived": self.derived,
            "proof": self.proof,
        }


def check(request: Request, environ: dict[str, str]) -> Report:
    """Every check in order; each failure that makes the next ones meaningless stops there."""
    report = Report()
    try:
        path = request.socket or sibling.socket_path(environ)
    except EngineError as e:
        report.add(Check("docker socket", Status.FAIL, e.message, e.fix))
        return report
    facts = sibling.read_socket(path)
    report.socket = facts.as_dict()
    if report.add(sibling.socket_check(facts)).status is Status.FAIL:
        return report
    report.add(Check("socket security", Status.WARN, sibling.SECURITY_WARNING.format(path=path)))
    user = sibling.service_user(request.service_user)
    if user is not None and request.grant_group:
        grant = sibling.plan_group_grant(
            facts, user, frozenset(os.getgroups()), Path("/etc/group").read_text()
        )
        if grant is not None:
            sibling.apply_group_grant(grant)
            report.add(Check("socket group", Status.OK, grant.description))
            user = sibling.service_user(request.service_user)
    report.service_user = user.as_dict() if user is not None else None
    report.add(sibling.access_check(facts, user, request.service_user))

    client = connect(path, request.deadline, report)
    if client is None:
        return report
    version = client.version()
    report.api_version = str(version.get("ApiVersion", ""))
    report.server_version = str(version.get("Version", ""))
    report.add(sibling.api_version_check(report.api_version))

    compiles = map_host_dirs(client, request, report)
    if compiles is not None and request.image:
        report.proof = prove(client, request, compiles, path, report)
    elif request.image:
        report.proof = {"status": "skipped", "message": "no host compiles dir to prove"}
    else:
        report.proof = {"status": "skipped", "message": "no compile image given"}
    return report


def connect(path: Path, deadline: float, report: Report) -> docker.APIClient | None:
    """An API client once the engine answers; None (and the reason reported) by the deadline."""
    try:
        for attempt in ENGINE_ANSWER.copy(stop=tenacity.stop_after_delay(deadline)):
            with attempt:
                client = docker.APIClient(base_url=f"unix://{path}", version="auto", timeout=10)
                client.ping()
                return client
    except tenacity.RetryError as e:
        verdict = sibling.probe_socket(path)
        if verdict.status is Status.OK:
            last = e.last_attempt.exception()
            verdict = Check(
                "engine",
                Status.FAIL,
                f"{path} accepts connections but no Docker API answers there ({last})",
                f"mount the host's Docker socket: `{sibling.SOCKET_VOLUME}`",
            )
        report.add(verdict)
    return None


def map_host_dirs(
    client: docker.APIClient, request: Request, report: Report
) -> sibling.HostDir | None:
    """The host dirs behind ours, from this container's inspect data, checked against settings."""
    mounts, why = inspect_self(client, request, report)
    chosen: sibling.HostDir | None = None
    for kind, container_dir, variable, configured in (
        ("compiles", request.compiles_dir, request.compiles_variable, request.host_dir_compiles),
        ("output", request.output_dir, request.output_variable, request.host_dir_output),
    ):
        found = None
        if mounts is not None:
            found = sibling.host_path(PurePosixPath(container_dir), mounts, os.path.realpath)
        host_dir, verdict = sibling.resolve_host_dir(kind, variable, configured, found, why)
        report.add(verdict)
        use = str(host_dir.use) if host_dir.use is not None else None
        if kind == "compiles":
            report.host_dir_compiles = use
            chosen = host_dir if verdict.status is not Status.FAIL else None
        else:
            report.host_dir_output = use
        report.derived = report.derived or host_dir.derived
    return chosen


def inspect_self(
    client: docker.APIClient, request: Request, report: Report
) -> tuple[tuple[sibling.Mount, ...] | None, str]:
    """This container's mounts as the host engine knows them; None and why when it cannot say."""
    if request.container_id:
        found: tuple[str, str] | None = (request.container_id, "--container-id")
    else:
        found = sibling.find_container_id(Path("/"), socket.gethostname())
    if found is None:
        return None, (
            "this container's id is neither in /proc/self/mountinfo nor in /proc/self/cgroup, "
            "and the hostname is not a short id"
        )
    container_id, source = found
    report.container_id_source = source
    try:
        data = client.inspect_container(container_id)
    except docker.errors.NotFound:
        report.container_id = container_id
        return None, (
            f"the engine behind the socket knows no container {container_id[:12]} (the id in "
            f"{source}): is this the socket of the host this container runs on?"
        )
    except docker.errors.APIError as e:
        report.container_id = container_id
        return None, f"inspecting {container_id[:12]} failed: {e.explanation or e}"
    report.container_id = str(data.get("Id", container_id))
    return sibling.mounts_from_inspect(data), ""


def prove(
    client: docker.APIClient,
    request: Request,
    compiles: sibling.HostDir,
    socket_path: Path,
    report: Report,
) -> dict[str, str]:
    """A container on the host engine writes a marker through the host path; we read it here."""
    here = request.compiles_dir
    host = compiles.use
    if host is None:
        return {"status": "skipped", "message": "no host compiles dir to prove"}
    if not here.is_dir():
        return {
            "status": "skipped",
            "message": f"{here} does not exist yet (the startup scripts make it); "
            "the proof runs once it does",
        }
    try:
        client.inspect_image(request.image)
    except docker.errors.ImageNotFound:
        return {
            "status": "skipped",
            "message": f"the compile image {request.image} is not on the host engine yet; "
            "the proof runs once it is",
        }
    marker = PROOF_PREFIX + secrets.token_hex(8)
    token = secrets.token_hex(16)
    seen = here / marker
    written = run_in_compile_dir(
        client, request.image, host, here, 'printf %s "$1" > "$2"', token, str(seen)
    )
    if written is not None:
        failure = f"a container on the host engine could not write into {host}: {written}"
        report.add(Check("proof", Status.FAIL, failure, _proof_fix(compiles, here, socket_path)))
        return {"status": "failed", "message": failure}
    try:
        content = seen.read_text()
    except OSError:
        content = None
    if content == token:
        seen.unlink()
        message = (
            f"a container on the host engine wrote {host}/{marker}; it appeared here as {seen}"
        )
        report.add(Check("proof", Status.OK, message))
        return {"status": "passed", "message": message}
    # Only our own marker, through the same host path it was written by.
    run_in_compile_dir(client, request.image, host, here, 'rm -f "$1"', str(seen))
    failure = (
        f"a container on the host engine wrote {marker} into {host} on the host, but it did not "
        f"appear here in {here}: {host} is not this container's {here}"
    )
    report.add(Check("proof", Status.FAIL, failure, _proof_fix(compiles, here, socket_path)))
    return {"status": "failed", "message": failure}


def run_in_compile_dir(
    client: docker.APIClient,
    image: str,
    host: PurePosixPath,
    here: Path,
    script: str,
    *arguments: str,
) -> str | None:
    """Run `sh -c script` with `host` bound at `here`, no network; None, or what went wrong."""
    # A `type=bind` mount, unlike `-v`, refuses a missing source instead of creating it empty
    # on the host: the very trap being checked for.
    host_config = client.create_host_config(
        mounts=[DockerMount(target=str(here), source=str(host), type="bind")],
        network_mode="none",
    )
    container_id = ""
    try:
        container = client.create_container(
            image,
            entrypoint=["/bin/sh", "-c", script, "proof", *arguments],
            user="0",
            labels={COMPILE_LABEL: "proof"},
            host_config=host_config,
        )
        container_id = container["Id"]
        client.start(container_id)
        exit_status = client.wait(container_id, timeout=PROOF_DEADLINE)["StatusCode"]
        if exit_status != 0:
            said = client.logs(container_id).decode(errors="replace").strip()
            return f"the marker container exited with status {exit_status}: {said}"
        return None
    except docker.errors.APIError as e:
        return str(e.explanation or e)
    except requests.exceptions.RequestException as e:
        return f"no answer in {PROOF_DEADLINE} s ({e})"
    finally:
        if container_id:
            try:
                client.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass


def _proof_fix(compiles: sibling.HostDir, here: Path, socket_path: Path) -> str:
    if compiles.found is not None and compiles.found.mount is not None:
        # Derived from inspection, yet wrong: the engine described some other container.
        return (
            f"the host engine says {here} is `{compiles.found.mount.describe()}`, which is not "
            f"what is mounted here: check that {socket_path} is the socket of the host this "
            "container runs on (and --container-id, if given, names this container)"
        )
    return (
        f"check that {socket_path} is the socket of the host this container runs on, and set "
        f"`--env {compiles.variable}=<the host dir mounted at {here}>`"
    )


def parse(argv: list[str] | None) -> Request:
    parser = argparse.ArgumentParser(prog="python -m init.engine.sibling_check")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--socket", type=Path, help="default: DOCKER_HOST, else the default")
    parser.add_argument("--service-user", default=sibling.DEFAULT_SERVICE_USER)
    parser.add_argument("--compiles-dir", type=Path, default=DEFAULT_COMPILES_DIR)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--host-dir-compiles", type=PurePosixPath)
    parser.add_argument("--host-dir-output", type=PurePosixPath)
    parser.add_argument("--host-dir-compiles-variable", default=HOST_DIR)
    parser.add_argument("--host-dir-output-variable", default=HOST_DIR_OUTPUT)
    parser.add_argument("--container-id", default="")
    parser.add_argument("--image", default="")
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--grant-group", action="store_true", help="see Request.grant_group")
    args = parser.parse_args(argv)
    return Request(
        result=args.result,
        socket=args.socket,
        service_user=args.service_user,
        compiles_dir=args.compiles_dir,
        output_dir=args.output_dir,
        host_dir_compiles=args.host_dir_compiles,
        host_dir_output=args.host_dir_output,
        compiles_variable=args.host_dir_compiles_variable,
        output_variable=args.host_dir_output_variable,
        container_id=args.container_id,
        image=args.image,
        deadline=args.deadline,
        grant_group=args.grant_group,
    )


def main(argv: list[str] | None = None) -> int:
    request = parse(argv)
    try:
        report = check(request, dict(os.environ))
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        report = Report()
        report.add(
            Check(
                "engine",
                Status.FAIL,
                f"the host's engine failed in the middle of the check: {e}",
                "see the host's Docker log (`journalctl -u docker`)",
            )
        )
    result = report.as_json()
    tmp = request.result.with_name(request.result.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, request.result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
