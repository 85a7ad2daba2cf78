"""Every container create held to the compile profile: rewritten where that is harmless,
refused where it is not.

A compile runner (the init's own, Server Pro's DockerRunner.js, `docker run` by hand) may send
what it likes; the engine gets a container that has: an allowed image, a user that is not root,
no network, every capability dropped, no-new-privileges, no weakening security option, a
read-only root with size-capped tmpfs mounts, memory (swap equal), process and CPU limits no
higher than the init's, binds only of dirs under the compiles and output roots, and the compile
label with an expiry, so that the sweeps remove it even when its runner never does (Server
Pro's keeps its containers). Escapes are refused with the reason; what only widens a limit, or
has no meaning without a network, is brought back to the profile (`rewritten` says what).

The engine's decoder reads field names without regard to case and takes the host config from
the top level when `HostConfig` is missing (pre-1.24 clients' shape): both are closed by
matching names folded (body.py), refusing any top-level field that is not a container field,
and always sending a HostConfig of our own making.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from init.engine.client import COMPILE_LABEL, EXPIRES_LABEL
from init.proxy import binds, body, seccomp
from init.proxy.decision import Refused
from init.proxy.settings import ProxyConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The container's own fields (moby's container.Config) that cannot reach past the container.
KEPT = (
    "Hostname", "Domainname", "AttachStdin", "AttachStdout", "AttachStderr", "Tty",
    "OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped", "WorkingDir",
    "Entrypoint", "StopSignal", "StopTimeout", "Shell", "Volumes",
)  # fmt: skip
CHECKED = ("Image", "User", "Labels", "HostConfig", "NetworkDisabled")
# Meaningless with no network, or the old top-level spelling of limits the profile sets; and
# `name`, which dockerode echoes in the body (the engine takes it from the query only).
DROPPED = ("MacAddress", "ExposedPorts", "OnBuild", "NetworkingConfig", "Memory", "MemorySwap",
           "CpuShares", "Cpuset", "Name")  # fmt: skip

# HostConfig: kept as given (limits of their own, or inside the container only) ...
HOST_KEPT = (
    "AutoRemove", "Init", "ConsoleSize", "CpuShares", "CpusetCpus", "CpusetMems",
    "BlkioWeight", "BlkioWeightDevice", "BlkioDeviceReadBps", "BlkioDeviceWriteBps",
    "BlkioDeviceReadIOps", "BlkioDeviceWriteIOps", "Ulimits", "MemorySwappiness",
)  # fmt: skip
# ... set by the profile whatever was asked (checked first where asking is an escape) ...
HOST_SET = (
    "Privileged", "CapAdd", "CapDrop", "NetworkMode", "SecurityOpt", "ReadonlyRootfs", "Tmpfs",
    "Memory", "MemorySwap", "MemoryReservation", "PidsLimit", "NanoCpus", "ShmSize",
    "Binds", "Mounts", "LogConfig", "IpcMode", "PidMode", "UTSMode", "UsernsMode",
    "CgroupnsMode", "Runtime", "Isolation", "OomScoreAdj",
)  # fmt: skip
# ... refused unless empty (each reaches past the container: devices, the host's cgroups,
# other containers' volumes or namespaces, kernel parameters, another runtime's features) ...
HOST_REFUSED = (
    "Devices", "DeviceCgroupRules", "DeviceRequests", "VolumesFrom", "VolumeDriver", "Sysctls",
    "StorageOpt", "CgroupParent", "Cgroup", "GroupAdd", "Annotations", "Links",
    "CpuRealtimePeriod", "CpuRealtimeRuntime",
)  # fmt: skip
# ... and dropped: networking with no network, client-side only, the engine's defaults kept
# (MaskedPaths [] would unmask /proc/kcore and the like), limits that clash with NanoCpus.
HOST_DROPPED = (
    "PortBindings", "PublishAllPorts", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts",
    "ContainerIDFile", "MaskedPaths", "ReadonlyPaths", "RestartPolicy", "OomKillDisable",
    "KernelMemory", "KernelMemoryTCP", "CpuPeriod", "CpuQuota", "CpuCount", "CpuPercent",
    "IOMaximumIOps", "IOMaximumBandwidth",
)  # fmt: skip

NAMESPACES_ALLOWED = {
    "IpcMode": ("", "private", "none", "shareable"),
    "PidMode": ("",),
    "UTSMode": ("",),
    "UsernsMode": ("",),
    "CgroupnsMode": ("", "private"),
}
RUNTIMES = ("", "runc", "runsc", "io.containerd.runc.v2")
LOG_DRIVERS = ("", "none", "json-file", "local")
MAX_TMPFS = 4
MOUNT_FIELDS = ("Type", "Source", "Target", "ReadOnly", "Consistency", "BindOptions",
                "VolumeOptions", "TmpfsOptions", "ClusterOptions")  # fmt: skip
BIND_OPTION_FIELDS = ("Propagation", "NonRecursive", "CreateMountpoint",
                      "ReadOnlyNonRecursive", "ReadOnlyForceRecursive")  # fmt: skip
PROPAGATIONS = ("", "private", "rprivate", "slave", "rslave")
BIND_MODES = frozenset({"ro", "rw", "z", "Z", "nocopy", *PROPAGATIONS[1:]})
_SIZE = re.compile(r"^([0-9]{1,20})([kKmMgGtTpPeE]?)$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


@dataclass
class Outcome:
    """The body the engine gets, and what was changed on the way (for the debug log)."""

    document: dict[str, Any]
    rewritten: list[str] = field(default_factory=list)


def check(
    document: Any,
    config: ProxyConfig,
    now: float | None = None,
    resolve: binds.Resolver = binds.resolve_on_disk,
) -> Outcome:
    """The create body to send for `document` (decoded JSON); Refused with the reason."""
    now = time.time() if now is None else now
    top, unknown = body.canonical(document, (*KEPT, *CHECKED, *DROPPED), "the create body")
    if document is None:
        raise Refused("the create body is empty", 400)
    rewritten: list[str] = []
    _refuse_unknown(unknown, "", rewritten)
    out: dict[str, Any] = {k: v for k, v in top.items() if k in KEPT and not body.is_zero(v)}
    for name in DROPPED:
        if name in top and not body.is_zero(top[name]):
            rewritten.append(f"{name} dropped")
    out["Image"] = check_image(top.get("Image"), config.images)
    out["User"] = check_user(top.get("User"), required=True)
    out["Labels"] = labels(top.get("Labels"), config, now, rewritten)
    if top.get("NetworkDisabled") is not True:
        rewritten.append("NetworkDisabled set")
    out["NetworkDisabled"] = True
    volumes = out.get("Volumes")
    if volumes is not None and (
        not isinstance(volumes, dict) or any(not body.is_zero(v) for v in volumes.values())
    ):
        raise Refused("Volumes must map container paths to {} (anonymous volumes only)")
    out["HostConfig"] = host_config(top.get("HostConfig"), config, rewritten, resolve)
    return Outcome(out, rewritten)


def _refuse_unknown(unknown: dict[str, Any], where: str, rewritten: list[str]) -> None:
    for key, value in unknown.items():
        if not body.is_zero(value):
            raise Refused(f"{where}{key[:40]} is not part of the compile profile")
        rewritten.append(f"{where}{key[:40]} (empty) dropped")


def image_key(reference: str) -> str:
    """`busybox` and `docker.io/library/busybox:latest` alike: the name as the engine reads it."""
    name, at, digest = reference.partition("@")
    if not at and name.rfind(":") <= name.rfind("/"):
        name += ":latest"
    first, slash, rest = name.partition("/")
    if not slash:
        name = f"docker.io/library/{name}"
    elif first == "index.docker.io":
        name = f"docker.io/{rest}"
    elif not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name}"
    first, _, rest = name.partition("/")
    if first == "docker.io" and "/" not in rest:
        name = f"docker.io/library/{rest}"
    return name + at + digest


def check_image(image: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(image, str) or not image:
        raise Refused("the create names no image", 400)
    key = image_key(image)
    if not any(image_key(a) == key for a in allowed):
        shown = ", ".join(allowed) or "(none)"
        raise Refused(f"image {image[:80]!r} is not an allowed TeX Live image ({shown})")
    return image


def check_user(user: Any, required: bool) -> str:
    """The user, unless it is root (a name, uid 0 or gid 0) or, when `required`, not given."""
    if user is None or user == "":
        if required:
            raise Refused("give the container a user that is not root (User, e.g. 1000:1000)")
        return ""
    if not isinstance(user, str):
        raise Refused("User must be a string", 400)
    for part in user.split(":", 1):
        if part == "root" or (part.isdigit() and int(part) == 0):
            raise Refused(f"user {user[:40]!r} is root: run compiles as a user that is not")
    return user


def labels(given: Any, config: ProxyConfig, now: float, rewritten: list[str]) -> dict[str, str]:
    """The caller's labels, the compile label, and an expiry no later than the lifetime."""
    if given is not None and not (
        isinstance(given, dict) and all(isinstance(v, str) for v in given.values())
    ):
        raise Refused("Labels must map names to strings", 400)
    out = dict(given or {})
    latest = now + config.lifetime
    try:
        expires = float(out.get(EXPIRES_LABEL, ""))
    except ValueError:
        expires = latest + 1
    if not (now - 60 <= expires <= latest):  # NaN fails both comparisons
        out[EXPIRES_LABEL] = f"{latest:.0f}"
        rewritten.append(f"label {EXPIRES_LABEL} set")
    if out.get(COMPILE_LABEL) != "1":
        out[COMPILE_LABEL] = "1"
        rewritten.append(f"label {COMPILE_LABEL} set")
    return out


