"""PID 1 with files in /etc/container_environment that cannot be variables: a NUL byte in a
value once made every service fail forever ("Input/output error"). Now each is refused with one
line naming it and the services run with the rest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Layout, Running, wait_for, write_script

pytestmark = pytest.mark.root

WAIT_FOREVER = "while :; do sleep 1000 & wait $!; done\n"


def test_a_nul_or_an_equals_sign_is_named_once_and_the_services_run(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "init")
    layout.env.mkdir(mode=0o700)
    (layout.env / "GOOD").write_text("kept\n")
    (layout.env / "BROKEN").write_bytes(b"before\0after")
    (layout.env / "A=B").write_text("x")
    m = layout.marks
    # A startup script adds one more bad file: read back after it, it is refused as well.
    write_script(layout.startup / "10-adds", f"printf 'x\\0y' > {layout.env}/LATER\n")
    layout.service("web", f"env > {m}/web.tmp && mv {m}/web.tmp {m}/web.env\n{WAIT_FOREVER}")
    init = start(layout.run_argv(), status_file=layout.status_file)
    wait_for((m / "web.env").exists, 15, "the service")
    seen = (m / "web.env").read_text().splitlines()
    assert "GOOD=kept" in seen
    assert not any(line.startswith(("BROKEN=", "LATER=", "A=B")) for line in seen)
    log = init.log()
    for name in ("BROKEN", "A=B", "LATER"):
        lines = [line for line in log.splitlines() if f"/{name}: " in line]
        assert len(lines) == 1 and lines[0].startswith("environment: warning: "), log
    assert "Traceback" not in log and "Input/output error" not in log
    assert init.wait_service("web", "up")
