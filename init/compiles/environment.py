"""The compile settings the init hands to the compile path, which the services' environment no
longer carries (the init's own variables are consumed: config.is_consumed).

PID 1 writes them beside the shims (`write_environment`, when it wires the services' compiles:
init.compiles.service_env) and into its status document (`compile_environment`); the shim, the
`compile` command and the compile service read them back (`read_environment`,
`with_init_environment`) under whatever their own environment says. Plain names and values:
limits, dirs, the engine proxy's socket, the images; nothing secret.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

# Beside the shims.
ENVIRONMENT_FILE = "environment.json"


def write_environment(directory: Path, environment: Mapping[str, str]) -> None:
    """The compile settings the shims read (0644: the services' user reads them; nothing in
    them is secret: limits, dirs, the engine proxy's socket, the images)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{ENVIRONMENT_FILE}.tmp"
    tmp.write_text(json.dumps(dict(sorted(environment.items()))))
    tmp.chmod(0o644)
    os.replace(tmp, directory / ENVIRONMENT_FILE)


def read_environment(path: Path) -> dict[str, str]:
    """What `write_environment` wrote; {} when it cannot be read (the shim then compiles with
    its own environment and its defaults, as by hand)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {str(k): str(v) for k, v in document.items()}


def with_init_environment(environ: Mapping[str, str], given: Mapping[str, str]) -> dict[str, str]:
    """`environ` with what the running init gave its services for compiling (its status
    document's `compile_environment`) wherever `environ` does not say otherwise."""
    return {**given, **environ}
