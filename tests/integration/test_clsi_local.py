"""The shim driven exactly as Community Edition's compile service drives its commands: through
tests/fixtures/overleaf/local_command_runner.py (LocalCommandRunner's behaviour: by name from
PATH, detached, stderr ignored, no timeout, SIGTERM to the group to stop), with the PATH and
scripts init.compiles.service_env gives the services, against the TeX Live image in a private
dockerd. Each test checks what the service would report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from init import config
from init.compiles import service_env
from init.config import DEFAULT_COMPILE_UIDS
from tests.fixtures.overleaf.local_command_runner import (
    LocalCommandRunner,
    Result,
    Running,
    compile_status,
    latexmk_argv,
    log_errors,
    synctex_edit_argv,
    synctex_view_argv,
    texcount_argv,
    wordcount,
)
from tests.integration import texlive_engine
from tests.integration.conftest import wait_for
from tests.integration.texlive_engine import WWW_DATA, Compiles, chown_tree

texlive = texlive_engine.texlive
compiles = texlive_engine.compiles

pytestmark = pytest.mark.root
HELLO = (
    "\\documentclass{article}\n\\begin{document}\n\\section{Greeting}\n"
    "Hello from the sandbox, six words.\n\\end{document}\n"
)
LOOP = HELLO.replace("Hello", r"\def\x{\x}\x")
# Ships page after page: pdfTeX writes them to output.pdf as it goes.
PAGES = HELLO.replace("Hello", r"\loop\null\newpage\iftrue\repeat")
SITE_TIMEOUT = 5  # the site's COMPILE_TIMEOUT in the timeout tests


def service(compiles: Compiles, shim_dir: Path, **extra: str) -> LocalCommandRunner:
    """The compile service's own environment, as the init gives it to the services: the shim
    scripts written and their dir first on PATH."""
    environ = compiles.env(OVERLEAF_INIT_OUTPUT_DIR=str(compiles.root.parent / "output"), **extra)
    for name, value in list(extra.items()):
        if value == "":
            del environ[name]  # unset, not empty
    service_env.write_shims(shim_dir, sys.executable)
    settings = config.load({**environ, "SANDBOXED_COMPILES": "true"})
    environ.update(service_env.environment(settings, environ, "shim", shim_dir))
    return LocalCommandRunner(environ)


def finish(runner: LocalCommandRunner, started: Running | Result, timeout: float = 120) -> Result:
    assert isinstance(started, Running), started
    return runner.result(started, timeout)


def edit_input(stdout: str) -> Path | None:
    """The source file of `synctex edit`'s answer (synctex writes it as recorded: DIR/./FILE;
    the service's SynctexOutputParser takes it relative to the base dir)."""
    for line in stdout.splitlines():
        if line.startswith("Input:"):
            return Path(os.path.normpath(line.removeprefix("Input:")))
    return None


@pytest.fixture
def clsi(compiles: Compiles, tmp_path: Path) -> LocalCommandRunner:
    return service(compiles, tmp_path / "shim")


@pytest.fixture
def compiled(compiles: Compiles, clsi: LocalCommandRunner) -> Path:
    """A project compiled as the service compiles it (the PDF and its synctex beside it)."""
    project = compiles.project("clsi-synctex", {"main.tex": HELLO})
    result = finish(clsi, clsi.run(latexmk_argv(), project, {"OVERLEAF_PROJECT_ID": "p"}))
    assert compile_status(result, project) == "success", result
    assert (project / "output.synctex.gz").is_file()
    return project


def test_latexmk_compiles_in_the_sandbox_and_the_service_sees_success(
    compiles: Compiles, clsi: LocalCommandRunner
) -> None:
    project = compiles.project("clsi-ok", {"main.tex": HELLO})
    result = finish(clsi, clsi.run(latexmk_argv(), project))
    assert result.error is None and result.exit_code == 0
    assert "Latexmk" in result.stdout or "Run number" in result.stdout
    assert compile_status(result, project) == "success"
    made = (project / "output.pdf").stat()  # written in the container, by the project's uid
    assert (made.st_uid, made.st_gid) == (DEFAULT_COMPILE_UIDS.uid_for("clsi-ok"), WWW_DATA)


def test_a_latex_error_is_latexmks_own_status(compiles: Compiles, clsi: LocalCommandRunner) -> None:
    project = compiles.project("clsi-error", {"main.tex": HELLO.replace("Hello", r"\oops")})
    result = finish(clsi, clsi.run(latexmk_argv(stop_on_first_error=True), project))
    assert result.error is None and result.exit_code == 12
    assert compile_status(result, project, stop_on_first_error=True) == "stopped-on-first-error"
    assert log_errors((project / "output.log").read_text())[0] == "Undefined control sequence."


def test_synctex_view_and_edit_in_the_compile_dir(compiled: Path, clsi: LocalCommandRunner) -> None:
    view = finish(clsi, clsi.run(synctex_view_argv(compiled, "main.tex", 4, 1), compiled))
    assert view.error is None and view.exit_code == 0, view
    assert "SyncTeX result begin" in view.stdout and "Page:1" in view.stdout
    edit = finish(clsi, clsi.run(synctex_edit_argv(compiled, 1, 150, 130), compiled))
    assert edit.error is None and edit.exit_code == 0, edit
    assert edit_input(edit.stdout) == compiled / "main.tex"


