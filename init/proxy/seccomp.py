"""Whether a seccomp profile sent inline with a create weakens the sandbox.

The engine takes a profile's JSON as it comes (and reads its keys without regard to case, as
body.py explains). A profile is refused when it allows by default, hands syscalls to an agent,
or allows without conditions a syscall the engine's default profile keeps from a container with
no capabilities: the ways out of a container's namespaces, kernel modules and keyrings, BPF,
mounting. Rules that apply only with capabilities (`includes.caps`) never apply here: every
capability is dropped.
"""

from __future__ import annotations

from init.proxy import body
from init.proxy.decision import Refused

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ALLOWING = frozenset({"SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_NOTIFY"})
_GUARDED_NAMES = (
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "keyctl",
    "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "kexec_load",
    "kexec_file_load", "open_by_handle_at", "name_to_handle_at", "init_module", "finit_module",
    "delete_module", "create_module", "reboot", "swapon", "swapoff", "mount_setattr", "fsopen",
    "fsmount", "fsconfig", "fspick", "move_mount", "open_tree", "quotactl", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime", "syslog", "iopl",
    "ioperm", "lookup_dcookie", "vm86", "vm86old", "nfsservctl", "uselib", "_sysctl", "sysfs",
    "ustat",
)  # fmt: skip
GUARDED = frozenset(_GUARDED_NAMES)
_PROFILE = ("defaultAction", "syscalls", "listenerPath", "listenerMetadata")
_RULE = ("names", "name", "action", "includes")


def check(profile_text: str) -> None:
    """Refused when the inline profile `profile_text` weakens the sandbox (see above)."""
    profile, _ = body.canonical(body.loads(profile_text.encode()), _PROFILE, "the seccomp profile")
    if str(profile.get("defaultAction", "")).upper() in ALLOWING:
        raise Refused("a seccomp profile that allows every syscall by default")
    if profile.get("listenerPath") or profile.get("listenerMetadata"):
        raise Refused("a seccomp profile that hands syscalls to an agent (listenerPath)")
    rules = profile.get("syscalls") or []
    if not isinstance(rules, list):
        raise Refused("the seccomp profile's syscalls must be a list", 400)
    for raw in rules:
        rule, _ = body.canonical(raw, _RULE, "a seccomp rule")
        if str(rule.get("action", "")).upper() not in ALLOWING or _needs_capabilities(rule):
            continue
        names = rule.get("names") or []
        names = [*names, rule["name"]] if isinstance(rule.get("name"), str) else names
        if not isinstance(names, list):
            raise Refused("a seccomp rule's names must be a list", 400)
        opened = sorted(GUARDED.intersection(str(n) for n in names))
        if opened:
            raise Refused(f"a seccomp profile that allows {', '.join(opened[:5])}")


def _needs_capabilities(rule: dict[str, Any]) -> bool:
    includes, _ = body.canonical(rule.get("includes"), ("caps",), "a seccomp rule's includes")
    return bool(includes.get("caps"))
