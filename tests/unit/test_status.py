from __future__ import annotations

from pathlib import Path

from init.core import status


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


INSTALLING = {
    "image": "texlive/texlive:2024",
    "state": "installing",
    "source": "pull",
    "bytes_done": 1_200_000_000,
    "bytes_total": 2_800_000_000,
    "rate": 12_300_000,
    "eta_seconds": 170,
}


def texlive(*entries: dict[str, object], ready: bool = False, **extra: object) -> dict[str, object]:
    return {"ready": ready, "default": "texlive/texlive:2024", "images": list(entries), **extra}


def test_ready_needs_the_default_image_and_says_how_far_it_is() -> None:
    engine = {"mode": "dind", "ready": True}
    passes, why = status.check(running(engine=engine, texlive=texlive(INSTALLING)), "ready")
    assert not passes
    assert why == (
        "compiles cannot run yet: TeX Live image texlive/texlive:2024 is still installing: "
        "43% (1.2 of 2.8 GB), about 3 min left"
    )
    present = {**INSTALLING, "state": "present"}
    assert status.check(running(engine=engine, texlive=texlive(present, ready=True)), "ready") == (
        True,
        "compiles can run",
    )
    failed = texlive({"image": "texlive/texlive:2024", "state": "failed", "reason": "no such"})
    assert "failed to install: no such" in status.check(running(texlive=failed), "ready")[1]
    # healthy does not wait for TeX Live: the site is up while it installs
    assert status.check(running(engine=engine, texlive=texlive(INSTALLING)), "healthy")[0]


def test_read_all_merges_the_installers_file_over_the_inits_summary(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    waiting = {"image": "texlive/texlive:2024", "state": "waiting"}
    status.write(path, running(texlive=texlive(waiting, state="installing")))
    assert status.read_all(path)["texlive"]["images"] == [waiting]
    status.write(status.texlive_status_path(path), texlive(INSTALLING))
    merged = status.read_all(path)["texlive"]
    assert merged["images"] == [INSTALLING] and merged["state"] == "installing"


def test_text_shows_the_engine_and_each_image() -> None:
    retrying = {
        "image": "texlive/texlive:2023",
        "state": "retrying",
        "reason": "registry unreachable",
        "next_try_at": "12:00:05",
    }
    document = running(
        started_at=0.0,
        services=[],
        engine={"mode": "dind", "state": "ready", "driver": "overlay2"},
        texlive=texlive(INSTALLING, retrying),
    )
    text = status.format_text(document, now=10.0)
    assert "engine: dind ready, storage driver overlay2" in text
    assert (
        "texlive: texlive/texlive:2024  installing by pull 43% (1.2/2.8 GB), 12.3 MB/s, "
        "~3 min left (default)"
    ) in text
    assert "texlive: texlive/texlive:2023  retrying at 12:00:05: registry unreachable" in text


def test_a_build_shows_its_steps_where_a_pull_shows_bytes() -> None:
    from init.texlive import progress

    building = {
        "image": "t:1",
        "state": "installing",
        "source": "build",
        "percent": 40.2,
        "note": "step 8/17, apt: 31/58 packages set up",
    }
    assert progress.image_line(building) == (
        "installing by build 40%: step 8/17, apt: 31/58 packages set up"
    )
    assert progress.still_installing("t:1", building) == (
        "TeX Live image t:1 is still installing: 40%, step 8/17, apt: 31/58 packages set up"
    )
