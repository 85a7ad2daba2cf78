"""The compile runner's pure parts: settings, ids, paths, the profile, how a compile ended."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from init.compiles.contract import ENGINES, Limit, Status
from init.compiles.outcome import Ran, classify, first_errors, not_ready_message, read_text_nofollow
from init.compiles.paths import CompileDir, check_project_id, compile_dir, host_path
from init.compiles.profile import (
    Job,
    compile_environment,
    container_name,
    container_spec,
    exec_command,
    latexmk_command,
    load_seccomp,
    watchdog_command,
)
from init.compiles.settings import (
    Limits,
    Places,
    check_image,
    limits_from_env,
    parse_size,
    settings_from_env,
)
from init.errors import ConfigError
from tests.integration.conftest import require

OWNER = 33


def project_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(directory, OWNER, OWNER)
    return directory


@pytest.fixture
def places(tmp_path: Path) -> Places:
    return Places(compiles=tmp_path / "compiles", output=tmp_path / "output")


# -- settings -------------------------------------------------------------------------------


def test_limits_default_and_from_the_environment() -> None:
    assert limits_from_env({}) == Limits()
    limits = limits_from_env(
        {
            "OVERLEAF_INIT_COMPILE_MEMORY": "512m",
            "OVERLEAF_INIT_COMPILE_PIDS": "100",
            "OVERLEAF_INIT_COMPILE_CPUS": "1.5",
            "OVERLEAF_INIT_COMPILE_TIMEOUT": "30",
            "OVERLEAF_INIT_COMPILE_TMPFS": "1GiB",
            "OVERLEAF_INIT_COMPILE_OUTPUT_SIZE": "100m",
            "OVERLEAF_INIT_COMPILE_CONCURRENCY": "3",
            "OVERLEAF_INIT_COMPILE_IDLE": "0",
            "OVERLEAF_INIT_COMPILE_SHELL_ESCAPE": "restricted",
        }
    )
    assert limits == Limits(
        memory=512 << 20, pids=100, cpus=1.5, timeout=30, tmpfs=1 << 30, output=100 << 20,
        concurrency=3, idle=0, shell_escape="restricted",
    )  # fmt: skip
    assert limits.slots == 3


def test_every_bad_limit_is_named_with_its_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        limits_from_env(
            {
                "OVERLEAF_INIT_COMPILE_MEMORY": "lots",
                "OVERLEAF_INIT_COMPILE_PIDS": "3",
                "OVERLEAF_INIT_COMPILE_SHELL_ESCAPE": "on",
            }
        )
    problems = caught.value.problems
    assert problems == [
        "OVERLEAF_INIT_COMPILE_MEMORY='lots' is not valid; write e.g. 1g (at least 64m)",
        "OVERLEAF_INIT_COMPILE_PIDS='3' is not valid; write e.g. 256 (at least 16)",
        "OVERLEAF_INIT_COMPILE_SHELL_ESCAPE='on' is not valid; use off or restricted",
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("1k", 1024), ("512m", 512 << 20), ("1.5g", 3 << 29), ("2GiB", 2 << 30)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_settings_take_the_product_variables_and_our_own(tmp_path: Path) -> None:
    settings = settings_from_env(
        {
            "TEX_LIVE_DOCKER_IMAGE": "texlive/texlive:2024",
            "ALL_TEX_LIVE_DOCKER_IMAGES": "texlive/texlive:2024,texlive/texlive:2023",
            "SANDBOXED_COMPILES_HOST_DIR_COMPILES": "/srv/data/compiles",
            "OVERLEAF_INIT_COMPILES_DIR": "/data/compiles",
            "DOCKER_HOST": "unix:///tmp/d.sock",
        }
    )
    assert settings.image == "texlive/texlive:2024"
    assert settings.images == ("texlive/texlive:2024", "texlive/texlive:2023")
    assert settings.places.compiles == Path("/data/compiles")
    assert settings.places.host_compiles == Path("/srv/data/compiles")
    assert settings.engine_url == "unix:///tmp/d.sock"
    assert check_image("texlive/texlive:2023", settings) == "texlive/texlive:2023"
    assert check_image(None, settings) == "texlive/texlive:2024"
    with pytest.raises(ConfigError, match="not an allowed TeX Live image"):
        check_image("evil:latest", settings)


def test_a_relative_compiles_dir_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="OVERLEAF_INIT_COMPILES_DIR='data'"):
        settings_from_env({"OVERLEAF_INIT_COMPILES_DIR": "data"})


# -- ids and paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good", ["p1", "5f1e2a3b4c5d6e7f8a9b0c1d-5f1e2a3b4c5d6e7f8a9b0c1e", "a_b-C", "x" * 64]
)
def test_good_project_ids(good: str) -> None:
    assert check_project_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "..", ".", "../x", "a/b", "a..b", ".hidden", "-flag", "x" * 65, "a b", "é"]
)
def test_bad_project_ids(bad: str) -> None:
    with pytest.raises(ConfigError, match="project id"):
        check_project_id(bad)


def test_a_dir_under_the_compiles_root_maps_to_the_sibling_host_dir(places: Places) -> None:
    sibling = Places(places.compiles, places.output, Path("/host/compiles"), Path("/host/out"))
    path = places.compiles / "p1"
    assert host_path(path, sibling) == Path("/host/compiles/p1")
    assert host_path(places.output / "p1" / "x", sibling) == Path("/host/out/p1/x")
    assert host_path(path, places) == path  # no host dir: dind or by hand


def test_a_dir_outside_the_root_is_kept_by_hand_and_refused_with_siblings(
    places: Places,
) -> None:
    assert host_path(Path("/home/me/paper"), places) == Path("/home/me/paper")
    sibling = Places(places.compiles, places.output, Path("/host/compiles"))
    with pytest.raises(ConfigError, match="outside the compiles dir"):
        host_path(Path("/home/me/paper"), sibling)


def test_compile_dir_resolves_and_takes_the_owner(places: Places) -> None:
    require(os.geteuid() == 0, "chown to a non-root owner needs root")
    directory = project_dir(places.compiles, "p1")
    found = compile_dir(directory, places)
    assert (found.path, found.source, found.project) == (directory, directory, "p1")
    assert (found.uid, found.gid) == (OWNER, OWNER)
    assert compile_dir(directory, places, "other").project == "other"


def test_a_link_out_of_the_compiles_root_is_refused(places: Places, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "chown to a non-root owner needs root")
    project_dir(places.compiles, "p1")
    outside = project_dir(tmp_path, "elsewhere")
    (places.compiles / "sneaky").symlink_to(outside)
    with pytest.raises(ConfigError, match="leads out of"):
        compile_dir(places.compiles / "sneaky", places)
    with pytest.raises(ConfigError, match="leads out of"):
        compile_dir(places.compiles / "p1" / ".." / "sneaky", places)


def test_a_root_owned_dir_is_refused(places: Places) -> None:
    directory = places.compiles / "p1"
    directory.mkdir(parents=True)
    require(os.geteuid() == 0, "only root makes root-owned dirs")
    with pytest.raises(ConfigError, match="owned by root"):
        compile_dir(directory, places)


def test_a_missing_dir_is_named(places: Places) -> None:
    with pytest.raises(ConfigError, match="give an existing dir"):
        compile_dir(places.compiles / "nope", places)


# -- the command and the profile ------------------------------------------------------------


def job(tmp_path: Path, **limits: object) -> tuple[Job, Limits]:
    directory = CompileDir(tmp_path / "c" / "p1", Path("/host/c/p1"), "p1", OWNER, OWNER)
    command = latexmk_command(directory.path, "main.tex", "pdflatex")
    return Job(directory, command, "img:1", {}, compile_id="c1"), Limits(**limits)  # type: ignore[arg-type]


def test_the_command_is_community_editions(tmp_path: Path) -> None:
    d = tmp_path / "p"
    assert latexmk_command(d, "main.tex", "lualatex") == (
        "latexmk", "-cd", "-jobname=output", f"-auxdir={d}", f"-outdir={d}", "-synctex=1",
        "-interaction=batchmode", "-time", "-halt-on-error", "-lualatex", f"{d}/main.tex",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--main"):
        latexmk_command(d, "../x.tex", "pdflatex")
    with pytest.raises(ConfigError, match="--engine"):
        latexmk_command(d, "main.tex", "context")


def test_the_compile_is_killed_inside_the_container_at_the_timeout(tmp_path: Path) -> None:
    the_job, limits = job(tmp_path, timeout=30.0)
    shell, flag, script, where, uid, seconds, *command = exec_command(the_job, limits)
    assert (shell, flag, seconds, command) == ("sh", "-c", "30", list(the_job.command))
    assert (where, uid) == (str(the_job.directory.path), str(the_job.directory.compile_uid))
    assert 'timeout -s KILL "$@"; status=$?\nkill -KILL -1' in script  # then its leftovers


def test_the_profile_is_stricter_than_overleafs_on_every_point(tmp_path: Path) -> None:
    the_job, limits = job(tmp_path, memory=1 << 30, pids=128, cpus=1.0, timeout=60.0)
    spec = container_spec(the_job, limits, seccomp='{"x":1}', now=1000.0)
    host = spec.host_config
    assert host["NetworkMode"] == "none"
    assert spec.create_body()["NetworkDisabled"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges", 'seccomp={"x":1}']
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {
        "/tmp": f"rw,nosuid,nodev,noexec,size={256 << 20},nr_inodes=16384,mode=1777"
    }
    assert host["Memory"] == host["MemorySwap"] == 1 << 30
    assert host["PidsLimit"] == 128
    assert host["NanoCpus"] == 1_000_000_000
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert ulimits == {"fsize": (512 << 20, 512 << 20), "nofile": (1024, 1024),
                       "cpu": (70, 75), "core": (0, 0)}  # fmt: skip
    assert host["LogConfig"] == {"Type": "none", "Config": {}}
    assert host["Privileged"] is False and host["AutoRemove"] is True
    assert host["Mounts"] == [
        {"Type": "bind", "Source": "/host/c/p1", "Target": str(tmp_path / "c" / "p1"),
         "ReadOnly": False, "BindOptions": {"Propagation": "rprivate"}}
    ]  # fmt: skip
    assert spec.user == f"{the_job.directory.compile_uid}:33"  # its own uid, the dir's group
    assert spec.labels == {
        "sharelatex-init.compile": "1",
        "sharelatex-init.project": "p1",
        "sharelatex-init.compile-id": "c1",
        "sharelatex-init.expires": f"{1000 + limits.deadlines.lifetime:.0f}",
    }
    assert spec.environment["shell_escape"] == "f"
    assert spec.environment["HOME"] == "/tmp"
    assert spec.command[:2] == ["sh", "-c"]


def test_without_seccomp_the_engines_default_applies(tmp_path: Path) -> None:
    the_job, limits = job(tmp_path)
    spec = container_spec(the_job, limits, seccomp=None)
    assert spec.host_config["SecurityOpt"] == ["no-new-privileges"]


def test_a_changed_limit_or_image_gets_another_container(tmp_path: Path) -> None:
    the_job, limits = job(tmp_path)
    name = container_name(the_job.directory, "img:1", limits)
    assert name.startswith("sharelatex-init-compile-p1-")
    assert name == container_name(the_job.directory, "img:1", Limits())
    assert name != container_name(the_job.directory, "img:2", limits)
    assert name != container_name(the_job.directory, "img:1", Limits(pids=99))


def test_restricted_shell_escape_is_an_opt_in() -> None:
    assert compile_environment(Limits(), {})["shell_escape"] == "f"
    assert compile_environment(Limits(shell_escape="restricted"), {})["shell_escape"] == "p"
    env = compile_environment(Limits(), {"SOURCE_DATE_EPOCH": "1", "AWS_SECRET": "x"})
    assert env["SOURCE_DATE_EPOCH"] == "1" and "AWS_SECRET" not in env


def test_our_seccomp_profile_allows_no_socket_call() -> None:
    warnings: list[str] = []
    text = load_seccomp(warnings.append)
    assert text is not None and warnings == []
    profile = json.loads(text)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }
    refused = """socket socketpair connect bind listen accept accept4 sendto recvfrom sendmsg
        recvmsg setsockopt ptrace mount unshare setns bpf keyctl perf_event_open io_uring_setup"""
    for call in refused.split():
        assert call not in allowed, call
    for call in ("read", "write", "openat", "execve", "wait4", "getuid", "clone"):
        assert call in allowed, call


# -- how it ended ---------------------------------------------------------------------------

LOG = r"""This is pdfTeX, Version 3.141592653
(./main.tex
! Undefined control sequence.
l.3 \undefinedcommand
                      Hello
?
! Emergency stop.
"""


def test_first_errors_take_the_first_error_up_to_its_line() -> None:
    assert first_errors(LOG) == ("! Undefined control sequence.", r"l.3 \undefinedcommand")
    assert first_errors("./main.tex:3: Undefined control sequence.\nl.3 x\n") == (
        "./main.tex:3: Undefined control sequence.",
        "l.3 x",
    )
    assert first_errors("no errors here\n") == ()


def compiled(tmp_path: Path, files: dict[str, bytes]) -> Job:
    directory = tmp_path / "p1"
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    the_dir = CompileDir(directory, directory, "p1", OWNER, OWNER)
    return Job(the_dir, ("latexmk",), "img:1", {})


def test_a_pdf_is_ok(tmp_path: Path) -> None:
    the_job = compiled(tmp_path, {"output.pdf": b"%PDF-1.5", "output.log": b"fine\n"})
    outcome = classify(Ran(0, 1.0), the_job, Limits())
    assert outcome.status is Status.OK and outcome.pdf == the_job.directory.path / "output.pdf"
    assert outcome.document()["status"] == "ok"


def test_a_latex_error_is_1_with_its_lines(tmp_path: Path) -> None:
    the_job = compiled(tmp_path, {"output.log": LOG.encode()})
    outcome = classify(Ran(12, 1.0), the_job, Limits())
    assert outcome.status is Status.LATEX_ERROR
    assert outcome.reason == "LaTeX error: Undefined control sequence."
    assert outcome.errors[0] == "! Undefined control sequence."


@pytest.mark.parametrize(
    ("ran", "files", "limit"),
    [
        (Ran(None, 60.0, timed_out=True), {}, Limit.TIMEOUT),
        (Ran(12, 1.0, oom_killed=True), {}, Limit.MEMORY),
        (Ran(12, 1.0), {"big.txt": b"x" * (1 << 20)}, Limit.OUTPUT_SIZE),
        (Ran(153, 1.0), {}, Limit.OUTPUT_SIZE),
        (Ran(255, 1.0, output="fork: Resource temporarily unavailable\n"), {}, Limit.PROCESSES),
        (Ran(None, 1.0, stopped_by=15), {}, Limit.STOPPED),
    ],
)
def test_limits_are_named(tmp_path: Path, ran: Ran, files: dict[str, bytes], limit: Limit) -> None:
    the_job = compiled(tmp_path, files)
    outcome = classify(ran, the_job, Limits(output=1 << 20))
    assert outcome.status is Status.LIMIT
    assert outcome.limit is limit
    assert outcome.reason.startswith(limit.value)


def test_a_linked_pdf_or_log_is_never_taken(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("HOST-SECRET")
    the_job = compiled(tmp_path, {})
    (the_job.directory.path / "output.pdf").symlink_to(secret)
    (the_job.directory.path / "output.log").symlink_to(secret)
    outcome = classify(Ran(0, 1.0), the_job, Limits())
    assert outcome.status is Status.LATEX_ERROR
    assert outcome.pdf is None and outcome.log is None
    assert read_text_nofollow(the_job.directory.path / "output.log") == ""


def test_not_ready_uses_the_installers_status(tmp_path: Path) -> None:
    status_file = tmp_path / "status.json"
    (tmp_path / "texlive.json").write_text(
        json.dumps(
            {
                "ready": False,
                "default": "img:1",
                "images": [
                    {
                        "image": "img:1",
                        "state": "installing",
                        "bytes_done": 5,
                        "bytes_total": 10,
                        "eta_seconds": 40,
                    }
                ],
            }
        )
    )
    assert not_ready_message("img:1", status_file) == (
        "TeX Live image img:1 is still installing: 50% (5 of 10 B), about 40 s left"
    )
    assert "is not in the engine" in not_ready_message("img:2", status_file)


# -- the compile command's contract ---------------------------------------------------------


def test_the_commands_engines_are_the_runners() -> None:
    from init.compiles import command as compile_cmd

    assert tuple(ENGINES) == compile_cmd.ENGINES


def run_compile(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, object]]:
    import argparse

    from init.compiles import command as compile_cmd

    parser = argparse.ArgumentParser()
    compile_cmd.add_parser(parser.add_subparsers(dest="command"))
    code = compile_cmd.run(parser.parse_args(["compile", *argv, "--json"]), env)
    document: dict[str, object] = json.loads(capsys.readouterr().out)
    return code, document


def test_a_bad_project_id_is_78_with_one_json_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"OVERLEAF_INIT_COMPILES_DIR": str(tmp_path), "DOCKER_HOST": "unix:///nonexistent"}
    (tmp_path / "p1").mkdir()
    code, document = run_compile([str(tmp_path / "p1"), "--project", ".."], env, capsys)
    assert code == 78
    assert set(document) == {"status", "exit_status", "reason", "limit", "pdf", "log",
                             "seconds", "errors", "project", "compile_id", "written"}  # fmt: skip
    assert document["status"] == "config" and document["exit_status"] == 78
    assert "project id '..'" in str(document["reason"])


def test_a_bad_limit_is_78_naming_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"OVERLEAF_INIT_COMPILE_TIMEOUT": "soon"}
    code, document = run_compile([str(tmp_path)], env, capsys)
    assert code == 78
    assert str(document["reason"]).startswith("OVERLEAF_INIT_COMPILE_TIMEOUT='soon'")


def test_the_containers_pid1_ends_at_once_on_sigterm(tmp_path: Path) -> None:
    """docker stop, or the inner dockerd stopping with the site, must not wait out a sleep."""
    import signal
    import subprocess
    import time

    _, limits = job(tmp_path, timeout=60.0)
    watchdog = subprocess.Popen(watchdog_command(limits))
    time.sleep(0.3)
    began = time.monotonic()
    watchdog.send_signal(signal.SIGTERM)
    assert watchdog.wait(5) == 0
    assert time.monotonic() - began < 0.5
