"""What a caller sees of the engine's answers to the listing calls: nothing of the host, of
other images, or of other containers (in sibling mode the host's engine runs the site itself)."""

from __future__ import annotations

from init.engine.client import COMPILE_LABEL
from init.proxy.create import image_key

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INFO_KEPT = (
    "ServerVersion", "OSType", "Architecture", "NCPU", "MemTotal", "Driver", "KernelVersion",
    "OperatingSystem", "CgroupDriver", "CgroupVersion", "DefaultRuntime", "SecurityOptions",
    "ExperimentalBuild", "MemoryLimit", "SwapLimit", "PidsLimit", "CpuCfsPeriod", "CpuCfsQuota",
)  # fmt: skip


def trim_info(document: Any) -> dict[str, Any]:
    """/info without the host's name, labels, paths, registries, proxies, swarm or plugins."""
    if not isinstance(document, dict):
        return {}
    trimmed = {k: document[k] for k in INFO_KEPT if k in document}
    runtimes = document.get("Runtimes")
    if isinstance(runtimes, dict):
        trimmed["Runtimes"] = {name: {} for name in runtimes}
    return trimmed


def filter_images(document: Any, allowed: tuple[str, ...]) -> list[Any]:
    """/images/json: the allowed images, each with only its allowed tags."""
    keys = {image_key(a) for a in allowed}
    repositories = {k.rpartition(":")[0] for k in keys}
    kept = []
    for image in document if isinstance(document, list) else []:
        if not isinstance(image, dict):
            continue
        tags = [
            t for t in image.get("RepoTags") or [] if isinstance(t, str) and image_key(t) in keys
        ]
        if not tags:
            continue
        digests = [
            d for d in image.get("RepoDigests") or []
            if isinstance(d, str) and _repository(d) in repositories
        ]  # fmt: skip
        kept.append({**image, "RepoTags": tags, "RepoDigests": digests})
    return kept


def filter_containers(document: Any) -> list[Any]:
    """/containers/json: the compile containers only."""
    return [
        c for c in (document if isinstance(document, list) else [])
        if isinstance(c, dict) and (c.get("Labels") or {}).get(COMPILE_LABEL) == "1"
    ]  # fmt: skip


def _repository(digest: str) -> str:
    return image_key(digest.partition("@")[0]).rpartition(":")[0]
