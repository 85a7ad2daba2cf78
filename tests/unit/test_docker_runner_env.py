"""Server Pro runner mode: what the services' own docker runner (DockerRunner.js) is given in
each engine mode, what `auto` and `doctor` say, the host-dir warnings, and when the proxy
removes the containers that runner keeps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from init import config, doctor
from init.checks import Status
from init.compiles import service_env
from init.errors import ConfigError
from init.proxy import sweep

WWW_DATA = (33, 33)
SIBLING_HOST = {
    "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/srv/data/compiles",
    "SANDBOXED_COMPILES_HOST_DIR_OUTPUT": "/srv/data/output",
}


def settings(**environ: str) -> config.Settings:
    return config.load({"SANDBOXED_COMPILES": "true", **environ})


def sibling(**environ: str) -> config.Settings:
    return settings(SANDBOXED_COMPILES_SIBLING_CONTAINERS="true", **environ)


def users(table: dict[str, tuple[int, int]]) -> service_env.UserIds:
    return lambda name: table[name]


def plan(
    chosen: config.Settings, environ: dict[str, str] | None = None
) -> service_env.DockerRunnerPlan:
    return service_env.docker_runner_plan(chosen, environ or {}, users({"www-data": WWW_DATA}))


def with_runner(root: Path) -> Path:
    runner = root / "overleaf/services/clsi/app/js/DockerRunner.js"
    runner.parent.mkdir(parents=True)
    runner.write_text("")
    return runner


# -- what the runner reads ------------------------------------------------------------------


def test_dind_gives_the_runner_this_containers_own_dirs_as_the_host_dirs() -> None:
    """In docker-in-docker the inner engine sees the app container's filesystem: its own dirs
    are the host dirs (without them the runner's settings throw at start)."""
    env = plan(settings()).environment
    assert env["SANDBOXED_COMPILES_HOST_DIR_COMPILES"] == "/var/lib/overleaf/data/compiles"
    assert env["SANDBOXED_COMPILES_HOST_DIR"] == "/var/lib/overleaf/data/compiles"
    assert env["SANDBOXED_COMPILES_HOST_DIR_OUTPUT"] == "/var/lib/overleaf/data/output"
    assert "SANDBOXED_COMPILES_SIBLING_CONTAINERS" not in env


def test_dind_follows_the_compiles_dir_and_replaces_an_operators_host_dir() -> None:
    chosen = settings(
        OVERLEAF_INIT_COMPILES_DIR="/data/c",
        SANDBOXED_COMPILES_HOST_DIR_COMPILES="/srv/elsewhere",
    )
    env = plan(chosen, {"SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/srv/elsewhere"}).environment
    assert env["SANDBOXED_COMPILES_HOST_DIR_COMPILES"] == "/data/c"
    (warning,) = chosen.warnings
    assert "SANDBOXED_COMPILES_HOST_DIR_COMPILES=/srv/elsewhere is replaced by /data/c" in warning


def test_sibling_gives_the_runner_the_hosts_paths_the_engine_side_found() -> None:
    env = plan(sibling(), SIBLING_HOST).environment
    assert env["SANDBOXED_COMPILES_HOST_DIR_COMPILES"] == "/srv/data/compiles"
    assert env["SANDBOXED_COMPILES_HOST_DIR_OUTPUT"] == "/srv/data/output"
    assert env["SANDBOXED_COMPILES_SIBLING_CONTAINERS"] == "true"
    assert sibling(**SIBLING_HOST).warnings == ()  # used: no warning


def test_sibling_without_a_host_compiles_dir_is_refused_before_the_runner_throws() -> None:
    with pytest.raises(ConfigError) as raised:
        plan(sibling(), {"SANDBOXED_COMPILES_HOST_DIR_OUTPUT": "/srv/data/output"})
    (problem,) = raised.value.problems
    assert "SANDBOXED_COMPILES_HOST_DIR_COMPILES" in problem and "--env" in problem


def test_the_runners_user_is_the_services_user_that_owns_the_compile_dirs() -> None:
    """The compile service makes each compile dir as its own user (www-data, 33:33); the
    runner's default `tex` (1000) cannot write there: 'Cannot write file output.aux'."""
    env = plan(settings(), {"TEXLIVE_IMAGE_USER": "tex"})
    assert env.environment["TEXLIVE_IMAGE_USER"] == "33:33"
    assert any("TEXLIVE_IMAGE_USER=tex replaced by 33:33" in note for note in env.notes)
    other = service_env.docker_runner_plan(
        settings(), {"OVERLEAF_INIT_SERVICE_USER": "sharelatex"}, users({"sharelatex": (999, 998)})
    )
    assert other.user == "999:998" and other.notes == ()


@pytest.mark.parametrize(
    ("table", "said"), [({}, "is no user in this image"), ({"www-data": (0, 0)}, "is root")]
)
def test_a_runner_user_that_cannot_be_is_one_line(
    table: dict[str, tuple[int, int]], said: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        service_env.runner_user({}, users(table))
    (problem,) = raised.value.problems
    assert problem.startswith("OVERLEAF_INIT_SERVICE_USER='www-data' ") and said in problem


def test_the_images_and_the_allow_list_as_the_runner_reads_them() -> None:
    env = plan(settings(ALL_TEX_LIVE_DOCKER_IMAGES="a:1,b:2", TEX_LIVE_DOCKER_IMAGE="b:2"))
    # TEXLIVE_IMAGE is read before TEX_LIVE_DOCKER_IMAGE; ALLOWED_IMAGES is split on spaces.
    assert env.environment["TEXLIVE_IMAGE"] == "b:2"
    assert env.environment["ALLOWED_IMAGES"] == "b:2 a:1"
    assert env.environment["DOCKER_RUNNER"] == env.environment["SANDBOXED_COMPILES"] == "true"


def test_the_shim_in_dind_never_gets_an_operators_host_dir() -> None:
    given = {"SANDBOXED_COMPILES_HOST_DIR": "/srv/x", "PATH": "/bin"}
    env = service_env.environment(settings(**given), given, "shim", Path("/s"))
    assert env["SANDBOXED_COMPILES_HOST_DIR"] == ""  # empty: read as not set
    assert "SANDBOXED_COMPILES_HOST_DIR_COMPILES" not in env
    sibling_env = service_env.environment(sibling(), SIBLING_HOST, "shim", Path("/s"))
    assert "SANDBOXED_COMPILES_HOST_DIR_COMPILES" not in sibling_env  # the engine side's stay


def test_host_dirs_with_compiles_off_say_they_are_not_used() -> None:
    (warning,) = config.load({"SANDBOXED_COMPILES_HOST_DIR_OUTPUT": "/srv/o"}).warnings
    assert warning.startswith("SANDBOXED_COMPILES_HOST_DIR_OUTPUT=/srv/o is not used: ")


def test_a_host_dir_equal_to_the_own_dir_in_dind_is_no_warning() -> None:
    chosen = settings(SANDBOXED_COMPILES_HOST_DIR_COMPILES="/var/lib/overleaf/data/compiles/")
    assert chosen.warnings == ()


# -- which runner, and why ------------------------------------------------------------------


def test_auto_says_why_it_chose(tmp_path: Path) -> None:
    shim = service_env.choose(settings(), tmp_path)
    assert shim.runner == "shim" and "no DockerRunner.js" in shim.why
    found = with_runner(tmp_path)
    docker = service_env.choose(settings(), tmp_path)
    assert (docker.runner, docker.found) == ("docker", found) and str(found) in docker.why
    forced = service_env.choose(settings(OVERLEAF_INIT_COMPILE_RUNNER="shim"), tmp_path)
    assert (forced.runner, forced.why) == ("shim", "OVERLEAF_INIT_COMPILE_RUNNER=shim")


def test_the_log_line_names_the_runner_the_user_and_the_host_dir(tmp_path: Path) -> None:
    with_runner(tmp_path)
    wiring = service_env.ServicesCompile(
        settings(), tmp_path / "shim", "/py", tmp_path, users({"www-data": WWW_DATA})
    )
    wiring.environment({"TEXLIVE_IMAGE_USER": "tex"})
    text = wiring.describe()
    assert text.startswith("their own docker runner, DockerRunner.js (auto: ")
    assert (
        "TEXLIVE_IMAGE_USER=33:33" in text and "/var/lib/overleaf/data/compiles/<project>" in text
    )
    assert "TEXLIVE_IMAGE_USER=tex replaced by 33:33" in text


def test_doctor_names_the_runner_and_why(tmp_path: Path) -> None:
    shim = doctor.compile_runner_check(settings(), {}, tmp_path)
    assert shim.status is Status.OK and "no DockerRunner.js" in shim.message
    forced = doctor.compile_runner_check(
        settings(OVERLEAF_INIT_COMPILE_RUNNER="docker"), {}, tmp_path
    )
    assert forced.status is Status.FAIL and "exits at start" in forced.message
    assert "OVERLEAF_INIT_COMPILE_RUNNER" in forced.fix
    with_runner(tmp_path)
    docker = doctor.compile_runner_check(settings(), {}, tmp_path)
    assert docker.status is Status.OK and "DockerRunner.js (auto: " in docker.message
    assert "TEXLIVE_IMAGE_USER=" in docker.message
    nobody = doctor.compile_runner_check(
        settings(), {"OVERLEAF_INIT_SERVICE_USER": "no-such-user-here"}, tmp_path
    )
    assert nobody.status is Status.FAIL and "is no user in this image" in nobody.message


# -- the sweep of the containers the runner keeps --------------------------------------------

RULES = sweep.Rules(idle=120, reuse=190)
NOW = 1_000_000.0


def seen(state: str, ended: float | None = None, expires: float | None = None) -> sweep.Seen:
    return sweep.Seen("c" * 64, state, created=NOW - 3600, finished=ended, expires=expires)


@pytest.mark.parametrize(
    ("container", "why"),
    [
        (seen("exited", ended=NOW - 119, expires=NOW + 600), None),  # waiting for its next compile
        (seen("exited", ended=NOW - 121, expires=NOW + 600), "idle"),
        (seen("exited", ended=NOW - 1, expires=NOW - 1), "past its expiry"),
        (seen("dead", ended=NOW - 500), "idle"),
        (seen("running", expires=NOW - 1), None),  # the kill grace first
        (seen("running", expires=NOW - 6), "running past its expiry"),
        (seen("running"), None),  # no expiry label: never a running one
        (sweep.Seen("c", "created", created=NOW - 59), None),  # between create and start
        (sweep.Seen("c", "created", created=NOW - 121), "never started"),
        (seen("removing", ended=NOW - 999), None),
    ],
)
def test_when_a_compile_container_is_due(container: sweep.Seen, why: str | None) -> None:
    assert sweep.due(container, NOW, RULES) == why


def test_a_stopped_container_is_retired_on_inspect_before_the_sweep_could_race_its_start() -> None:
    """Asked for (inspect) with half its idle time spent, or too little life left for one more
    compile: replaced rather than started, so the sweep (which waits the whole idle time) never
    removes one between its runner's inspect and start."""
    assert not sweep.retire_on_inspect(seen("exited", NOW - 59, NOW + 600), NOW, RULES)
    assert sweep.retire_on_inspect(seen("exited", NOW - 61, NOW + 600), NOW, RULES)
    assert sweep.retire_on_inspect(seen("exited", NOW - 1, NOW + 189), NOW, RULES)
    assert not sweep.retire_on_inspect(seen("running", NOW - 999, NOW - 999), NOW, RULES)
    zero = sweep.Rules(idle=0, reuse=190)  # idle 0: never reused
    assert sweep.retire_on_inspect(seen("exited", NOW - 0.5, NOW + 600), NOW, zero)


def test_the_engines_times_are_read_to_the_second() -> None:
    assert sweep.parse_time("1970-01-01T00:16:40.123456789Z") == pytest.approx(1000.123456)
    assert sweep.parse_time("1970-01-01T00:16:40Z") == 1000.0
    assert sweep.parse_time("0001-01-01T00:00:00Z") is None
    assert sweep.parse_time("soon") is None
    document = {
        "Id": "x",
        "Created": "1970-01-01T00:00:10.5Z",
        "State": {"Status": "exited", "FinishedAt": "1970-01-01T00:00:20Z"},
        "Config": {"Labels": {"sharelatex-init.expires": "99"}},
    }
    assert sweep.Seen.from_inspect(document) == sweep.Seen("x", "exited", 10.5, 20.0, 99.0)


def test_the_sweep_looks_often_enough_for_the_idle_time() -> None:
    assert sweep.Rules(idle=120, reuse=0).every == 30
    assert sweep.Rules(idle=10, reuse=0).every == 5
    assert sweep.Rules(idle=0, reuse=0).every == 1


def test_the_sweep_says_nothing_while_the_engine_has_never_answered(tmp_path: Path) -> None:
    """Docker-in-docker starts the proxy while dockerd comes up: no false warning at boot."""
    said: list[str] = []
    rounds: list[float] = []

    def clock() -> float:
        rounds.append(NOW)
        return NOW

    sweeper = sweep.Sweeper(
        tmp_path / "none.sock", sweep.Rules(idle=0, reuse=0), print, said.append, clock
    )
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while len(rounds) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert len(rounds) >= 2 and said == []
