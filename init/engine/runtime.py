"""The OCI runtime compile containers run under: runc, or gVisor's runsc when the operator asks.

runsc puts an application kernel (the Sentry) between a document and the host's kernel: a TeX
engine bug that reaches a kernel bug meets gVisor's kernel, not the host's. The profile of
init.compiles.profile holds under it, with what differs written down here and in the README:

- The engine's pids limit counts the sandbox's *host* tasks (the Sentry's Go threads, the gofer,
  and with ptrace a stub per application process): 39 at rest, ~5 more per sleeping process
  here, so a limit of 64 kills the sandbox at its first pipe. Under runsc the container's
  PidsLimit is a bound on those host tasks (`host_tasks`), and the compile's own process limit
  is RLIMIT_NPROC, which the Sentry enforces per uid inside the sandbox (a fork fails with
  EAGAIN, as under runc's pids cgroup; under runc NPROC would count the host's processes of
  that uid, so it is not used there).
- runsc ignores the container's seccomp profile unless started with `--oci-seccomp`; then the
  Sentry applies it to the application (socket() fails with EPERM as under runc), and gVisor's
  own filter still fences the Sentry. The inner dockerd registers runsc with it.
- Memory: the cgroup limit is on the whole sandbox; the OOM killer ends the Sentry, so the
  whole container dies (runc: only the biggest process). The engine still emits its `oom`
  event; the agent, the container's PID 1, dies with it, so the broker sees its attached
  stream end (init.broker.warm) and reads the event (a `docker exec`'s stream, by contrast,
  stays open there: dockerd 20.10, runc v2 shim).
- The platform: KVM where /dev/kvm can serve it, else ptrace. systrap (runsc from mid-2023 on,
  e.g. Debian's 20240729 in bookworm-backports and trixie; `runsc help platforms` lists it) is
  taken only when asked: measured here (2 shared cores, no KVM) under runsc 20240729 it did not
  beat ptrace, a sandbox of either platform of that runsc cost several times the CPU of
  20221219's ptrace per compile (its threads spin), and a fork bomb under systrap ended as an
  engine timeout instead of the process limit. On a VM whose /dev/kvm is PVM's (kvm_pvm: no
  vmx/svm flag in /proc/cpuinfo) runsc 20221219's KVM platform hangs in its start, spinning a
  core: `auto` passes KVM over there and `kvm` is refused with that reason.

Docker-in-docker registers runsc with the inner dockerd through a daemon config (runtime args
need one: `--add-runtime` takes a path only). Sibling mode cannot: the host engine must offer a
`runsc` runtime (its `docker info` Runtimes), else the boot is refused with the fix. Standard
library only: PID 1 imports this.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from init.config import COMPILE_RUNTIME, DOCKERD_ARGS, RUNSC_PLATFORM, Settings
from init.errors import ConfigError

RUNC = "runc"
RUNSC = "runsc"
RUNSC_BINARY = Path("/usr/bin/runsc")  # Debian's package
# What every runsc of ours gets: no network stack of its own (the container has none anyway),
# and the container's seccomp profile applied inside the sandbox.
RUNSC_ARGS = ("--network=none", "--oci-seccomp")
# Host tasks of a sandbox under ptrace (measured, runsc 20221219): 39 at rest, 373 with 63
# sleeping processes (~5.3 each). The bound leaves room for busy processes (threads, stubs).
SANDBOX_TASKS = 64
TASKS_PER_PROCESS = 8
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
DAEMON_JSON = Path("/etc/docker/daemon.json")
RUNSC_INSTALL = "install Debian's runsc in the image (apt-get install runsc)"


def runtime_for(settings: Settings, image: str) -> str:
    """The runtime `image` runs under (runc for an image the settings do not list)."""
    return dict(settings.compile_runtimes).get(image, RUNC)


def wanted(settings: Settings) -> frozenset[str]:
    """The runtimes beyond the engine's default that some compile image needs."""
    return frozenset(r for _, r in settings.compile_runtimes if r != RUNC)


def host_tasks(processes: int) -> int:
    """The engine's pids limit for a runsc sandbox whose compile may have `processes`."""
    return SANDBOX_TASKS + TASKS_PER_PROCESS * processes


