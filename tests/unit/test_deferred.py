"""The stand-ins for stdlib modules PID 1 does not use, and what PID 1's imports leave out.

Each check runs in a fresh interpreter: this one has imported inspect and the rest long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def in_fresh_python(code: str) -> dict[str, object]:
    """Run `code` (which sets `result`) in a new interpreter from the repo; `result` back."""
    script = f"import json, sys\n{code}\nprint(json.dumps(result))"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_a_deferred_module_loads_at_its_first_use_and_works_as_itself() -> None:
    result = in_fresh_python(
        """
from init.core import deferred
deferred.defer_unused_stdlib()
import dataclasses

@dataclasses.dataclass(frozen=True)
class Documented:
    \"\"\"Has a docstring: dataclasses needs no inspect for it.\"\"\"
    x: int

before = "ast" in sys.modules

@dataclasses.dataclass(frozen=True)
class Bare:
    x: int

import inspect
result = {
    "before": before,
    "doc": Bare.__doc__,
    "after": "ast" in sys.modules,
    "signature": str(inspect.signature(Bare)),
    "real": type(sys.modules["inspect"]).__name__,
}
"""
    )
    assert result == {
        "before": False,
        "doc": "Bare(x: int)",  # what dataclasses writes, through the real inspect
        "after": True,
        "signature": "(x: int) -> None",
        "real": "module",
    }


def test_pid1s_imports_leave_out_what_it_does_not_use() -> None:
    # `sharelatex-init run` imports these; a module here that pulls one of the left-out ones
    # back (a dataclass without a docstring does: inspect, ast) costs PID 1 its memory goal.
    result = in_fresh_python(
        """
from init import cli
cli.main(["--version"])  # the stand-ins in place and the parser built, as `run` does; then
# what `run` imports (cli._run)
import init.boot, init.config, init.core.container_env, init.core.pid1, init.core.status_file
import dataclasses
names = ["inspect", "ipaddress", "ast", "dis", "shutil", "heapq", "struct"]
result = {n: type(sys.modules[n]).__name__ for n in names if n in sys.modules}
result["undocumented dataclasses"] = sorted(
    f"{m}.{k}" for m, module in list(sys.modules.items()) if m.startswith("init")
    for k, v in vars(module).items()
    if dataclasses.is_dataclass(v) and isinstance(v, type) and v.__module__ == m
    and (v.__doc__ or "").startswith(k + "(")  # the __doc__ dataclasses wrote
)
"""
    )
    assert result == {
        "inspect": "_StandIn",
        "ipaddress": "_StandIn",
        "undocumented dataclasses": [],
    }
