"""The `latexmk` shim for real: spawned as Community Edition's compile service spawns latexmk
(by name, cwd the compile dir, its own process group), against the TeX Live image in a
private dockerd. Exit statuses pass through; SIGTERM to the group, the caller's SIGKILL and the
shim's own SIGKILL all end the container; without a sandbox it never runs latexmk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from init.config import DEFAULT_COMPILE_UIDS
from tests.integration import texlive_engine
from tests.integration.conftest import wait_for, write_script
from tests.integration.texlive_engine import LIMITS, Compiles

# The module's engine with the TeX Live image, and its compiles root (shared fixtures).
texlive = texlive_engine.texlive
compiles = texlive_engine.compiles

pytestmark = pytest.mark.root
TIMEOUT = float(LIMITS["OVERLEAF_INIT_COMPILE_TIMEOUT"])
IDLE = float(LIMITS["OVERLEAF_INIT_COMPILE_IDLE"])
HELLO = "\\documentclass{article}\n\\begin{document}\nHello, shim.\n\\end{document}\n"
LOOP = HELLO.replace("Hello", r"\def\x{\x}\x")


def clsi_command(directory: Path, engine: str = "-pdf") -> list[str]:
    """What services/clsi LatexRunner builds (with $COMPILE_DIR replaced)."""
    return ["latexmk", "-cd", "-jobname=output", f"-auxdir={directory}", f"-outdir={directory}",
            "-synctex=1", "-interaction=batchmode", "-time", "-halt-on-error", engine,
            f"{directory}/main.tex"]  # fmt: skip


def assert_never_ran(project: Path, why: str) -> None:
    """No TeX ran: no PDF, and the log holds only the shim's note for the user."""
    assert not (project / "output.pdf").exists()
    log = (project / "output.log").read_text()
    assert log.startswith(f"\n! sharelatex-init: the compile did not run: {why}.\n"), log
    assert "This is" not in log  # no TeX banner


@pytest.fixture
def shim_dir(tmp_path: Path) -> Path:
    """The wrapper scripts PID 1 writes, first on PATH."""
    directory = tmp_path / "shim"
    for command in ("latexmk", "pdflatex", "lualatex"):
        write_script(
            directory / command, f'exec {sys.executable} -m init.compiles.shim {command} "$@"\n'
        )
    return directory


def spawn(
    compiles: Compiles, shim_dir: Path, argv: list[str], cwd: Path, **env: str
) -> subprocess.Popen[bytes]:
    environment = compiles.env(**env)
    environment["PATH"] = f"{shim_dir}:{environment['PATH']}"
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return subprocess.Popen(
        argv, cwd=cwd, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,  # detached, as LocalCommandRunner
    )  # fmt: skip


def test_latexmk_runs_sandboxed_and_passes_its_status(compiles: Compiles, shim_dir: Path) -> None:
    project = compiles.project("shim-ok", {"main.tex": HELLO})
    proc = spawn(compiles, shim_dir, clsi_command(project), project)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert (project / "output.pdf").read_bytes().startswith(b"%PDF")
    # Written by the project's own uid, in the dir's group (the services' user can read it).
    made = (project / "output.pdf").stat()
    assert (made.st_uid, made.st_gid) == (DEFAULT_COMPILE_UIDS.uid_for("shim-ok"), 33)
    assert b"Latexmk" in out + err  # latexmk's own output comes through


def test_a_latex_error_passes_latexmks_status_and_pdflatexs_1(
    compiles: Compiles, shim_dir: Path
) -> None:
    project = compiles.project("shim-error", {"main.tex": HELLO.replace("Hello", r"\oops")})
    proc = spawn(compiles, shim_dir, clsi_command(project), project)
    proc.communicate(timeout=120)
    assert proc.returncode == 12  # latexmk: errors in the run
    proc = spawn(compiles, shim_dir, ["pdflatex", "-interaction=batchmode", "main.tex"], project)
    proc.communicate(timeout=120)
    assert proc.returncode == 1  # the status the compile service treats specially


def test_sigterm_to_the_group_removes_the_container(compiles: Compiles, shim_dir: Path) -> None:
    project = compiles.project("shim-term", {"main.tex": LOOP})
    proc = spawn(compiles, shim_dir, clsi_command(project), project)
    wait_for(lambda: compiles.containers() != "", 60, "the compile's container")
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)  # what LocalCommandRunner.kill does
    proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGTERM  # the service checks for SIGTERM
    wait_for(lambda: compiles.containers() == "", 5, "the container to be removed")


def test_a_sigkilled_caller_ends_the_compile(compiles: Compiles, shim_dir: Path) -> None:
    project = compiles.project("shim-orphan", {"main.tex": LOOP})
    caller = spawn(
        compiles, shim_dir, ["sh", "-c", " ".join(clsi_command(project)) + "; echo done"], project
    )
    wait_for(lambda: compiles.containers() != "", 60, "the compile's container")
    time.sleep(1)
    began = time.monotonic()
    caller.kill()  # SIGKILL to the caller only: the shim gets SIGTERM by PR_SET_PDEATHSIG
    caller.communicate(timeout=20)
    wait_for(lambda: compiles.containers() == "", 10, "the container to be removed")
    assert time.monotonic() - began < 10


def test_a_sigkilled_shim_leaves_nothing_running_past_its_limits(
    compiles: Compiles, shim_dir: Path
) -> None:
    project = compiles.project("shim-killed", {"main.tex": LOOP})
    proc = spawn(compiles, shim_dir, clsi_command(project), project)
    wait_for(lambda: compiles.containers() != "", 60, "the compile's container")
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)  # nothing of ours can clean up now
    proc.communicate(timeout=20)
    # The compile dies at the timeout inside the container; the container ends after idling.
    wait_for(lambda: compiles.containers() == "", TIMEOUT + IDLE + 15, "the container to end")
    assert time.monotonic() - began <= TIMEOUT + IDLE + 15


def test_without_the_image_latexmk_is_never_run(compiles: Compiles, shim_dir: Path) -> None:
    project = compiles.project("shim-notready", {"main.tex": HELLO})
    missing = "sharelatex-init/texlive:missing"
    proc = spawn(compiles, shim_dir, clsi_command(project), project,
                 TEX_LIVE_DOCKER_IMAGE=missing)  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75
    assert f"TeX Live image {missing}" in err.decode() and "not run" in err.decode()
    assert_never_ran(project, "the TeX Live image is not ready yet")


def test_without_an_engine_latexmk_is_never_run(
    compiles: Compiles, shim_dir: Path, tmp_path: Path
) -> None:
    project = compiles.project("shim-noengine", {"main.tex": HELLO})
    proc = spawn(compiles, shim_dir, clsi_command(project), project,
                 DOCKER_HOST=f"unix://{tmp_path}/none.sock")  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75
    assert "never outside the sandbox" in err.decode()
    assert_never_ran(project, "its sandbox cannot be reached")
