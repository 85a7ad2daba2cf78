"""A compile's container as plain values: the job, the command, its environment, the
container's profile and name, checked by the unit tests and sent by
init.engine.client.DockerBackend.

Speed: each project gets one long-lived container (its compile dir bound, the whole profile
applied, an idle watchdog as its PID 1) and each compile is a `docker exec` into it: about two
engine round trips instead of create, start, wait and remove. The container ends by itself:
every compile runs under `timeout -s KILL` inside it, and its PID 1 exits once nothing else has
run there for the idle time (or at its maximum lifetime), so a runner or shim that is SIGKILLed
leaves nothing running past the compile's timeout plus the idle time. `--auto-remove` then
removes it.

Profile, against Overleaf's last public docker runner (DockerRunner.js: no network, CapDrop ALL,
no-new-privileges, an optional seccomp file, a CPU-time ulimit, Memory of 1 TiB, a writable root
unless `Readonly`, log driver none, a configurable user): network none; every capability
dropped; no-new-privileges; our own seccomp allow-list with no socket call (the engine's default
if it cannot be loaded, with a warning); read-only root; /tmp (also HOME and TEXMFVAR) a
nosuid, nodev, noexec tmpfs of a fixed size, emptied before and after each compile; the
project's own uid and the compile dir's group, never root's (init.compiles.identity);
memory with swap equal to it; a process limit; a CPU limit; RLIMIT_FSIZE, RLIMIT_NOFILE,
RLIMIT_CPU and no core files; a wall-clock limit that kills the compile; `shell_escape=f`
(kpathsea reads it from the environment, so it holds whatever flags latexmk passes; `p`,
restricted, is an opt-in); the image in the allow-list; log driver none; a private IPC
namespace. A project's `latexmkrc` is Perl and runs: the container, not TeX, is the fence.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from init.compiles.contract import ENGINE_FLAGS, ENGINES
from init.compiles.paths import CompileDir
from init.compiles.settings import KILL_GRACE, SHELL_ESCAPE, TMPFS_INODES, Limits

# The labels every compile container carries (the engine's sweeps go by them).
from init.engine.client import COMPILE_ID_LABEL, COMPILE_LABEL, EXPIRES_LABEL, PROJECT_LABEL
from init.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (4 ms a compile)
if TYPE_CHECKING:
    from typing import Any


JOBNAME = "output"
# What a compile sees of the caller's environment: the variables TeX and chktex honour.
PASSED_VARIABLES = ("SOURCE_DATE_EPOCH", "FORCE_SOURCE_DATE", "CHKTEX_OPTIONS",
                    "CHKTEX_EXIT_ON_ERROR", "CHKTEX_ULIMIT_OPTIONS", "CHKTEX_VALIDATE")  # fmt: skip
SECCOMP_PROFILE = Path(__file__).with_name("seccomp.json")  # package data beside this module


@dataclass(frozen=True)
class Job:
    """One compile: the command, where it runs, in what image."""

    directory: CompileDir
    command: tuple[str, ...]
    image: str
    environment: Mapping[str, str] = field(default_factory=dict)
    compile_id: str = field(default_factory=lambda: os.urandom(8).hex())


def latexmk_command(directory: Path, main: str, engine: str) -> tuple[str, ...]:
    """What Community Edition's LatexRunner runs, for `sharelatex-init compile`."""
    if engine not in ENGINES:
        raise ConfigError([f"--engine {engine}: use one of {', '.join(ENGINES)}"])
    if Path(main).is_absolute() or ".." in Path(main).parts:
        raise ConfigError([f"--main {main}: give a file name inside the project, e.g. main.tex"])
    return (
        "latexmk", "-cd", f"-jobname={JOBNAME}", f"-auxdir={directory}", f"-outdir={directory}",
        "-synctex=1", "-interaction=batchmode", "-time", "-halt-on-error", ENGINE_FLAGS[engine],
        str(directory / main),
    )  # fmt: skip