def test_synctex_from_the_builds_copy_under_the_output_dir(
    compiles: Compiles, compiled: Path, clsi: LocalCommandRunner
) -> None:
    """Compile group `synctex-output`: the service's cwd is the build's copy under the output
    dir; Community Edition's arguments still name the compile dir (synctexBaseDir)."""
    build = compiles.root.parent / "output" / compiled.name / "generated-files" / "18c0ffee-ab12"
    build.mkdir(parents=True)
    for name in ("output.pdf", "output.synctex.gz", "output.log"):
        shutil.copy(compiled / name, build / name)
    chown_tree(compiles.root.parent / "output", WWW_DATA)
    view = finish(clsi, clsi.run(synctex_view_argv(compiled, "main.tex", 4, 1), build))
    assert view.exit_code == 0 and "Page:1" in view.stdout, view
    # And arguments that name the copy itself: that dir, under the output root, is bound.
    view = finish(clsi, clsi.run(synctex_view_argv(build, "main.tex", 4, 1), build))
    assert view.exit_code == 0 and "SyncTeX result begin" in view.stdout, view
    edit = finish(clsi, clsi.run(synctex_edit_argv(build, 1, 150, 130), build))
    assert edit.exit_code == 0 and edit_input(edit.stdout) == compiled / "main.tex", edit


def test_texcount_counts_in_the_sandbox_and_sees_nothing_of_the_app(
    compiles: Compiles, clsi: LocalCommandRunner, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.tex"  # a file of the app's container, not of the project
    outside.write_text("one two three four five six seven eight nine ten\n")
    os.chmod(tmp_path, 0o755)
    body = HELLO.replace("\\end{document}", f"\\input{{{outside}}}\n\\end{{document}}")
    project = compiles.project("clsi-count", {"main.tex": body})
    result = finish(clsi, clsi.run(texcount_argv(), project))
    assert result.error is None and result.exit_code == 0, result
    counts = wordcount(result.stdout)
    assert counts["textWords"] == 6 and counts["headWords"] == 1, result.stdout
    assert "File not found or not readable" in result.stdout
    # Unsandboxed, texcount -inc would have counted the app's file too: 16 words.


def test_a_stop_mid_compile_is_terminated_and_leaves_no_container(
    compiles: Compiles, clsi: LocalCommandRunner
) -> None:
    project = compiles.project("clsi-stop", {"main.tex": LOOP})
    started = clsi.run(latexmk_argv(), project)
    assert isinstance(started, Running)
    wait_for(lambda: compiles.containers() != "", 60, "the compile's container")
    time.sleep(1)
    clsi.kill(started.pid)  # the service's stopCompile
    result = clsi.result(started, 20)
    assert result.terminated and result.signal == "SIGTERM"
    assert compile_status(result, project) == "terminated"
    wait_for(lambda: compiles.containers() == "", 10, "the container to be removed")


def test_the_sites_compile_timeout_stops_a_loop_and_the_log_says_why(
    compiles: Compiles, tmp_path: Path
) -> None:
    clsi = service(
        compiles, tmp_path / "shim",
        COMPILE_TIMEOUT=str(SITE_TIMEOUT), OVERLEAF_INIT_COMPILE_TIMEOUT="",
    )  # fmt: skip
    project = compiles.project("clsi-timeout", {"main.tex": LOOP})
    began = time.monotonic()
    result = finish(clsi, clsi.run(latexmk_argv(), project), 60)
    took = time.monotonic() - began
    assert SITE_TIMEOUT <= took < SITE_TIMEOUT + 15, took
    # Not `exited` (a 500), not a silent success: a failure, with the reason in the log.
    assert result.error is None and result.exit_code not in (0, 1, None), result
    assert compile_status(result, project) == "failure"
    log = (project / "output.log").read_text()
    errors = log_errors(log)
    assert errors[-1] == (
        f"sharelatex-init: the compile was stopped after {SITE_TIMEOUT} s "
        "(the site's compile time limit)."
    ), log[-600:]


def test_a_half_written_pdf_of_a_stopped_compile_never_reads_as_success(
    compiles: Compiles, tmp_path: Path
) -> None:
    clsi = service(
        compiles, tmp_path / "shim",
        COMPILE_TIMEOUT=str(SITE_TIMEOUT), OVERLEAF_INIT_COMPILE_TIMEOUT="",
    )  # fmt: skip
    project = compiles.project("clsi-pages", {"main.tex": PAGES})
    result = finish(clsi, clsi.run(latexmk_argv(), project), 60)
    assert result.error is None and result.exit_code not in (0, 1, None), result
    assert not (project / "output.pdf").exists()
    assert compile_status(result, project) == "failure"
    # The time limit, or the output size limit (8 MiB in these tests) if that came first.
    assert log_errors((project / "output.log").read_text())[-1].startswith(
        "sharelatex-init: the compile was stopped"
    )


def test_a_bad_site_timeout_is_refused_in_one_line(compiles: Compiles, tmp_path: Path) -> None:
    """The site's COMPILE_TIMEOUT is read once, by the compile broker as it starts (PID 1 runs
    it with the site's environment): a bad value stops it there, exit 78 and one line naming
    the variable, the value and the fix (PID 1's log shows it at each restart); its socket is
    never made, so no compile runs at all (the shim's clients get 69, never latexmk
    unsandboxed: test_broker_service)."""
    env = compiles.site_env(COMPILE_TIMEOUT="3m")
    del env[config.COMPILE_TIMEOUT]  # unset: the site's own value is the one read
    socket = tmp_path / "broker.sock"
    done = subprocess.run(
        [sys.executable, "-m", "init.broker.service"],
        env={**env, config.COMPILE_BROKER_SOCKET: str(socket),
             "PYTHONPATH": str(texlive_engine.REPO)},
        capture_output=True, text=True, timeout=60, cwd=texlive_engine.REPO,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert done.stderr.count("\n") == 1 and "COMPILE_TIMEOUT='3m' is not valid" in done.stderr
    assert "write whole seconds, e.g. 180" in done.stderr
    assert not socket.exists()