def host_config(
    given: Any, config: ProxyConfig, rewritten: list[str], resolve: binds.Resolver
) -> dict[str, Any]:
    fields = (*HOST_KEPT, *HOST_SET, *HOST_REFUSED, *HOST_DROPPED)
    host, unknown = body.canonical(given, fields, "HostConfig")
    _refuse_unknown(unknown, "HostConfig.", rewritten)
    for name in HOST_REFUSED:
        if not body.is_zero(host.get(name)):
            raise Refused(f"HostConfig.{name} is not allowed for a compile container")
    for name in HOST_DROPPED:
        # An empty MaskedPaths is not Go's zero (nil): it unmasks /proc/kcore and the like.
        unmasks = name in ("MaskedPaths", "ReadonlyPaths") and host.get(name) is not None
        if unmasks or not body.is_zero(host.get(name)):
            rewritten.append(f"HostConfig.{name} dropped")
    if host.get("Privileged") not in (None, False):
        raise Refused("a privileged container is not allowed")
    if not body.is_zero(host.get("CapAdd")):
        raise Refused(f"adding capabilities ({_short(host['CapAdd'])}) is not allowed")
    for name, allowed in NAMESPACES_ALLOWED.items():
        value = host.get(name) or ""
        if value not in allowed:
            raise Refused(
                f"HostConfig.{name} {_short(value)} is not allowed: namespaces stay private"
            )
    out: dict[str, Any] = {k: v for k, v in host.items() if k in HOST_KEPT and not body.is_zero(v)}
    out["NetworkMode"] = network_mode(host.get("NetworkMode"), rewritten)
    out["CapDrop"] = ["ALL"]
    out["SecurityOpt"] = security_options(host.get("SecurityOpt"))
    out["ReadonlyRootfs"] = True
    out["Tmpfs"] = tmpfs(host.get("Tmpfs"), config.limits.tmpfs, rewritten)
    limits = config.limits
    memory = _capped(host.get("Memory"), limits.memory, "Memory", rewritten)
    out["Memory"] = memory
    out["MemorySwap"] = memory
    if isinstance(host.get("MemoryReservation"), int) and 0 < host["MemoryReservation"] < memory:
        out["MemoryReservation"] = host["MemoryReservation"]
    out["PidsLimit"] = _capped(host.get("PidsLimit"), limits.pids, "PidsLimit", rewritten)
    out["NanoCpus"] = _capped(host.get("NanoCpus"), int(limits.cpus * 1e9), "NanoCpus", rewritten)
    if not body.is_zero(host.get("ShmSize")):
        out["ShmSize"] = _capped(host.get("ShmSize"), limits.tmpfs, "ShmSize", rewritten)
    if host.get("IpcMode"):
        out["IpcMode"] = host["IpcMode"]
    if host.get("CgroupnsMode"):
        out["CgroupnsMode"] = host["CgroupnsMode"]
    runtime = host.get("Runtime") or ""
    if runtime not in RUNTIMES:
        raise Refused(f"runtime {_short(runtime)} is not allowed (only {', '.join(RUNTIMES[1:])})")
    if runtime:
        out["Runtime"] = runtime
    if (host.get("Isolation") or "") not in ("", "default"):
        raise Refused("HostConfig.Isolation is not allowed")
    score = host.get("OomScoreAdj")
    if isinstance(score, int) and score > 0:
        out["OomScoreAdj"] = score
    elif not body.is_zero(score):
        rewritten.append("HostConfig.OomScoreAdj dropped (a compile is never the last to go)")
    log = log_config(host.get("LogConfig"))
    if log is not None:
        out["LogConfig"] = log
    protected = config.protected()
    if not body.is_zero(host.get("Binds")):
        out["Binds"] = bind_list(host["Binds"], config, protected, resolve)
    if not body.is_zero(host.get("Mounts")):
        out["Mounts"] = mount_list(host["Mounts"], config, protected, resolve)
    return out


