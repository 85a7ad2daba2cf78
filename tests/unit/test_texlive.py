"""The installer's pure parts: progress from pull events, rate and ETA, messages, reasons."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from init import config
from init.config import TEXLIVE_SCHEMES
from init.errors import ConfigError
from init.texlive import build as texlive_build
from init.texlive import install as texlive
from init.texlive import progress
from init.texlive.build import BuildOptions, BuildProgress
from init.texlive.contract import ImageState as State
from init.texlive.contract import ImageStatus, InstallRequest
from init.texlive.install import Board, PullProgress, RateMeter, Reason
from init.texlive.progress import percent


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
    assert percent(progress.bytes_done, progress.bytes_total) == 100.0


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
    assert progress.percent(0, 0) == 0.0
    assert progress.percent(43, 100) == 43.0
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
    assert progress.format_sizes(1_200_000_000, 2_800_000_000) == "1.2/2.8 GB"
    assert progress.format_sizes(1_200_000_000, 2_800_000_000, " of ") == "1.2 of 2.8 GB"
    assert progress.format_sizes(5, 10) == "5/10 B"
    assert progress.format_eta(None) == ""
    assert progress.format_eta(40) == "40 s"
    assert progress.format_eta(170) == "3 min"
    assert progress.format_eta(7500) == "2 h 5 min"
    line = texlive.progress_line("quay.io/x:1", 43.0, 1_200_000_000, 2_800_000_000, 180)
    assert line == "texlive: pulling quay.io/x:1: 43% (1.2/2.8 GB), ~3 min left"


def test_still_installing_message() -> None:
    entry = ImageStatus(
        "X", state="installing", bytes_done=1_200_000_000, bytes_total=2_800_000_000,
        eta_seconds=180.0,
    )  # fmt: skip
    assert progress.still_installing("X", entry) == (
        "TeX Live image X is still installing: 43% (1.2 of 2.8 GB), about 3 min left"
    )
    assert progress.still_installing("X", ImageStatus("X", state="installing")) == (
        "TeX Live image X is still installing"
    )
    failed = progress.still_installing(
        "X", ImageStatus("X", state="failed", reason="X does not exist")
    )
    assert failed == "TeX Live image X failed to install: X does not exist"


@pytest.mark.parametrize(
    ("text", "source", "reason"),
    [
        ("manifest for 127.0.0.1:5000/nope:1 not found: manifest unknown", "pull", "not_found"),
        ("pull access denied for nope, repository does not exist", "pull", "not_found"),
        ("dial tcp 127.0.0.1:5000: connect: connection refused", "pull", "unreachable"),
        ("unexpected EOF", "pull", "unreachable"),
        (
            'Get "http://127.0.0.1:5000/v2/": http: server closed idle connection',
            "pull",
            "unreachable",
        ),
        ('Get "https://10.9.9.9/v2/": context deadline exceeded', "pull", "unreachable"),
        ("x509: certificate signed by unknown authority", "pull", "other"),
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


# -- the terminal's progress bar ------------------------------------------------------------------

PULLING = {
    "image": "127.0.0.1:5000/texlive:test",
    "state": "installing",
    "source": "pull",
    "percent": 43.0,
    "bytes_done": 1_200_000_000,
    "bytes_total": 2_800_000_000,
    "rate": 12_300_000,
    "eta_seconds": 180.0,
}


def test_progress_bar_of_a_pull() -> None:
    bar = texlive.progress_bar(PULLING, 100)
    assert bar.startswith("127.0.0.1:5000/texlive:test [")
    assert bar.endswith("] 43% 1.2/2.8 GB 12.3 MB/s ETA 3 min")
    assert len(bar) == 99  # the whole width but the last column: no wrap
    inside = bar[bar.index("[") + 1 : bar.index("]")]
    assert inside.count("=") == int(len(inside) * 0.43) and ">" in inside


@pytest.mark.parametrize("width", [200, 100, 80, 60, 40, 20, 10])
def test_progress_bar_never_wraps(width: int) -> None:
    for entry in (PULLING, {**PULLING, "percent": 100.0}, {**PULLING, "percent": 0.0}):
        assert len(texlive.progress_bar(entry, width)) < width


def test_progress_bar_of_a_build_shows_its_step() -> None:
    entry = {"image": "x:1", "state": "installing", "source": "build", "percent": 40.0,
             "note": "step 8/13, apt: 120/310 packages fetched"}  # fmt: skip
    bar = texlive.progress_bar(entry, 80)
    assert bar.startswith("x:1 [") and bar.endswith(
        "] 40% step 8/13, apt: 120/310 packages fetched"
    )


def test_progress_bar_of_other_states() -> None:
    assert texlive.progress_bar({"image": "x:1", "state": "present", "source": "build"}, 80) == (
        "x:1: present (build)"
    )
    retrying = {"image": "x:1", "state": "retrying", "next_try_at": "T", "reason": "r" * 200}
    line = texlive.progress_bar(retrying, 80)
    assert line.startswith("x:1: retrying at T: rrr") and len(line) == 79 and line.endswith("...")


def test_the_bar_follows_the_first_image_on_its_way() -> None:
    entries = [{"state": "present"}, {"state": "retrying", "image": "b"}, {"state": "installing"}]
    assert texlive.current(entries) == entries[1]
    assert texlive.current([{"state": "present"}]) is None


def test_terminal_puts_log_lines_above_the_bar() -> None:
    out = io.StringIO()
    terminal = texlive.Terminal(out, lambda: 60)
    terminal.bar(PULLING)
    terminal.bar(PULLING)  # unchanged: not drawn again
    terminal.line("texlive: something happened")
    terminal.close()
    bar = texlive.progress_bar(PULLING, 60)
    assert out.getvalue() == (
        f"\r{bar}\x1b[K" + "\r\x1b[Ktexlive: something happened\n" + bar + "\r\x1b[K"
    )


def test_child_arguments_take_the_build_source() -> None:
    request = InstallRequest.from_argv(
        ["--socket", "/s", "--status", "/f", "--images", "a:1,b:1", "--source", "pull,build",
         "--scheme", "full", "--base-image", "my/base:1"]
    )  # fmt: skip
    assert (request.sources, request.scheme, request.base_image) == (
        ("pull", "build"), "full", "my/base:1"
    )  # fmt: skip
    default = InstallRequest.from_argv(["--socket", "/s", "--status", "/f", "--images", "a"])
    assert default.sources == ("pull", "load")


def test_the_install_request_reads_back_what_it_writes() -> None:
    request = InstallRequest(
        socket=Path("/s"), status=Path("/f"), images=("a:1", "b:2"), sources=("load", "build"),
        scheme="full", base_image="base:1", tarball_dir=Path("/t"), once=True,
    )  # fmt: skip
    assert InstallRequest.from_argv(request.argv()) == request


# -- the build source: plan, progress, failures ---------------------------------------------------


def test_the_recipe_is_the_one_scripts_build_images_reads() -> None:
    repo = Path(__file__).resolve().parents[2]
    script = (repo / "scripts" / "build-images").read_text()
    assert 'TEXLIVE_RECIPES = SCRIPT.parents[1] / "init" / "texlive" / "recipes"' in script
    recipe = repo / "init" / "texlive" / "recipes" / "texlive.Dockerfile"
    assert recipe == texlive_build.DOCKERFILE
    assert not (repo / "scripts" / "images" / "texlive.Dockerfile").exists()  # one recipe


def test_packages_per_scheme() -> None:
    assert texlive_build.packages("small") == [
        "texlive-latex-base", "texlive-latex-recommended", "texlive-fonts-recommended", "latexmk",
        "texlive-extra-utils",
    ]  # fmt: skip
    assert texlive_build.packages("basic") == ["texlive-latex-base", "latexmk"]
    assert texlive_build.packages("full") == ["texlive-full"]


def test_every_scheme_has_its_list_and_scripts_build_images_offers_the_same() -> None:
    repo = Path(__file__).resolve().parents[2]
    lists = sorted(p.name for p in texlive_build.RECIPES.glob("texlive-*.packages"))
    assert lists == sorted(f"texlive-{scheme}.packages" for scheme in TEXLIVE_SCHEMES)
    script = (repo / "scripts" / "build-images").read_text()
    offered = ", ".join(f'"{scheme}"' for scheme in TEXLIVE_SCHEMES)
    assert f"\nSCHEMES = ({offered})\n" in script


def test_a_scheme_without_a_list_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError) as raised:
        config.load({config.TEXLIVE_SCHEME: "medium"})
    assert raised.value.problems == [
        "OVERLEAF_INIT_TEXLIVE_SCHEME='medium' is not a TeX Live scheme; use basic, small or full"
    ]


def test_plan_takes_mirrors_and_proxies_from_the_environment() -> None:
    environ = {"DEBIAN_MIRROR": "http://mirror.example/debian/", "http_proxy": "http://p:3128"}
    plan = texlive_build.plan("x:1", BuildOptions(scheme="full"), environ, ["bridge", "host"])
    assert plan.buildargs == {
        "BASE_IMAGE": "sharelatex-init/debian:bookworm",
        "SUITE": "bookworm",
        "DEBIAN_MIRROR": "http://mirror.example/debian",
        "DEBIAN_SECURITY_MIRROR": "http://deb.debian.org/debian-security",
        "TEXLIVE_PACKAGES": "texlive-full",
        "http_proxy": "http://p:3128",
    }
    assert plan.labels["sharelatex-init.scheme"] == "full"
    assert plan.network_mode is None
    no_security = texlive_build.plan("x:1", BuildOptions(), {"DEBIAN_SECURITY_MIRROR": ""}, [])
    assert no_security.buildargs["DEBIAN_SECURITY_MIRROR"] == ""


@pytest.mark.parametrize(
    ("networks", "mirror", "proxies", "mode"),
    [
        (["bridge", "host", "none"], "http://deb.debian.org/debian", [], None),
        (["host", "none"], "http://deb.debian.org/debian", [], "host"),  # --bridge=none
        (["bridge", "host"], "http://127.0.0.1:3142/debian", [], "host"),
        (["bridge", "host"], "http://localhost/debian", [], "host"),
        (["bridge"], "http://deb.debian.org/debian", ["http://user@127.0.0.1:3128"], "host"),
    ],
)  # fmt: skip
def test_network_mode_only_host_when_needed(
    networks: list[str], mirror: str, proxies: list[str], mode: str | None
) -> None:
    assert texlive_build.network_mode(networks, mirror, proxies) == mode


def test_context_holds_the_recipe_alone() -> None:
    with tarfile.open(fileobj=io.BytesIO(texlive_build.context())) as tar:
        assert tar.getnames() == ["Dockerfile"]
        member = tar.extractfile("Dockerfile")
        assert member is not None
        assert member.read() == texlive_build.DOCKERFILE.read_bytes()


def test_step_weights_put_the_time_in_the_run_step() -> None:
    weights = texlive_build.step_weights(texlive_build.DOCKERFILE.read_text())
    assert weights.count(texlive_build.RUN_WEIGHT) == 1
    assert len(weights) == 13
    dockerfile = "# c\nFROM a\nRUN x \\\n  # inside\n  y\nUSER 1\n"
    assert texlive_build.step_weights(dockerfile) == [1, texlive_build.RUN_WEIGHT, 1]


def test_build_progress_by_steps_and_apt_counts() -> None:
    progress = BuildProgress(weights=[1, 98, 1])
    assert (progress.percent, progress.note) == (0.0, "starting the build")
    assert progress.feed("Step 1/3 : FROM base\n ---> abc\n") == [
        "Step 1/3 : FROM base",
        " ---> abc",
    ]
    progress.feed("Step 2/3 : RUN apt-get ...\n")
    assert progress.percent == 1.0
    progress.feed(
        "0 upgraded, 4 newly installed, 0 to remove and 0 not upgraded.\nGet:1 http://m a\n"
    )
    progress.feed("Get:2 http://m b\nGet:3 htt")  # a line split over two chunks
    assert progress.fetched == 2
    progress.feed("p://m c\nGet:4 http://m d\nUnpacking a (1) ...\n")
    assert progress.note == "step 2/3, apt: 1/4 packages unpacked"
    assert progress.percent == round(100 * (1 + 98 * 5 / 12) / 100, 1)
    assert progress.last == "Unpacking a (1) ..."
    before = progress.percent
    progress.feed("1 upgraded, 0 newly installed\n")  # a second apt run starts its own count
    assert progress.percent == before  # never a step back
    progress.feed("Step 3/3 : USER 1\n")
    assert progress.percent == 99.0


def test_build_progress_counts_the_apis_extra_label_steps() -> None:
    progress = BuildProgress(weights=[1, 1])
    progress.feed("Step 4/4 : LABEL a=b\n")
    assert progress.percent == 75.0


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (["E: Failed to fetch http://127.0.0.1:9/debian/dists/bookworm/InRelease  Could not "
          "connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)"],
         "unreachable"),
        (["Temporary failure resolving 'deb.debian.org'"], "unreachable"),
        (["dpkg: error processing archive x: No space left on device"], "disk_full"),
        (["E: Unable to locate package texlive-nope"], "other"),
    ],
)  # fmt: skip
def test_build_failures_by_meaning(tail: list[str], reason: str) -> None:
    plan = texlive_build.plan("x:1", BuildOptions(), {"DEBIAN_MIRROR": "http://m/debian"}, [])
    error = texlive.build_failure("The command returned a non-zero code: 100", tail, "x:1", plan)
    assert error.reason.value == reason
    assert not error.reason.permanent
    if reason == "unreachable":
        assert "cannot reach the Debian mirror http://m/debian" in error.message
        assert "DEBIAN_MIRROR" in error.message
    if reason == "disk_full":
        assert "data root" in error.message


def test_a_missing_base_is_permanent() -> None:
    assert Reason.NO_BASE.permanent


def test_board_logs_build_steps_at_a_low_rate(tmp_path: Path) -> None:
    lines: list[str] = []
    board = Board(tmp_path / "s.json", ["x:1"], lines.append)
    board.steps("x:1", 10.0, "step 8/13", "Get:1 http://m a")
    board.steps("x:1", 11.0, "step 8/13", "Get:2 http://m b")  # within LOG_INTERVAL
    assert lines == ["texlive: building x:1: 10% (step 8/13): Get:1 http://m a"]
    board.flush(force=True)
    entry = json.loads((tmp_path / "s.json").read_text())["images"][0]
    assert (entry["percent"], entry["note"], entry["bytes_total"]) == (11.0, "step 8/13", 0)


def test_board_without_a_file_or_progress_lines() -> None:
    lines: list[str] = []
    board = Board(None, ["x:1"], lines.append, progress_lines=False)
    board.change("x:1", State.INSTALLING, source="pull")
    board.progress("x:1", 10, 100, 5.0)
    board.steps("x:1", 10.0, "step 1/2", "line")
    board.flush(force=True)
    assert lines == ["texlive: x:1: installing (pull)"]
    assert board.entries()[0]["bytes_done"] == 10
