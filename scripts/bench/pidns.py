"""An init as PID 1 of a fresh PID namespace, seen from the host: start it, read it, end it.

Shared by the benchmark scripts in this directory (imported from the script's own dir).
Everything started here is ended by pid: SIGKILL to the namespace's PID 1 ends every process
in the namespace, and `unshare` then exits by itself.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
TINI = "/usr/bin/tini"
DUMB_INIT = "/usr/bin/dumb-init"
# So no variable of the machine's own environment (SANDBOXED_COMPILES, ...) reaches an init.
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


def sharelatex_init() -> str:
    """$SHARELATEX_INIT, else the console script of the venv next to the repo."""
    return os.environ.get("SHARELATEX_INIT") or str(REPO / ".venv" / "bin" / "sharelatex-init")


def python() -> str:
    """The venv's python (what the scripts run under), else this interpreter."""
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def wrappers() -> dict[str, list[str]]:
    """Each init in wrap mode: the argv that goes before the command."""
    return {
        "tini": [TINI, "--"],
        "dumb-init": [DUMB_INIT],
        "sharelatex-init": [sharelatex_init(), "--"],
    }


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit(f"{sys.argv[0]}: run as root (it makes PID namespaces)")


class Namespace:
    """`unshare --pid --fork --mount-proc ARGV`; `init` is the host pid of its PID 1."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        env: Mapping[str, str] = CLEAN_ENV,
        timeout: float = 10.0,
    ) -> None:
        self.argv = list(argv)
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
        )
        self.init = 0
        try:
            self.init = self._wait_for_exec(timeout)
        except BaseException:
            self.end()
            raise

    def _wait_for_exec(self, timeout: float) -> int:
        """The forked child of unshare, once it has exec'd the init (not unshare any more)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.unshare.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited at once ({self.unshare.returncode})")
            kids = children(self.unshare.pid)
            if kids:
                try:
                    exe = os.readlink(f"/proc/{kids[0]}/exe")
                except OSError:
                    exe = ""
                if exe and Path(exe).name != "unshare":
                    return kids[0]
            time.sleep(0.002)
        raise TimeoutError(f"{self.argv[0]} did not start within {timeout} s")

    def signal(self, signum: int) -> None:
        os.kill(self.init, signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.unshare.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def end(self) -> None:
        """Kill the namespace (its PID 1, so all of it) and wait for unshare."""
        if self.unshare.poll() is None:
            for pid in (self.init, self.unshare.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    if self.wait(5.0) is not None:
                        break
            self.unshare.wait()
        for stream in (self.unshare.stdin, self.unshare.stdout, self.unshare.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (zombies included, until reaped)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return found


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cpu_seconds(pid: int) -> float:
    """CPU time a process has run so far, all threads, from schedstat (ns, not clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(value: float, reference: float) -> str:
    if not reference or reference != reference or value != value:
        return "-"
    return f"{value / reference:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(padded))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def engine_answers(sock: Path, path: str = "/_ping") -> bool:
    """GET `path` on a Docker engine's unix socket answered 200 (stdlib only, no SDK)."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(sock))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            return b" 200 " in s.recv(64)
    except OSError:
        return False