def network_mode(value: Any, rewritten: list[str]) -> str:
    mode = value or ""
    if not isinstance(mode, str):
        raise Refused("HostConfig.NetworkMode must be a string", 400)
    if mode == "host" or mode.startswith("container:"):
        raise Refused(f"network mode {mode[:40]!r} is not allowed: compiles have no network")
    if mode != "none":
        rewritten.append(f"NetworkMode {mode[:40] or 'default'} -> none")
    return "none"


def security_options(given: Any) -> list[str]:
    """The options as the engine parses them (`=`, or the old `:`; bare `disable` is
    `label=disable`), no-new-privileges always; Refused for one that weakens."""
    if given is not None and not (
        isinstance(given, list) and all(isinstance(o, str) for o in given)
    ):
        raise Refused("HostConfig.SecurityOpt must be a list of strings", 400)
    out = ["no-new-privileges"]
    for option in given or []:
        if option == "no-new-privileges":
            continue
        if option == "disable":
            raise Refused("security option 'disable' (label=disable) is not allowed")
        separator = "=" if "=" in option else ":"
        key, found, value = option.partition(separator)
        if not found:
            raise Refused(f"security option {option[:40]!r} is not understood")
        if key == "no-new-privileges":
            if value not in ("1", "t", "T", "true", "TRUE", "True"):
                raise Refused("no-new-privileges cannot be turned off")
        elif key == "seccomp":
            if value == "unconfined":
                raise Refused("seccomp=unconfined is not allowed")
            if value != "builtin":
                seccomp.check(value)
            out.append(f"seccomp={value}")
        elif key == "apparmor":
            if value == "unconfined":
                raise Refused("apparmor=unconfined is not allowed")
            out.append(f"apparmor={value}")
        elif key == "label":
            if not value.startswith("level:"):
                raise Refused(f"security option label={value[:40]} is not allowed (only level:)")
            out.append(f"label={value}")
        else:
            raise Refused(f"security option {key[:40]!r} is not allowed")
    return out