def compile_environment(limits: Limits, caller: Mapping[str, str]) -> dict[str, str]:
    """The compile's environment: HOME and the font caches on the tmpfs, shell escape off."""
    env = {k: caller[k] for k in PASSED_VARIABLES if k in caller}
    env.update(
        HOME="/tmp",
        TEXMFVAR="/tmp/texmf-var",
        VARTEXFONTS="/tmp/texfonts",
        LANG="C.UTF-8",
        # kpathsea takes texmf.cnf variables from the environment first: this holds for every
        # TeX run, whatever flags a caller (or a project's latexmkrc) passes.
        shell_escape=SHELL_ESCAPE[limits.shell_escape],
        openout_any="p",
    )
    return env


# The exec path's compile shell (gone from the compile path: every compile is a request to
# the project's agent, init/broker/agent.pl, whose `sub tidy` keeps these rules; this stays for
# scripts/bench/broker's `docker exec` reference column and its unit tests), as the project's
# uid: $0 the compile dir, $1 the uid, then the timeout and the command.
# - `kill -KILL -1` reaches every process of the container but its PID 1 and this shell: after
#   the compile, whatever it left running (a daemon a latexmkrc forked, in a session of its
#   own); before it, the leftovers of an earlier compile that killed this shell (the queue
#   runs one command of a project at a time, so nothing of ours is there to lose).
# - /tmp (HOME, TEXMFVAR, VARTEXFONTS) is emptied before and after, dotfiles and all: a
#   `.latexmkrc`, `texmf.cnf` or font cache one compile planted there never reaches the next.
#   One rm of the shell's globs in the usual case (a pattern that matched nothing is a name rm
#   -f ignores). When it fails (a dir made 0000 or 0555; more entries than one command line
#   holds: the tmpfs's nr_inodes of empty files), find opens up the compile's dirs (its
#   `-exec ... \;` changes a dir before it reads it) and feeds rm in batches. Neither crosses
#   into another filesystem: a compile dir bound under /tmp (the tests put theirs there) is never
#   entered, only the dirs above it are left (that case always takes the second way). Nothing
#   is made again: TeX and luaotfload make TEXMFVAR's dirs as they need them, as on a first
#   compile.
# - What the compile made in its dir is handed back to the dir's group (init.compiles.identity):
#   dirs rwx and setgid for the group, files readable and writable by it, never setuid or
#   setgid. `-exec ... \;` on a dir runs before find reads it, so a 0000 dir is opened up
#   first; in the usual case nothing needs a change and find is the one process.
# - umask 002: what the compile writes is its group's (CLSI's) to read, replace and remove.
_COMPILE_SCRIPT = r"""dir=$0 uid=$1; shift
umask 002
fresh_tmp() {
  rm -rf --one-file-system -- /tmp/* /tmp/.[!.]* /tmp/..?* 2>/dev/null && return
  find /tmp -mindepth 1 -xdev -type d -user "$uid" ! -perm -u=rwx \
    -exec chmod u+rwx {} \; 2>/dev/null
  find /tmp -mindepth 1 -maxdepth 1 -xdev -exec rm -rf --one-file-system -- {} + 2>/dev/null
}
hand_back() {
  find "$dir" \( -type d -user "$uid" ! -perm -2770 -exec chmod u+rwx,g+rwxs {} \; \) \
    -o \( -type f -user "$uid" \( ! -perm -g=rw -o -perm /6000 \) \
          -exec chmod g+rw,ug-s {} + \) 2>/dev/null
}
kill -KILL -1 2>/dev/null
fresh_tmp; hand_back
[ "$#" -eq 0 ] && exit 0
timeout -s KILL "$@"; status=$?
kill -KILL -1 2>/dev/null
fresh_tmp; hand_back
exit $status"""


def exec_command(job: Job, limits: Limits) -> list[str]:
    """The compile inside the container, as the project's uid: killed with its whole process
    group at the timeout, by the container itself, so a runner that dies cannot leave it
    running; then whatever it started that is still there, so the project's next compile finds
    nothing of it, not even in /tmp; and what it wrote handed back to CLSI (_COMPILE_SCRIPT)."""
    directory = job.directory
    return ["sh", "-c", _COMPILE_SCRIPT, str(directory.path), str(directory.compile_uid),
            f"{limits.timeout:g}", *job.command]  # fmt: skip


