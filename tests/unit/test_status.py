from __future__ import annotations

from pathlib import Path

from init import status


def test_write_then_read_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    status.write(path, {"phase": "running", "services": []})
    assert status.read(path) == {"phase": "running", "services": []}
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_status_path_precedence(tmp_path: Path) -> None:
    given = tmp_path / "given.json"
    assert status.status_path({}, given) == given
    assert status.status_path({status.STATUS_FILE_VARIABLE: "/x.json"}) == Path("/x.json")
    assert status.status_path({}) == status.DEFAULT_STATUS_FILE


def test_text_shows_each_service_state_and_crash_loops() -> None:
    now = 1000.0
    document = {
        "pid": 1,
        "phase": "running",
        "started_at": 900.0,
        "services": [
            {"name": "web", "state": "up", "pid": 7, "since": 940.0, "restarts": 0},
            {
                "name": "clsi",
                "state": "backoff",
                "pid": None,
                "since": 999.0,
                "restarts": 4,
                "quick_exits": 4,
                "next_start_at": 1004.0,
                "last_exit": {"description": "exited with status 1"},
            },
        ],
    }
    text = status.format_text(document, now=now)
    assert "init: running, pid 1, up 1 min 40 s" in text
    assert "web   up, pid 7, for 1 min 0 s" in text
    assert "clsi  backoff, 4 restarts, crash loop, next start in 4.0 s" in text
    assert "last exited with status 1" in text


def running(**extra: object) -> dict[str, object]:
    return {
        "pid": 1,
        "phase": "running",
        "services": [{"name": "web", "state": "up"}, {"name": "clsi", "state": "starting"}],
        **extra,
    }


def test_healthy_when_the_init_runs_and_its_services_are_up() -> None:
    assert status.check(running(), "healthy") == (True, "the init is running")
    assert status.check(running(), "healthy", pid_alive=False)[0] is False
    assert status.check(running(phase="stopping"), "healthy") == (False, "the init is stopping")


def test_a_crash_looping_service_is_unhealthy_and_says_why() -> None:
    document = running(services=[{"name": "web", "state": "backoff", "reason": "exit 1"}])
    assert status.check(document, "healthy") == (False, "web is backoff: exit 1")


def test_ready_needs_the_engine_when_compiles_are_sandboxed() -> None:
    not_yet = running(engine={"mode": "dind", "ready": False, "state": "starting", "reason": ""})
    passes, why = status.check(not_yet, "ready")
    assert not passes and "dind engine is not ready (starting)" in why
    assert status.check(running(engine={"mode": "dind", "ready": True}), "ready")[0]
    assert status.check(running(), "ready") == (True, "running (compiles not sandboxed)")
    assert status.check(running(phase="starting"), "ready")[0] is False