def tmpfs(given: Any, cap: int, rewritten: list[str]) -> dict[str, str]:
    """The tmpfs mounts, each nosuid, nodev and at most `cap` bytes; /tmp always there."""
    if given is not None and not (
        isinstance(given, dict) and all(isinstance(v, str) for v in given.values())
    ):
        raise Refused("HostConfig.Tmpfs must map paths to option strings", 400)
    mounts = dict(given or {})
    mounts.setdefault("/tmp", "rw,noexec")
    if len(mounts) > MAX_TMPFS:
        raise Refused(f"more than {MAX_TMPFS} tmpfs mounts")
    out = {}
    for path, options in mounts.items():
        if not path.startswith("/"):
            raise Refused(f"tmpfs path {path[:40]!r} is not absolute", 400)
        kept, size = [], None
        for option in (o.strip() for o in options.split(",")):
            if option.startswith("size="):
                size = _size(option[5:])
            elif option and option not in ("suid", "dev", "nosuid", "nodev"):
                kept.append(option)
        if size is None or size > cap:
            rewritten.append(f"tmpfs {path[:40]} size capped")
            size = cap
        out[path] = ",".join([*kept, "nosuid", "nodev", f"size={size}"])
    return out


def _size(text: str) -> int | None:
    match = _SIZE.match(text)
    return int(match.group(1)) * _UNITS[match.group(2).lower()] if match else None


