"""The installer's pure parts: progress from pull events, rate and ETA, messages, reasons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from init import texlive
from init.texlive import Board, PullProgress, RateMeter, Reason, State


def test_progress_sums_layers_and_finishes_them() -> None:
    progress = PullProgress()
    events: list[dict[str, Any]] = [
        {"status": "Pulling from texlive", "id": "test"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "a"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "b"},
        {"status": "Downloading", "progressDetail": {"current": 100, "total": 1000}, "id": "a"},
        {"status": "Downloading", "progressDetail": {"current": 50, "total": 200}, "id": "b"},
    ]
    for event in events:
        progress.update(event)
    assert (progress.bytes_done, progress.bytes_total) == (150, 1200)
    progress.update({"status": "Download complete", "progressDetail": {}, "id": "b"})
    progress.update(
        {"status": "Extracting", "progressDetail": {"current": 9, "total": 99}, "id": "b"}
    )
    assert (progress.bytes_done, progress.bytes_total) == (300, 1200)
    progress.update({"status": "Pull complete", "progressDetail": {}, "id": "a"})
    assert texlive.percent(progress.bytes_done, progress.bytes_total) == 100.0


def test_progress_ignores_layers_already_there_and_summary_lines() -> None:
    progress = PullProgress()
    progress.update({"status": "Already exists", "progressDetail": {}, "id": "a"})
    progress.update({"status": "Digest: sha256:abc"})
    progress.update({"status": "Status: Downloaded newer image for x:1"})
    assert (progress.bytes_done, progress.bytes_total) == (0, 0)


def test_progress_notes_the_engines_own_retry() -> None:
    progress = PullProgress()
    progress.update({"status": "Retrying in 5 seconds", "progressDetail": {}, "id": "a"})
    assert progress.retry_note == "Retrying in 5 seconds"
    progress.update(
        {"status": "Downloading", "progressDetail": {"current": 1, "total": 2}, "id": "a"}
    )
    assert progress.retry_note == ""


def test_progress_of_a_resumed_download_keeps_its_bytes() -> None:
    progress = PullProgress()
    layer = "a"
    progress.update(
        {"status": "Downloading", "progressDetail": {"current": 400, "total": 1000}, "id": layer}
    )
    progress.update({"status": "Retrying in 5 seconds", "progressDetail": {}, "id": layer})
    # the engine asks for the rest with a Range request: its total is what is left
    progress.update(
        {"status": "Downloading", "progressDetail": {"current": 100, "total": 600}, "id": layer}
    )
    assert (progress.bytes_done, progress.bytes_total) == (500, 1000)


def test_percent_rate_and_eta() -> None:
    assert texlive.percent(0, 0) == 0.0
    assert texlive.percent(43, 100) == 43.0
    meter = RateMeter(window=10)
    meter.add(0.0, 0)
    assert meter.rate() == 0.0
    meter.add(2.0, 2_000_000)
    assert meter.rate() == 1_000_000
    for t in range(3, 30):
        meter.add(float(t), 2_000_000 + (t - 2) * 500_000)
    assert meter.rate() == pytest.approx(500_000)
    assert texlive.eta_seconds(1_000, 2_000, 100.0) == 10.0
    assert texlive.eta_seconds(1_000, 2_000, 0.0) is None


def test_formats() -> None:
    assert texlive.format_sizes(1_200_000_000, 2_800_000_000) == "1.2/2.8 GB"
    assert texlive.format_sizes(1_200_000_000, 2_800_000_000, " of ") == "1.2 of 2.8 GB"
    assert texlive.format_sizes(5, 10) == "5/10 B"
    assert texlive.format_eta(None) == ""
    assert texlive.format_eta(40) == "40 s"
    assert texlive.format_eta(170) == "3 min"
    assert texlive.format_eta(7500) == "2 h 5 min"
    line = texlive.progress_line("quay.io/x:1", 43.0, 1_200_000_000, 2_800_000_000, 180)
    assert line == "texlive: pulling quay.io/x:1: 43% (1.2/2.8 GB), ~3 min left"


def test_still_installing_message() -> None:
    entry = {
        "state": "installing",
        "bytes_done": 1_200_000_000,
        "bytes_total": 2_800_000_000,
        "eta_seconds": 180.0,
    }
    assert texlive.still_installing("X", entry) == (
        "TeX Live image X is still installing: 43% (1.2 of 2.8 GB), about 3 min left"
    )
    assert texlive.still_installing("X", {"state": "installing"}) == (
        "TeX Live image X is still installing"
    )
    failed = texlive.still_installing("X", {"state": "failed", "reason": "X does not exist"})
    assert failed == "TeX Live image X failed to install: X does not exist"


@pytest.mark.parametrize(
    ("text", "source", "reason"),
    [
        ("manifest for 127.0.0.1:5000/nope:1 not found: manifest unknown", "pull", "not_found"),
        ("pull access denied for nope, repository does not exist", "pull", "not_found"),
        ("dial tcp 127.0.0.1:5000: connect: connection refused", "pull", "unreachable"),
        ("unexpected EOF", "pull", "unreachable"),
        ("write /var/lib/docker/tmp/x: no space left on device", "pull", "disk_full"),
        ("no space left on device", "load", "disk_full"),
        ("archive/tar: invalid tar header", "load", "broken_tarball"),
        ("something else", "pull", "other"),
    ],
)  # fmt: skip
def test_classify(text: str, source: str, reason: str) -> None:
    error = texlive.classify(text, source, "img:1", "127.0.0.1:5000")
    assert error.reason.value == reason
    assert text in error.message
    assert error.reason.permanent == (reason == "not_found")


def test_messages_name_the_fix() -> None:
    assert "TEX_LIVE_DOCKER_IMAGE" in texlive.classify("manifest unknown", "pull", "i").message
    assert "docker save" in texlive.classify("bad", "load", "a/b:1").message
    assert "data root" in texlive.classify("no space left on device", "pull", "i").message


def test_tarball_name_and_registry() -> None:
    assert texlive.tarball_name("127.0.0.1:5000/texlive:test") == "127.0.0.1_5000_texlive_test.tar"
    assert texlive.registry_of("127.0.0.1:5000/texlive:test") == "127.0.0.1:5000"
    assert texlive.registry_of("texlive/texlive:latest") == "docker.io"


def test_board_ready_follows_the_default_image(tmp_path: Path) -> None:
    lines: list[str] = []
    status = tmp_path / "status.json"
    board = Board(status, ["a:1", "b:1"], lines.append)
    board.change("b:1", State.PRESENT)
    assert json.loads(status.read_text())["ready"] is False
    board.change("a:1", State.PRESENT, source="pull")
    document = json.loads(status.read_text())
    assert document["ready"] is True
    assert [i["state"] for i in document["images"]] == ["present", "present"]
    assert lines == ["texlive: b:1 present (already in the engine)", "texlive: a:1 present (pull)"]
    assert list(tmp_path.iterdir()) == [status]  # the temporary file was renamed over it


def test_board_writes_progress_at_a_low_rate(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    board = Board(status, ["a:1"], lambda line: None)
    board.change("a:1", State.INSTALLING, source="pull")
    board.progress("a:1", 10, 100, 5.0)
    board.flush()  # the state change was just written: too soon
    assert json.loads(status.read_text())["images"][0]["bytes_done"] == 0
    board.flush(force=True)
    entry = json.loads(status.read_text())["images"][0]
    assert (entry["bytes_done"], entry["percent"], entry["eta_seconds"]) == (10, 10.0, 18.0)


def test_not_found_is_permanent_and_unreachable_is_not() -> None:
    assert Reason.NOT_FOUND.permanent and Reason.NO_TARBALL.permanent
    assert not Reason.UNREACHABLE.permanent and not Reason.BROKEN_TARBALL.permanent