def describe(settings: Settings, platform: str = "") -> str:
    """`runsc (gVisor, platform ptrace)` for every image, or image by image."""

    def name(runtime: str) -> str:
        if runtime != RUNSC:
            return runtime
        return f"runsc (gVisor, platform {platform})" if platform else "runsc (gVisor)"

    runtimes = {r for _, r in settings.compile_runtimes}
    if len(runtimes) <= 1:
        return f"{name(next(iter(runtimes), RUNC))} for every compile image"
    return "; ".join(f"{image}: {name(r)}" for image, r in settings.compile_runtimes)


# -- the platform, in docker-in-docker ------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """The gVisor platform chosen, and why (for the log and `doctor`)."""

    name: str  # kvm, systrap or ptrace
    reason: str


# Where a runsc with systrap comes from (gVisor's from mid-2023 on).
NEWER_RUNSC = "runsc 20240729 (Debian bookworm-backports, trixie)"


def offered_platforms(binary: Path) -> frozenset[str]:
    """The platforms `runsc help platforms` lists; ptrace and kvm (every runsc's) when it
    cannot say."""
    import subprocess

    always = frozenset({"ptrace", "kvm"})
    try:
        done = subprocess.run(
            [str(binary), "help", "platforms"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return always
    listed = {line.strip() for line in done.stdout.splitlines() if line.strip().isalpha()}
    return frozenset(listed) | always


def kvm_api_version(device: Path) -> int | None:
    """KVM_GET_API_VERSION of `device` opened read-write; None when it cannot be opened."""
    import fcntl

    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError:
        return None
    finally:
        os.close(fd)


def kvm_problem(root: Path, api_version: Callable[[Path], int | None] = kvm_api_version) -> str:
    """Why runsc's KVM platform cannot run here, or "" when it can."""
    device = root / "dev" / "kvm"
    try:
        if not stat.S_ISCHR(os.stat(device).st_mode):
            return f"{device} is not a device"
    except OSError:
        return f"no {device} (run with --device /dev/kvm where the host has KVM)"
    version = api_version(device)
    if version is None:
        return f"{device} cannot be opened read-write"
    if version != KVM_API_VERSION:
        return f"{device} speaks KVM API {version}, not {KVM_API_VERSION}"
    try:
        cpuinfo = (root / "proc" / "cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags") for w in line.split()}
    if not flags & {"vmx", "svm"}:
        pvm = " (served by kvm_pvm)" if (root / "sys" / "module" / "kvm_pvm").exists() else ""
        return (
            f"{device} is there{pvm} but the CPU shows no vmx/svm in /proc/cpuinfo: gVisor's KVM "
            "platform needs hardware virtualization (here it hangs in its start)"
        )
    return ""


def choose_platform(
    asked: str,
    root: Path = Path("/"),
    api_version: Callable[[Path], int | None] = kvm_api_version,
    platforms: Callable[[Path], frozenset[str]] = offered_platforms,
) -> Platform:
    """kvm, systrap or ptrace for `asked` (auto or one of them); ConfigError when the one asked
    cannot run here."""
    if asked == "ptrace":
        return Platform("ptrace", f"{RUNSC_PLATFORM}=ptrace")
    offered = platforms(root / RUNSC_BINARY.relative_to("/"))
    if asked == "systrap":
        if "systrap" not in offered:
            raise ConfigError([f"{RUNSC_PLATFORM}=systrap: this runsc offers only "
                               f"{', '.join(sorted(offered))}; install {NEWER_RUNSC}, or use "
                               f"{RUNSC_PLATFORM}=auto"])  # fmt: skip
        return Platform("systrap", f"{RUNSC_PLATFORM}=systrap")
    problem = kvm_problem(root, api_version)
    if asked == "kvm":
        if problem:
            fix = f"use {RUNSC_PLATFORM}=auto (or ptrace)"
            raise ConfigError([f"{RUNSC_PLATFORM}=kvm cannot run here: {problem}; {fix}"])
        return Platform("kvm", f"{RUNSC_PLATFORM}=kvm and /dev/kvm can serve it")
    if not problem and "kvm" in offered:
        return Platform("kvm", "/dev/kvm is usable and the CPU has hardware virtualization")
    # systrap only when asked (the module docstring says why).
    systrap = (f"; systrap is there too, taken only when asked ({RUNSC_PLATFORM}=systrap)"
               if "systrap" in offered else "")  # fmt: skip
    return Platform("ptrace", f"not KVM: {problem}{systrap}")


# -- docker-in-docker: registering runsc with the inner dockerd ----------------------------


@dataclass(frozen=True)
class Registration:
    """The inner dockerd's daemon config with runsc in it, and the flag that points at it."""

    path: Path
    document: Mapping[str, object]
    platform: Platform

    def dockerd_args(self) -> tuple[str, ...]:
        return ("--config-file", str(self.path))


def runsc_args(platform: Platform) -> tuple[str, ...]:
    return (*RUNSC_ARGS, f"--platform={platform.name}")


def plan_registration(
    settings: Settings,
    extra_args: tuple[str, ...],
    run_dir: Path,
    root: Path = Path("/"),
    api_version: Callable[[Path], int | None] = kvm_api_version,
) -> Registration | None:
    """What the inner dockerd needs to offer runsc (None when no image runs under it): the
    operator's /etc/docker/daemon.json (dockerd reads only one) with our runtime added. A
    ConfigError with the fix when runsc cannot be offered."""
    if RUNSC not in wanted(settings):
        return None
    problems = []
    binary = root / RUNSC_BINARY.relative_to("/")
    if not os.access(binary, os.X_OK):
        problems.append(f"{COMPILE_RUNTIME} asks for runsc but {RUNSC_BINARY} is not in the "
                        f"image; {RUNSC_INSTALL}, or set {COMPILE_RUNTIME}=runc")  # fmt: skip
    if any(a == "--config-file" or a.startswith("--config-file=") for a in extra_args):
        problems.append(f"{DOCKERD_ARGS} names a --config-file: add runsc to its \"runtimes\" "
                        f"yourself or drop the flag so that sharelatex-init can")  # fmt: skip
    if any(a == "--add-runtime" or a.startswith("--add-runtime=runsc") for a in extra_args):
        problems.append(f"{DOCKERD_ARGS} adds a runtime: remove --add-runtime, sharelatex-init "
                        "registers runsc itself")  # fmt: skip
    if problems:
        raise ConfigError(problems)
    platform = choose_platform(settings.runsc_platform, root, api_version)
    document = _daemon_json(root / DAEMON_JSON.relative_to("/"))
    runtimes = dict(document.get("runtimes") or {})  # type: ignore[call-overload]
    runtimes[RUNSC] = {"path": str(RUNSC_BINARY), "runtimeArgs": list(runsc_args(platform))}
    document["runtimes"] = runtimes
    return Registration(run_dir / "dockerd.json", document, platform)


def _daemon_json(path: Path) -> dict[str, object]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError([f"{path}: cannot read it as JSON ({e}); fix or remove it"]) from e
    if not isinstance(document, dict):
        raise ConfigError([f"{path}: not a JSON object; fix or remove it"])
    return document


def apply_registration(registration: Registration) -> None:
    """Write the daemon config whole (never half-written)."""
    path = registration.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(registration.document, indent=2) + "\n")
    os.replace(tmp, path)


# -- sibling mode: what the host's engine offers ---------------------------------------------

# How an operator registers runsc on the host (its /etc/docker/daemon.json), in one line.
HOST_FIX = (
    'add to the host\'s /etc/docker/daemon.json: "runtimes": {"runsc": {"path": '
    '"/usr/bin/runsc", "runtimeArgs": ["--network=none", "--oci-seccomp"]}} (apt-get install '
    "runsc), then `systemctl reload docker`"
)


def missing_runtimes(needed: frozenset[str], offered: Mapping[str, tuple[str, ...]]) -> list[str]:
    """The runtimes compiles need that the engine does not offer, sorted."""
    return sorted(r for r in needed if r not in offered)


def missing_args(offered: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Of RUNSC_ARGS, those the engine's runsc is not given (the profile needs them)."""
    given = offered.get(RUNSC, ())
    return [a for a in RUNSC_ARGS if a not in given]
