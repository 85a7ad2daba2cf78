"""A child of PID 1 that checks sibling-containers mode against the host's engine, and reports.

`python -m init.engine.sibling_check --socket S --result F [...]` checks the mounted socket (a
socket,
usable by the services' user, an engine new enough), inspects this container to find the host
paths behind the compiles and output dirs, compares them with `SANDBOXED_COMPILES_HOST_DIR*`,
and, given `--image`, proves the mapping: a tiny container on the host engine writes a marker
through the host path and this side reads it back. The result goes to F as JSON; the exit
status is 0 when nothing failed, 1 otherwise. The Docker SDK lives here, never in PID 1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from init.checks import Check, Status
from init.config import (
    CONTAINER_ID,
    DEFAULT_COMPILE_UIDS,
    DEFAULT_COMPILES_DIR,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SERVICE_USER,
    HOST_DIR,
    HOST_DIR_OUTPUT,
    SERVICE_USER,
    Settings,
)
from init.engine import runtime, sibling
from init.engine.client import (
    COMPILE_LABEL,
    Engine,
    EngineInfo,
    EngineUnreachable,
    ImageMissing,
    NotFound,
)
from init.errors import EngineError

MODULE = "init.engine.sibling_check"
# The host's engine is up before this container; a short patience covers a busy engine only.
PROOF_DEADLINE = 30  # seconds for the marker container to start, write and exit
PROOF_PREFIX = ".sharelatex-init-proof-"
PROOF_MOUNT = "/proof"  # where the marker dir is bound in the proof container
NOBODY = (65534, 65534)
# The proof container runs as a compile would: a uid of the compile range (this name's), in the
# marker dir's group, writing through the group's permissions into a dir it does not own.
PROOF_PROJECT = "sharelatex-init-proof"
# The compile profile, cut to what `printf > file` needs (init.compiles.profile has the whole).
PROOF_PROFILE = {
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "read_only": True,
    "mem_limit": 32 * 1024 * 1024,
    "memswap_limit": 32 * 1024 * 1024,
    "pids_limit": 8,
    "ulimits": [{"name": "fsize", "soft": 1 << 20, "hard": 1 << 20}],
    "ipc_mode": "private",
    "privileged": False,
}


@dataclass(frozen=True)
class SiblingRequest:
    """What to check; PID 1 (init.engine.host) and `doctor` make it, the child reads it back from
    its command line."""

    result: Path
    socket: Path | None = None  # None: DOCKER_HOST, else the default
    service_user: str = sibling.DEFAULT_SERVICE_USER
    compiles_dir: Path = DEFAULT_COMPILES_DIR
    output_dir: Path = DEFAULT_OUTPUT_DIR
    host_dir_compiles: PurePosixPath | None = None
    host_dir_output: PurePosixPath | None = None
    compiles_variable: str = HOST_DIR  # the names the operator used, for the messages
    output_variable: str = HOST_DIR_OUTPUT
    container_id: str = ""
    image: str = ""  # the compile image for the proof; empty: no proof
    deadline: float = 5.0
    grant_group: bool = False  # the init at boot: add the user to the socket's group it was given
    runtimes: tuple[str, ...] = ()  # the runtimes beyond runc that compile images run under
    proof_uid: int = DEFAULT_COMPILE_UIDS.uid_for(PROOF_PROJECT)  # config.COMPILE_UID_BASE

    @classmethod
    def for_settings(
        cls, settings: Settings, environ: Mapping[str, str], result: Path, **given: Any
    ) -> SiblingRequest:
        """What the configuration asks to be checked (the boot's check and `doctor` alike):
        the dirs, the host dirs as set, the names the operator used, the runtimes; `given`
        for what differs (the socket, the services' user, the deadline, the group grant)."""
        values: dict[str, Any] = {
            "service_user": environ.get(SERVICE_USER) or DEFAULT_SERVICE_USER,
            "compiles_dir": settings.compiles_dir,
            "output_dir": settings.output_dir,
            "host_dir_compiles": _posix(settings.host_dir_compiles),
            "host_dir_output": _posix(settings.host_dir_output),
            "compiles_variable": sibling.configured_variable(environ, "compiles"),
            "output_variable": sibling.configured_variable(environ, "output"),
            "container_id": environ.get(CONTAINER_ID, ""),
            "image": settings.texlive_image,
            "runtimes": tuple(sorted(runtime.wanted(settings))),
            "proof_uid": settings.compile_uids.uid_for(PROOF_PROJECT),
        }
        return cls(result=result, **{**values, **given})

    def argv(self) -> tuple[str, ...]:
        args = [
            "--result", str(self.result),
            "--service-user", self.service_user,
            "--compiles-dir", str(self.compiles_dir),
            "--output-dir", str(self.output_dir),
            "--host-dir-compiles-variable", self.compiles_variable,
            "--host-dir-output-variable", self.output_variable,
            "--deadline", f"{self.deadline:g}",
            "--proof-uid", str(self.proof_uid),
        ]  # fmt: skip
        for flag, value in (
            ("--socket", self.socket),
            ("--host-dir-compiles", self.host_dir_compiles),
            ("--host-dir-output", self.host_dir_output),
            ("--container-id", self.container_id),
            ("--image", self.image),
        ):
            if value:
                args += [flag, str(value)]
        if self.grant_group:
            args.append("--grant-group")
        for name in self.runtimes:
            args += ["--runtime", name]
        return tuple(args)

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> SiblingRequest:
        import argparse

        parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
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
        parser.add_argument("--grant-group", action="store_true", help="see grant_group")
        parser.add_argument("--runtime", action="append", default=[], help="see runtimes")
        parser.add_argument("--proof-uid", type=int, default=cls.proof_uid, help="see proof_uid")
        args = parser.parse_args(list(argv))
        return cls(
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
            runtimes=tuple(args.runtime),
            proof_uid=args.proof_uid,
        )


@dataclass(frozen=True)
class Proof:
    """Whether a container of the host engine wrote through the host path and we saw it."""

    status: str  # passed, failed, skipped
    message: str

    @classmethod
    def from_json(cls, document: object) -> Proof:
        if not isinstance(document, dict):
            return cls("skipped", "no proof reported")
        return cls(str(document.get("status", "skipped")), str(document.get("message", "")))


@dataclass(frozen=True)
class SiblingResult:
    """What the check found: every check with its verdict, and the host dirs to use."""

    checks: tuple[Check, ...] = ()
    socket: str = ""  # the socket's path as checked
    socket_facts: dict[str, Any] | None = None
    service_user: dict[str, Any] | None = None
    api_version: str = ""
    server_version: str = ""
    container_id: str = ""
    container_id_source: str = ""
    host_dir_compiles: str = ""  # what the compile containers must bind; "" when unknown
    host_dir_output: str = ""
    derived: bool = False  # worked out from this container's mounts, not given
    proof: Proof = Proof("skipped", "an earlier check failed")

    @property
    def ok(self) -> bool:
        return not any(c.status is Status.FAIL for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return sibling.problems(self.checks)

    @property
    def warnings(self) -> list[str]:
        return sibling.warnings(self.checks)

    @property
    def notes(self) -> list[str]:
        return [f"{c.name}: {c.message}" for c in self.checks if c.status is Status.OK]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "notes": self.notes,
            "checks": [c.as_dict() for c in self.checks],
            "socket": self.socket_facts,
            "service_user": self.service_user,
            "api_version": self.api_version,
            "server_version": self.server_version,
            "container_id": self.container_id,
            "container_id_source": self.container_id_source,
            "host_dir_compiles": self.host_dir_compiles or None,
            "host_dir_output": self.host_dir_output or None,
            "derived": self.derived,
            "proof": {"status": self.proof.status, "message": self.proof.message},
        }

    @classmethod
    def from_json(cls, document: object) -> SiblingResult:
        """The result a check wrote; any other shape is a failed check saying what came."""
        if not isinstance(document, dict) or not isinstance(document.get("checks"), list):
            error = document.get("error") if isinstance(document, dict) else None
            return cls(
                checks=(
                    Check("sibling check", Status.FAIL, str(error or f"no result: {document}")),
                )
            )
        facts = document.get("socket")
        return cls(
            checks=tuple(Check.from_dict(c) for c in document["checks"] if isinstance(c, dict)),
            socket=str(facts.get("path", "")) if isinstance(facts, dict) else "",
            socket_facts=facts if isinstance(facts, dict) else None,
            service_user=document.get("service_user"),
            api_version=str(document.get("api_version") or ""),
            server_version=str(document.get("server_version") or ""),
            container_id=str(document.get("container_id") or ""),
            container_id_source=str(document.get("container_id_source") or ""),
            host_dir_compiles=str(document.get("host_dir_compiles") or ""),
            host_dir_output=str(document.get("host_dir_output") or ""),
            derived=document.get("derived") is True,
            proof=Proof.from_json(document.get("proof")),
        )

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)


@dataclass
class Report:
    """The result being gathered, check by check; `result()` is the value that leaves."""

    checks: list[Check] = field(default_factory=list)
    socket: str = ""
    socket_facts: dict[str, Any] | None = None
    service_user: dict[str, Any] | None = None
    api_version: str = ""
    server_version: str = ""
    container_id: str = ""
    container_id_source: str = ""
    host_dir_compiles: str = ""
    host_dir_output: str = ""
    derived: bool = False
    proof: Proof = Proof("skipped", "an earlier check failed")

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def result(self) -> SiblingResult:
        return SiblingResult(
            checks=tuple(self.checks),
            socket=self.socket,
            socket_facts=self.socket_facts,
            service_user=self.service_user,
            api_version=self.api_version,
            server_version=self.server_version,
            container_id=self.container_id,
            container_id_source=self.container_id_source,
            host_dir_compiles=self.host_dir_compiles,
            host_dir_output=self.host_dir_output,
            derived=self.derived,
            proof=self.proof,
        )


def check(request: SiblingRequest, environ: dict[str, str]) -> SiblingResult:
    """Every check in order; a failure that makes the next ones meaningless stops there. An
    engine that fails in the middle is one more failed check, never an exception."""
    report = Report()
    try:
        _check(request, environ, report)
    except EngineError as e:
        report.add(
            Check(
                "engine",
                Status.FAIL,
                f"the host's engine failed in the middle of the check: {e}",
                "see the host's Docker log (`journalctl -u docker`)",
            )
        )
    return report.result()


def _check(request: SiblingRequest, environ: dict[str, str], report: Report) -> None:
    try:
        path = request.socket or sibling.socket_path(environ)
    except EngineError as e:
        report.add(Check("docker socket", Status.FAIL, e.message, e.fix))
        return
    facts = sibling.read_socket(path)
    report.socket = str(path)
    report.socket_facts = facts.as_dict()
    if report.add(sibling.socket_check(facts)).status is Status.FAIL:
        return
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

    engine = connect(path, request.deadline, report)
    if engine is None:
        return
    try:
        info = engine.info()
        report.api_version = info.api_version
        report.server_version = info.server_version
        report.add(sibling.api_version_check(report.api_version))
        if request.runtimes:
            report.checks.extend(runtime_checks(info, request.runtimes))
        compiles = map_host_dirs(engine, request, report)
        if compiles is not None and request.image:
            report.proof = prove(engine, request, compiles, path, report)
        elif request.image:
            report.proof = Proof("skipped", "no host compiles dir to prove")
        else:
            report.proof = Proof("skipped", "no compile image given")
    finally:
        engine.close()


def runtime_checks(info: EngineInfo, needed: tuple[str, ...]) -> list[Check]:
    """Whether the host's engine offers the runtimes compiles are to run under (a refusal with
    the fix when not), and runsc the arguments the profile needs (a warning when not)."""
    offered = dict(info.runtime_args) or {name: () for name in info.runtimes}
    missing = runtime.missing_runtimes(frozenset(needed), offered)
    if missing:
        return [
            Check(
                "runtime",
                Status.FAIL,
                f"compiles are to run under {', '.join(missing)} but the host's engine offers "
                f"only {', '.join(sorted(offered)) or 'its default'}",
                runtime.HOST_FIX,
            )
        ]
    checks = [Check("runtime", Status.OK, f"the host's engine offers {', '.join(needed)}")]
    if runtime.RUNSC in needed:
        lacking = runtime.missing_args(offered)
        if lacking:
            checks.append(
                Check(
                    "runtime",
                    Status.WARN,
                    f"the host's runsc runs without {' '.join(lacking)}: the compile's seccomp "
                    "profile is not applied inside gVisor without --oci-seccomp",
                    runtime.HOST_FIX,
                )
            )
    return checks


def connect(path: Path, deadline: float, report: Report) -> Engine | None:
    """The engine once it answers; None (and the reason reported) by the deadline."""
    try:
        return Engine.connect(f"unix://{path}", deadline, first_wait=0.05)
    except EngineError as e:
        verdict = sibling.probe_socket(path)
        if verdict.status is Status.OK:
            verdict = Check(
                "engine",
                Status.FAIL,
                f"{path} accepts connections but no Docker API answers there ({e})",
                f"mount the host's Docker socket: `{sibling.SOCKET_VOLUME}`",
            )
        report.add(verdict)
    return None


def map_host_dirs(
    engine: Engine, request: SiblingRequest, report: Report
) -> sibling.HostDir | None:
    """The host dirs behind ours, from this container's inspect data, checked against settings."""
    mounts, why = inspect_self(engine, request, report)
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
        use = str(host_dir.use) if host_dir.use is not None else ""
        if kind == "compiles":
            report.host_dir_compiles = use
            chosen = host_dir if verdict.status is not Status.FAIL else None
        else:
            report.host_dir_output = use
        report.derived = report.derived or host_dir.derived
    return chosen


def inspect_self(
    engine: Engine, request: SiblingRequest, report: Report
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
        data = engine.inspect_container(container_id)
    except NotFound:
        report.container_id = container_id
        return None, (
            f"the engine behind the socket knows no container {container_id[:12]} (the id in "
            f"{source}): is this the socket of the host this container runs on?"
        )
    except EngineUnreachable:
        raise
    except EngineError as e:
        report.container_id = container_id
        return None, f"inspecting {container_id[:12]} failed: {e}"
    report.container_id = str(data.get("Id", container_id))
    return sibling.mounts_from_inspect(data), ""


def prove(
    engine: Engine,
    request: SiblingRequest,
    compiles: sibling.HostDir,
    socket_path: Path,
    report: Report,
) -> Proof:
    """A container on the host engine writes a marker through the host path; we read it here.

    The marker goes into a fresh dir made here (owned by the compiles root's owner, writable by
    its group): the container binds only `<host dir>/<that dir>`, so it can write nothing else,
    and the engine finds that source only if the host dir is this container's dir. It writes as
    a compile does: a uid of the compile range (`request.proof_uid`) in the dir's group, so a
    host whose engine cannot run that uid, or whose filesystem denies its group's write, fails
    here, in one check, rather than in every compile."""
    here = request.compiles_dir
    host = compiles.use
    if host is None:
        return Proof("skipped", "no host compiles dir to prove")
    if not here.is_dir():
        return Proof(
            "skipped",
            f"{here} does not exist yet (the startup scripts make it); the proof runs once it does",
        )
    if not engine.image_present(request.image):
        return Proof(
            "skipped",
            f"the compile image {request.image} is not on the host engine yet; "
            "the proof runs once it is",
        )
    marker = PROOF_PREFIX + secrets.token_hex(8)
    made = here / marker
    try:
        _, group = make_marker_dir(made, proof_user(here))
    except OSError as e:
        return Proof("skipped", f"cannot make the marker dir {made}: {e.strerror}")
    try:
        user = (request.proof_uid, group)
        failure = write_and_read_back(engine, request.image, host, here, marker, user)
    finally:
        shutil.rmtree(made, ignore_errors=True)
    if failure is None:
        message = (
            f"a container on the host engine wrote {host}/{marker}/marker; it appeared here "
            f"as {made}/marker"
        )
        report.add(Check("proof", Status.OK, message))
        return Proof("passed", message)
    report.add(Check("proof", Status.FAIL, failure, _proof_fix(compiles, here, socket_path)))
    return Proof("failed", failure)


def write_and_read_back(
    engine: Engine,
    image: str,
    host: PurePosixPath,
    here: Path,
    marker: str,
    user: tuple[int, int],
) -> str | None:
    """None when a token written to `host/marker/marker` by a container is read back here."""
    token = secrets.token_hex(16)
    written = run_in_compile_dir(
        engine, image, host / marker, user, 'printf %s "$1" > "$2"', token,
        f"{PROOF_MOUNT}/marker",
    )  # fmt: skip
    if written is not None and "does not exist" in written:  # the engine: no bind source
        return (
            f"a container on the host engine found no {host}/{marker} on the host, yet it was "
            f"made here as {here}/{marker}: {host} is not this container's {here}"
        )
    if written is not None:
        return f"a container on the host engine could not write into {host}: {written}"
    try:
        content = (here / marker / "marker").read_text()
    except OSError:
        content = None
    if content == token:
        return None
    return (
        f"a container on the host engine wrote {marker}/marker into {host} on the host, but it "
        f"did not appear here in {here}: {host} is not this container's {here}"
    )


def proof_user(here: Path) -> tuple[int, int]:
    """The uid:gid the marker dir belongs to (the proof container runs as a compile uid in its
    group): never root. The compiles root's owner (the compiles' own user) when it is not
    root's, else nobody; this process's own when it is not root (it can give the marker dir to
    nobody else)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    info = here.stat()
    if info.st_uid != 0 and info.st_gid != 0:
        return info.st_uid, info.st_gid
    return NOBODY


def make_marker_dir(path: Path, user: tuple[int, int]) -> tuple[int, int]:
    """A fresh dir, the one thing the proof container may write: `user`'s, its group may write
    (as a compile dir the runner shared, init.compiles.identity)."""
    os.mkdir(path, 0o700)
    if os.geteuid() == 0:
        os.chown(path, *user)
    os.chmod(path, 0o2770)
    return user


def run_in_compile_dir(
    engine: Engine,
    image: str,
    host: PurePosixPath,
    user: tuple[int, int],
    script: str,
    *arguments: str,
) -> str | None:
    """Run `sh -c script` with only `host` (a marker dir) bound at PROOF_MOUNT, under the
    compile profile: `user`, no capabilities, no network, no new privileges, a read-only root,
    small memory, process and file size limits. None, or what went wrong."""
    # A `type=bind` mount, unlike `-v`, refuses a missing source instead of creating it empty
    # on the host: the very trap being checked for.
    try:
        ran = engine.run_once(
            image,
            ("/bin/sh", "-c", script, "proof", *arguments),
            binds=[(str(host), PROOF_MOUNT)],
            user=f"{user[0]}:{user[1]}",
            labels={COMPILE_LABEL: "proof"},
            deadline=PROOF_DEADLINE,
            host_config=PROOF_PROFILE,
        )
    except ImageMissing as e:
        return str(e)
    except EngineUnreachable as e:
        return f"no answer in {PROOF_DEADLINE} s ({e})"
    except EngineError as e:
        return str(e)
    if ran.exit_status != 0:
        return f"the marker container exited with status {ran.exit_status}: {ran.output}"
    return None


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


class Stopped(BaseException):
    """PID 1 ends this check (its shutdown): unwind, so the proof container and the marker dir
    made so far are removed on the way out (their `finally`), then end by the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    # The one handler in the init that does work: this child is one-shot and blocks in the
    # SDK's socket reads, with no loop to hear a signal in. Raising is all it does; a second
    # signal during the clean-up is ignored.
    for each in STOP_SIGNALS:
        signal.signal(each, signal.SIG_IGN)
    raise Stopped(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: Sequence[str] | None = None) -> int:
    request = SiblingRequest.from_argv(sys.argv[1:] if argv is None else argv)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    try:
        result = check(request, dict(os.environ))
    except Stopped as stopped:
        return 128 + stopped.signum
    result.write(request.result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())


def _posix(path: Path | None) -> PurePosixPath | None:
    return PurePosixPath(path) if path is not None else None