# Seconds a new container waits for its first compile on top of the idle time.
FIRST_EXEC_GRACE = 2 * KILL_GRACE


def watchdog_command(limits: Limits) -> list[str]:
    """The container's PID 1 in a bare spec: exits (ending the container) once only it has
    run there for `idle` seconds, or at the container's lifetime. Its children are reaped by
    the shell. The broker replaces it with its agent (init.broker.target); the benches' exec
    containers keep it."""
    step = 1 if limits.idle < 10 else 2
    # SIGTERM (docker stop, dockerd stopping with the site) ends it at once: the sleep runs in
    # the background so the trap is not held up by it. Its only child is that sleep: a
    # compile's `kill -1` may come at any moment, and a `$(date)` it killed read as "" ended
    # the loop and the container under the compile's exit status (1 compile in 20 at once
    # under gVisor on a loaded machine). The clock is /proc/uptime, read by a builtin. Until
    # the first compile shows, the quiet time starts below zero by FIRST_EXEC_GRACE: a first
    # exec that took longer than the idle time to start (4.4 s under gVisor, loaded, for an
    # idle of 2 s) found the container stopping. Not the runner's whole patience for an exec
    # (the timeout and more): a runner SIGKILLed before its exec would leave an empty
    # container that long.
    first = int(FIRST_EXEC_GRACE)
    script = (
        "trap 'exit 0' TERM INT; "
        f"read up _ < /proc/uptime; end=$(( ${{up%.*}} + {int(limits.deadlines.lifetime)} )); "
        f'quiet=-{first}; while read up _ < /proc/uptime && [ "${{up%.*}}" -lt "$end" ]; do '
        # A sleep killed early is a compile's end (its `kill -1`): not a quiet period, however
        # short the compile was (synctex, texcount: tens of ms, never seen among the processes;
        # under gVisor the compile's own shell is gone by the time this wakes).
        f"sleep {step} & wait $! || {{ quiet=0; continue; }}; set -- /proc/[0-9]*; "
        f'if [ "$#" -gt 1 ]; then quiet=0; else quiet=$((quiet + {step})); '
        f'[ "$quiet" -ge {max(int(limits.idle), step)} ] && exit 0; fi; '
        "done"
    )
    return ["sh", "-c", script]


def container_name(directory: CompileDir, image: str, limits: Limits, runtime: str = "runc") -> str:
    """One container per project and profile: a changed image, limit or runtime gets a new
    one."""
    fingerprint = zlib.crc32(
        json.dumps(
            [
                str(directory.path),
                str(directory.source),
                image,
                directory.uid,
                directory.gid,
                directory.compile_uid,
                limits.memory,
                limits.pids,
                limits.cpus,
                limits.timeout,
                limits.tmpfs,
                limits.output,
                limits.nofile,
                limits.shell_escape,
                *([runtime] if runtime != "runc" else []),  # runc's names stay as they were
            ]
        ).encode()
    )
    return f"sharelatex-init-compile-{directory.project}-{fingerprint:08x}"


@dataclass(frozen=True)
class ContainerSpec:
    """What the engine is asked to create: plain values, checked by the unit tests."""

    name: str
    image: str
    command: list[str]
    user: str
    working_dir: str
    environment: dict[str, str]
    labels: dict[str, str]
    host_config: dict[str, Any]  # the Engine API's HostConfig
    expires: float

    def create_body(self) -> dict[str, Any]:
        """The body of `POST /containers/create`."""
        return {
            "Image": self.image,
            "Cmd": self.command,
            "User": self.user,
            "WorkingDir": self.working_dir,
            "Env": [f"{k}={v}" for k, v in self.environment.items()],
            "Labels": self.labels,
            "NetworkDisabled": True,
            "AttachStdin": False,
            "AttachStdout": False,
            "AttachStderr": False,
            "Tty": False,
            "HostConfig": self.host_config,
        }


