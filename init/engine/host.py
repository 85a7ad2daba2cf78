"""Sibling-containers mode inside PID 1: the host's engine, through its mounted socket.

Before the services start, a child (`init.engine.sibling_check`) checks the socket, inspects this
container through it, and works out the host paths behind the compile and output dirs (the
value users most often get wrong); a problem there is a configuration error (exit 78). The
services then get the socket and the resolved host paths in their environment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from init.config import HOST_DIR_OUTPUT, SERVICE_USER, Settings
from init.core import children
from init.core.log import Log
from init.core.loop import EventLoop
from init.engine import sibling
from init.errors import ConfigError, EngineError, SpawnError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: 0.5 MiB in PID 1
if TYPE_CHECKING:
    from typing import Any

CONTAINER_ID = "SHARELATEX_INIT_CONTAINER_ID"  # when /proc cannot tell (tests, odd runtimes)
CHECK_DEADLINE = 5.0  # seconds for the host's engine to answer


class HostEngine:
    """The host's engine as PID 1 sees it: checked once at boot, then handed to the services."""

    def __init__(
        self,
        loop: EventLoop,
        log: Log,
        run_dir: Path,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.loop = loop
        self.log = log
        self.run_dir = run_dir
        self.on_change = on_change
        self._args: list[str] = []
        self.state = "checking"
        self.reason = ""
        self.since = time.time()
        self.result: dict[str, Any] = {}

    def prepare(self, settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
        """Check the socket and the host dirs; the environment the services need. Exit 78 on
        a problem, with every problem's fix."""
        try:
            socket = sibling.socket_path(environ)
        except EngineError as e:
            raise ConfigError([str(e)]) from e
        args = [
            "--socket", str(socket),
            "--service-user", environ.get(SERVICE_USER) or sibling.DEFAULT_SERVICE_USER,
            "--compiles-dir", str(settings.compiles_dir),
            "--output-dir", str(settings.output_dir),
            "--host-dir-compiles-variable", sibling.configured_variable(environ, "compiles"),
            "--host-dir-output-variable", sibling.configured_variable(environ, "output"),
            "--image", settings.texlive_image,
            "--deadline", str(CHECK_DEADLINE),
            "--grant-group",
        ]  # fmt: skip
        if settings.host_dir_compiles is not None:
            args += ["--host-dir-compiles", str(settings.host_dir_compiles)]
        if settings.host_dir_output is not None:
            args += ["--host-dir-output", str(settings.host_dir_output)]
        if environ.get(CONTAINER_ID):
            args += ["--container-id", environ[CONTAINER_ID]]
        self._args = args
        result = self._run_check()
        self.result = result
        for note in result.get("notes", []):
            self.log.info("sibling", note)
        for warning in result.get("warnings", []):
            self.log.warning("sibling", warning)
        if not result.get("ok"):
            self.state = "failed"
            self.reason = "; ".join(result.get("problems") or [str(result.get("error"))])
            raise ConfigError(result.get("problems") or [f"sibling check: {result.get('error')}"])
        self.state = "ready"
        self.since = time.time()
        compiles, output = result.get("host_dir_compiles"), result.get("host_dir_output")
        how = "derived from this container's mounts" if result.get("derived") else "checked"
        self.log.info("sibling", f"host compile dir {compiles}, output dir {output} ({how})")
        env = {"DOCKER_HOST": f"unix://{socket}"}
        if compiles:
            env["SANDBOXED_COMPILES_HOST_DIR_COMPILES"] = str(compiles)
            env["SANDBOXED_COMPILES_HOST_DIR"] = str(compiles)
        if output:
            env[HOST_DIR_OUTPUT] = str(output)
        return env

    def prove_again(self) -> None:
        """Once the compile image is present (the proof at boot is skipped without it): run the
        check again in the background; a failure now keeps compiles off and says why."""

        def done(result: dict[str, Any]) -> None:
            proof = result.get("proof") or {}
            self.result["proof"] = proof
            if result.get("ok") and proof.get("status") != "failed":
                self.log.info("sibling", f"proof: {proof.get('message', proof.get('status'))}")
            else:
                self.state = "failed"
                self.reason = "; ".join(result.get("problems") or [str(result.get("error"))])
                self.since = time.time()
                self.log.error("sibling", f"compiles cannot run: {self.reason}")
            self.on_change()

        try:
            self._start_check("sibling-proof.json", done)
        except SpawnError as e:
            self.log.error("sibling", f"cannot prove the host path: {e}")

    def _run_check(self) -> dict[str, Any]:
        """Run the check child to its end under the loop (signals and reaping go on)."""
        results: list[dict[str, Any]] = []
        try:
            self._start_check("sibling-check.json", results.append)
        except SpawnError as e:
            raise ConfigError([f"sibling check: {e}"]) from e
        self.loop.run_until(lambda: bool(results))
        return results[0]

    def _start_check(self, result_name: str, on_done: Callable[[dict[str, Any]], None]) -> None:
        """`init.engine.sibling_check` with the arguments `prepare` worked out; SpawnError if it
        cannot start."""
        result_file = self.run_dir / result_name
        children.start(
            self.loop, self.log, "sibling", "init.engine.sibling_check",
            (*self._args, "--result", str(result_file)), result_file, on_done,
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def summary(self) -> dict[str, Any]:
        return {
            "mode": "sibling",
            "state": self.state,
            "ready": self.ready,
            "reason": self.reason,
            "socket": (self.result.get("socket") or {}).get("path"),
            "host_dir_compiles": self.result.get("host_dir_compiles"),
            "host_dir_output": self.result.get("host_dir_output"),
            "derived": self.result.get("derived"),
            "api_version": self.result.get("api_version"),
            "proof": self.result.get("proof"),
            "since": round(self.since, 3),
        }
