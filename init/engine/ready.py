"""A child of PID 1 that waits for a Docker engine to answer, sweeps leftovers, and reports.

`python -m init.engine.ready --socket S --result F --deadline SECONDS` pings the engine with a
named retry policy until it answers or the deadline passes, removes compile containers an
earlier run left (by label), and writes what it found to F as JSON. PID 1 reads F when this
process exits: 0 ready, 1 not ready by the deadline. The Docker SDK lives here, never in PID 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import tenacity

# The label every compile container carries; what carries it is ours to remove.
COMPILE_LABEL = "sharelatex-init.compile"
# dockerd takes ~0.4 s to answer here: ask often at first, then back off.
ENGINE_READY = tenacity.Retrying(
    wait=tenacity.wait_exponential(multiplier=0.02, min=0.02, max=0.5),
    retry=tenacity.retry_if_exception_type(
        (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
    ),
)


def wait_until_ready(socket_path: Path, deadline: float) -> docker.APIClient:
    """An API client once `/_ping` answers; tenacity.RetryError when the deadline passes."""
    for attempt in ENGINE_READY.copy(stop=tenacity.stop_after_delay(deadline)):
        with attempt:
            client = docker.APIClient(base_url=f"unix://{socket_path}", version="auto", timeout=5)
            client.ping()
            return client
    raise AssertionError("unreachable: Retrying either returns or raises")


def sweep(client: docker.APIClient) -> list[str]:
    """Remove every container labelled as a compile of ours; their ids."""
    removed = []
    for container in client.containers(all=True, filters={"label": COMPILE_LABEL}):
        try:
            client.remove_container(container["Id"], force=True)
            removed.append(container["Id"][:12])
        except docker.errors.NotFound:
            pass
    return removed


def check(socket_path: Path, deadline: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        client = wait_until_ready(socket_path, deadline)
    except tenacity.RetryError as e:
        last = e.last_attempt.exception()
        return {"ready": False, "error": f"no answer on {socket_path} in {deadline:.0f} s: {last}"}
    info = client.info()
    return {
        "ready": True,
        "seconds": round(time.monotonic() - started, 3),
        "driver": info.get("Driver", ""),
        "server_version": info.get("ServerVersion", ""),
        "api_version": client.api_version,
        "swept": sweep(client),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m init.engine.ready")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args(argv)
    result = check(args.socket, args.deadline)
    tmp = args.result.with_name(args.result.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.result)
    return 0 if result["ready"] else 1


if __name__ == "__main__":
    sys.exit(main())