def container_spec(
    job: Job,
    limits: Limits,
    seccomp: str | None,
    now: float | None = None,
    runtime: str = "runc",
) -> ContainerSpec:
    """The profile of a project's container (see the module docstring for each choice; for
    runsc, init.engine.runtime's)."""
    now = time.time() if now is None else now
    security = ["no-new-privileges"]
    if seccomp is not None:
        security.append(f"seccomp={seccomp}")
    deadlines = limits.deadlines
    expires = now + deadlines.lifetime
    spec = ContainerSpec(
        name=container_name(job.directory, job.image, limits, runtime),
        image=job.image,
        command=watchdog_command(limits),
        user=job.directory.compile_user,
        working_dir=str(job.directory.path),
        environment=compile_environment(limits, {}),
        labels={
            COMPILE_LABEL: "1",
            PROJECT_LABEL: job.directory.project,
            COMPILE_ID_LABEL: job.compile_id,
            EXPIRES_LABEL: f"{expires:.0f}",
        },
        host_config={
            # The compile dir at the same absolute path as here (latexmk's arguments name it);
            # a bind mount of a missing source fails rather than making an empty dir.
            "Mounts": [
                {
                    "Type": "bind",
                    "Source": str(job.directory.source),
                    "Target": str(job.directory.path),
                    "ReadOnly": False,
                    "BindOptions": {"Propagation": "rprivate"},
                }
            ],
            "NetworkMode": "none",
            "CapDrop": ["ALL"],
            "SecurityOpt": security,
            "ReadonlyRootfs": True,
            "Tmpfs": {
                "/tmp": f"rw,nosuid,nodev,noexec,size={limits.tmpfs},"
                f"nr_inodes={TMPFS_INODES},mode=1777"
            },
            "Memory": limits.memory,
            "MemorySwap": limits.memory,
            "PidsLimit": limits.pids,
            "NanoCpus": int(limits.cpus * 1e9),
            "Ulimits": [
                {"Name": "fsize", "Soft": limits.output, "Hard": limits.output},
                {"Name": "nofile", "Soft": limits.nofile, "Hard": limits.nofile},
                {"Name": "cpu", "Soft": deadlines.cpu_soft, "Hard": deadlines.cpu_hard},
                {"Name": "core", "Soft": 0, "Hard": 0},
            ],
            "LogConfig": {"Type": "none", "Config": {}},
            "IpcMode": "private",
            "AutoRemove": True,
            "Privileged": False,
            "Init": False,
        },
        expires=expires,
    )
    return gvisor_profile(spec, limits) if runtime == "runsc" else spec


def gvisor_profile(spec: ContainerSpec, limits: Limits) -> ContainerSpec:
    """The profile under runsc: the engine's pids limit bounds the sandbox's host tasks (the
    Sentry's threads count there), the compile's processes are held by RLIMIT_NPROC, which the
    Sentry enforces inside the sandbox (init.engine.runtime says why)."""
    from init.engine.runtime import RUNSC, host_tasks

    host_config = dict(spec.host_config)
    host_config["Runtime"] = RUNSC
    host_config["PidsLimit"] = host_tasks(limits.pids)
    host_config["Ulimits"] = [
        *host_config["Ulimits"],
        {"Name": "nproc", "Soft": limits.pids, "Hard": limits.pids},
    ]
    return replace(spec, host_config=host_config)


def load_seccomp(warn: Callable[[str], None]) -> str | None:
    """Our seccomp allow-list as the JSON text the engine takes; None (the engine's default
    profile) with a warning when it cannot be read."""
    try:
        text = SECCOMP_PROFILE.read_text(encoding="utf-8")
        document = json.loads(text)
        if document.get("defaultAction") != "SCMP_ACT_ERRNO":
            raise ValueError("not an allow-list")
    except (OSError, ValueError) as e:
        warn(
            f"cannot load init/compiles/seccomp.json ({e}); "
            "using the engine's default seccomp profile"
        )
        return None
    return json.dumps(document, separators=(",", ":"))
