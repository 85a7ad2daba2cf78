from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from init import status
from init.config import STATUS_FILE_VARIABLE
from init.core import status_file
from init.core.status_file import StatusDocument
from init.texlive.contract import ImageStatus


def view(document: dict[str, Any]) -> status.Status:
    """A status document as the file holds it, read as every reader reads it."""
    return status.Status.of(StatusDocument.from_json(document))


def check(document: dict[str, Any], what: str, pid_alive: bool = True) -> tuple[bool, str]:
    return status.check(view(document), what, pid_alive)


def write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document))


def test_write_then_read_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    document = StatusDocument(pid=7, phase="running", started_at=1.0, message="hello")
    status_file.write(path, document)
    assert status_file.read(path) == document
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_a_status_file_of_the_wrong_shape_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    for wrong in ("[1, 2]", '{"phase": 3}', '{"phase": "running", "services": {"a": 1}}'):
        path.write_text(wrong)
        with pytest.raises(ValueError):
            status.read_all(path)


def test_status_path_precedence(tmp_path: Path) -> None:
    given = tmp_path / "given.json"
    assert status_file.status_path({}, given) == given
    assert status_file.status_path({STATUS_FILE_VARIABLE: "/x.json"}) == Path("/x.json")
    assert status_file.status_path({}) == status_file.DEFAULT_STATUS_FILE


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
    text = status.format_text(view(document), now=now)
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
    assert check(running(), "healthy") == (True, "the init is running")
    assert check(running(), "healthy", pid_alive=False)[0] is False
    assert check(running(phase="stopping"), "healthy") == (False, "the init is stopping")


def test_a_crash_looping_service_is_unhealthy_and_says_why() -> None:
    document = running(services=[{"name": "web", "state": "backoff", "reason": "exit 1"}])
    assert check(document, "healthy") == (False, "web is backoff: exit 1")


def test_ready_needs_the_engine_when_compiles_are_sandboxed() -> None:
    not_yet = running(engine={"mode": "dind", "ready": False, "state": "starting", "reason": ""})
    passes, why = check(not_yet, "ready")
    assert not passes and "dind engine is not ready (starting)" in why
    assert check(running(engine={"mode": "dind", "ready": True}), "ready")[0]
    assert check(running(), "ready") == (True, "running (compiles not sandboxed)")
    assert check(running(phase="starting"), "ready")[0] is False


def test_a_refused_engine_is_named_while_the_init_still_starts() -> None:
    """The refusal waits for the operator, not for the boot: its reason at once (a full run
    read "still starting" after the status file already said "refused")."""
    for state in ("refused", "failed"):
        engine = {"mode": "dind", "ready": False, "state": state, "reason": "on overlay"}
        passes, why = check(running(phase="starting", engine=engine), "ready")
        assert not passes and why.endswith("dind engine is not ready (on overlay)"), why
    starting = {"mode": "dind", "ready": False, "state": "starting", "reason": ""}
    assert check(running(phase="starting", engine=starting), "ready") == (
        False,
        "the init is still starting",
    )


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
    passes, why = check(running(engine=engine, texlive=texlive(INSTALLING)), "ready")
    assert not passes
    assert why == (
        "compiles cannot run yet: TeX Live image texlive/texlive:2024 is still installing: "
        "43% (1.2 of 2.8 GB), about 3 min left"
    )
    present = {**INSTALLING, "state": "present"}
    assert check(running(engine=engine, texlive=texlive(present, ready=True)), "ready") == (
        True,
        "compiles can run",
    )
    failed = texlive({"image": "texlive/texlive:2024", "state": "failed", "reason": "no such"})
    assert "failed to install: no such" in check(running(texlive=failed), "ready")[1]
    # healthy does not wait for TeX Live: the site is up while it installs
    assert check(running(engine=engine, texlive=texlive(INSTALLING)), "healthy")[0]


def test_read_all_merges_the_installers_file_over_the_inits_summary(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    waiting = {"image": "texlive/texlive:2024", "state": "waiting"}
    write(path, running(texlive=texlive(waiting, state="installing")))
    before = status.read_all(path).texlive
    assert before is not None and before.images == (ImageStatus.from_json(waiting),)
    write(status_file.texlive_status_path(path), texlive(INSTALLING))
    merged = status.read_all(path).texlive
    assert merged is not None and merged.state == "installing"
    assert merged.images == (ImageStatus.from_json(INSTALLING),)


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
    text = status.format_text(view(document), now=10.0)
    assert "engine: dind ready, storage driver overlay2" in text
    assert (
        "texlive: texlive/texlive:2024  installing by pull 43% (1.2/2.8 GB), 12.3 MB/s, "
        "~3 min left (default)"
    ) in text
    assert "texlive: texlive/texlive:2023  retrying at 12:00:05: registry unreachable" in text


def test_a_build_shows_its_steps_where_a_pull_shows_bytes() -> None:
    from init.texlive import progress

    building = ImageStatus(
        image="t:1",
        state="installing",
        source="build",
        percent=40.2,
        note="step 8/17, apt: 31/58 packages set up",
    )
    assert progress.image_line(building) == (
        "installing by build 40%: step 8/17, apt: 31/58 packages set up"
    )
    assert progress.still_installing("t:1", building) == (
        "TeX Live image t:1 is still installing: 40%, step 8/17, apt: 31/58 packages set up"
    )


def test_a_service_between_two_crashes_is_not_ready_until_it_stays_up() -> None:
    """Between two crashes a crash-looping service is `starting` for a moment: a probe asked
    then said yes (1 of 150 probes did, against a crash-looping compile service)."""
    now = 1000.0
    restarting = {"name": "clsi", "state": "starting", "quick_exits": 3, "since": now - 0.2}
    document = running(services=[restarting])
    for what in ("healthy", "ready"):
        passes, why = status.check(view(document), what, now=now)
        assert not passes and why.startswith("clsi is restarting after 3 quick exits")
    recovered = {**restarting, "state": "up", "since": now - 11.0}
    assert status.check(view(running(services=[recovered])), "ready", now=now)[0]
    first_start = {"name": "clsi", "state": "starting", "quick_exits": 0, "since": now}
    assert status.check(view(running(services=[first_start])), "ready", now=now)[0]
