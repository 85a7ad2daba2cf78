"""The sandbox's time limit follows the site's: the init's own variable when set, else Overleaf's
COMPILE_TIMEOUT (also OVERLEAF_/SHARELATEX_ prefixed), capped at 600 s as the compile service
caps it, else the site's default of 180 s. A bad value is one line: the variable, the value, the
fix; the shim and the compile command turn it into exit 78.
"""

from __future__ import annotations

import pytest

from init.compiles.settings import Limits, limits_from_env, settings_from_env
from init.errors import ConfigError


def timeout(**environ: str) -> float:
    return limits_from_env(environ).timeout


def test_nothing_set_is_the_sites_default() -> None:
    assert timeout() == 180.0
    assert Limits().timeout == 180.0


def test_the_sites_compile_timeout_is_followed() -> None:
    assert timeout(COMPILE_TIMEOUT="90") == 90.0
    assert timeout(OVERLEAF_COMPILE_TIMEOUT="60") == 60.0
    assert timeout(SHARELATEX_COMPILE_TIMEOUT="45") == 45.0
    assert timeout(COMPILE_TIMEOUT="90", OVERLEAF_COMPILE_TIMEOUT="60") == 90.0  # unprefixed


def test_the_site_is_capped_as_the_compile_service_caps_it() -> None:
    assert timeout(COMPILE_TIMEOUT="600") == 600.0
    assert timeout(COMPILE_TIMEOUT="3600") == 600.0


def test_the_inits_own_variable_wins_and_is_not_capped() -> None:
    assert timeout(OVERLEAF_INIT_COMPILE_TIMEOUT="30", COMPILE_TIMEOUT="90") == 30.0
    assert timeout(OVERLEAF_INIT_COMPILE_TIMEOUT="900") == 900.0
    # An empty one is unset: the site's applies.
    assert timeout(OVERLEAF_INIT_COMPILE_TIMEOUT=" ", COMPILE_TIMEOUT="90") == 90.0


@pytest.mark.parametrize("value", ["3m", "0", "-5", "1.5", "180s", "¹²"])
def test_a_bad_site_value_is_one_line_naming_the_variable_value_and_fix(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        limits_from_env({"OVERLEAF_COMPILE_TIMEOUT": value})
    (line,) = raised.value.problems
    assert line.startswith(f"OVERLEAF_COMPILE_TIMEOUT={value!r} is not valid")
    assert "whole seconds, e.g. 180" in line
    assert "\n" not in line


def test_a_bad_site_value_is_not_read_when_the_inits_own_is_set() -> None:
    assert timeout(OVERLEAF_INIT_COMPILE_TIMEOUT="30", COMPILE_TIMEOUT="soon") == 30.0


def test_a_bad_value_stops_the_settings_with_exit_78() -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_env({"COMPILE_TIMEOUT": "soon"})
    assert raised.value.exit_status == 78