def _capped(value: Any, cap: int, name: str, rewritten: list[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= cap:
        return value
    if not body.is_zero(value):
        rewritten.append(f"HostConfig.{name} capped at {cap}")
    return cap


def log_config(given: Any) -> dict[str, Any] | None:
    log, unknown = body.canonical(given, ("Type", "Config"), "HostConfig.LogConfig")
    _refuse_unknown(unknown, "HostConfig.LogConfig.", [])
    kind = log.get("Type") or ""
    if kind not in LOG_DRIVERS:
        raise Refused(
            f"log driver {_short(kind)} is not allowed (only {', '.join(LOG_DRIVERS[1:])})"
        )
    options = log.get("Config") or {}
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        raise Refused("HostConfig.LogConfig.Config must map names to strings", 400)
    if not kind:
        return None
    return {"Type": kind, "Config": options}


def bind_list(
    given: Any, config: ProxyConfig, protected: tuple[str, ...], resolve: binds.Resolver
) -> list[str]:
    """`SOURCE:TARGET[:MODES]`, each source checked (binds.check_source) and resolved."""
    if not isinstance(given, list) or not all(isinstance(b, str) for b in given):
        raise Refused("HostConfig.Binds must be a list of strings", 400)
    out = []
    for text in given:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise Refused(f"bind {text[:80]!r} is not SOURCE:TARGET[:MODES]", 400)
        source = binds.check_source(parts[0], config.roots, protected, resolve)
        target = _target(parts[1])
        modes = parts[2].split(",") if len(parts) == 3 else []
        odd = [m for m in modes if m not in BIND_MODES]
        if odd:
            raise Refused(f"bind mode {odd[0][:20]!r} is not allowed")
        out.append(":".join([source, target, *([",".join(modes)] if modes else [])]))
    return out


def mount_list(
    given: Any, config: ProxyConfig, protected: tuple[str, ...], resolve: binds.Resolver
) -> list[dict[str, Any]]:
    """Mounts of type bind only (a volume's driver options can mount anything), rebuilt field
    by field in their canonical spelling."""
    if not isinstance(given, list):
        raise Refused("HostConfig.Mounts must be a list", 400)
    out = []
    for raw in given:
        mount, unknown = body.canonical(raw, MOUNT_FIELDS, "a mount")
        _refuse_unknown(unknown, "Mounts[].", [])
        if mount.get("Type") != "bind":
            raise Refused(f"mount type {_short(mount.get('Type'))} is not allowed (bind only)")
        for name in ("VolumeOptions", "TmpfsOptions", "ClusterOptions"):
            if not body.is_zero(mount.get(name)):
                raise Refused(f"Mounts[].{name} is not allowed")
        source = mount.get("Source")
        if not isinstance(source, str):
            raise Refused("a bind mount names no source", 400)
        rebuilt: dict[str, Any] = {
            "Type": "bind",
            "Source": binds.check_source(source, config.roots, protected, resolve),
            "Target": _target(mount.get("Target")),
            "ReadOnly": mount.get("ReadOnly") is True,
        }
        if isinstance(mount.get("Consistency"), str) and mount["Consistency"]:
            rebuilt["Consistency"] = mount["Consistency"]
        options, unknown = body.canonical(
            mount.get("BindOptions"), BIND_OPTION_FIELDS, "BindOptions"
        )
        _refuse_unknown(unknown, "Mounts[].BindOptions.", [])
        if options.get("CreateMountpoint"):
            raise Refused("BindOptions.CreateMountpoint is not allowed")
        propagation = options.get("Propagation") or ""
        if propagation not in PROPAGATIONS:
            raise Refused(f"bind propagation {_short(propagation)} is not allowed")
        kept: dict[str, Any] = {
            k: options[k] is True
            for k in ("NonRecursive", "ReadOnlyNonRecursive", "ReadOnlyForceRecursive")
            if k in options and options[k] is not None
        }
        if propagation:
            kept["Propagation"] = propagation
        if kept:
            rebuilt["BindOptions"] = kept
        out.append(rebuilt)
    return out


def _target(target: Any) -> str:
    if not isinstance(target, str) or not target.startswith("/") or ".." in target.split("/"):
        raise Refused(f"mount target {_short(target)} is not an absolute path", 400)
    return target


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
