"""Overleaf 5's startup guards with the init's documented configuration: the images refuse to
start when any variable's name contains SHARELATEX or a ShareLaTeX-branded path exists. The
guards here are our own stand-ins after their behaviour (tests/fixtures/overleaf/init_scripts,
citing the upstream files), run as the image runs them: startup scripts of the init as PID 1.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from init import config
from tests.integration.conftest import Layout, Running, wait_for, write_script

pytestmark = pytest.mark.root

GUARDS = Path(__file__).resolve().parents[1] / "fixtures" / "overleaf" / "init_scripts"
Start = Callable[..., Running]
WAIT_FOREVER = "while :; do sleep 1000 & wait $!; done\n"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    made = Layout(tmp_path / "init")
    for guard in GUARDS.iterdir():
        shutil.copy(guard, made.startup / guard.name)
    return made


def boot(start: Start, layout: Layout, env: dict[str, str]) -> Running:
    return start(layout.run_argv(5.0), status_file=layout.status_file, env=env)


def test_the_inits_variables_under_either_spelling_pass_the_guards(
    start: Start, layout: Layout
) -> None:
    """The init's own variables are consumed (never passed to the startup scripts, the
    container environment or the services): the new names, and the old ones it still reads."""
    m = layout.marks
    write_script(
        layout.startup / "50-env", f"env > {m}/startup.tmp && mv {m}/startup.tmp {m}/startup\n"
    )
    layout.service("web", f"env > {m}/web.tmp && mv {m}/web.tmp {m}/web\n{WAIT_FOREVER}")
    old = config.OLD_OWN_PREFIX + "COMPILE_TIMEOUT"
    init = boot(start, layout, {config.COMPILE_MEMORY: "1g", old: "30", "OVERLEAF_APP_NAME": "x"})
    init.wait_service("web", "up")  # 1 s after its start: its `env > ... && mv` may be later
    wait_for((m / "web").exists, 10, "the service's environment")
    assert (m / "startup").exists(), init.log()
    for seen in ((m / "startup").read_text(), (m / "web").read_text(), *(
        p.read_text() for p in layout.env.iterdir()
    )):  # fmt: skip
        assert "SHARELATEX" not in seen and config.OWN_PREFIX not in seen
    assert "OVERLEAF_APP_NAME=x" in (m / "web").read_text()
    assert f"{old} is the old name of {config.COMPILE_TIMEOUT}" in init.log()
    init.signal(15)
    assert init.wait() == 0


def test_a_sharelatex_variable_of_the_sites_own_is_still_refused(
    start: Start, layout: Layout
) -> None:
    """The guard is real: what the init does not consume (a site's old SHARELATEX_ setting)
    still stops the boot, with the guard's words, as Overleaf 5 means it to."""
    layout.service("web", WAIT_FOREVER)
    init = boot(start, layout, {"SHARELATEX_MONGO_URL": "mongodb://mongo/sharelatex"})
    assert init.wait() == 1
    log = init.log()
    assert "SHARELATEX_MONGO_URL" in log and "Refusing to startup" in log
    assert "000_check_for_old_env_vars_5.sh exited with status 101" in log
