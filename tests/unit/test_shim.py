"""The shim's choices without an engine: which dir a command runs in, which log a stop is noted
in and how (never through a link), the commands it covers, what the init says of the rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from init.compiles import log_note
from init.compiles import service_env as compile_env
from init.compiles.contract import SHIMMED_COMMANDS, Limit
from init.compiles.paths import CompileDir
from init.compiles.settings import Limits
from init.compiles.shim import compile_log, synctex_pdf, work_dir

D = "/var/lib/overleaf/data/compiles/p1-u1"
LATEXMK = ["latexmk", "-cd", "-jobname=output", f"-auxdir={D}", f"-outdir={D}", "-synctex=1",
           "-interaction=batchmode", "-time", "-f", "-pdf", f"{D}/main.tex"]  # fmt: skip


def test_every_command_the_compile_service_runs_on_project_files_is_shimmed() -> None:
    assert {"latexmk", "synctex", "texcount", "pdflatex", "xelatex", "lualatex"} <= set(
        SHIMMED_COMMANDS
    )
    # Never by these names: they would shadow the conversions' and filestore's tools.
    assert not {"pandoc", "zip", "pdftocairo", "chktex"} & set(SHIMMED_COMMANDS)


def test_synctex_runs_where_the_pdf_it_names_is() -> None:
    view = ["synctex", "view", "-i", f"3:1:{D}/main.tex", "-o", f"{D}/output.pdf"]
    edit = ["synctex", "edit", "-o", f"1:72.5:100.25:{D}/output.pdf"]
    assert synctex_pdf(view) == synctex_pdf(edit) == f"{D}/output.pdf"
    build = Path("/var/lib/overleaf/data/output/p1-u1/generated-files/18c-ab")
    assert work_dir("synctex", view, build) == Path(D)  # the service's cwd is the build copy
    assert work_dir("synctex", edit, build) == Path(D)
    assert work_dir("synctex", ["synctex", "help"], build) == build
    assert work_dir("synctex", ["synctex", "view", "-o", "output.pdf"], build) == build
    assert work_dir("texcount", ["texcount", "-nocol", "-inc", f"{D}/main.tex"], build) == build


def test_the_log_is_latexmks_jobname_in_the_bound_dir(tmp_path: Path) -> None:
    directory = CompileDir(tmp_path, tmp_path, "p", 33, 33)
    argv = [a.replace(D, str(tmp_path)) for a in LATEXMK]
    assert compile_log("latexmk", argv, directory) == tmp_path / "output.log"
    assert compile_log("pdflatex", ["pdflatex", "-interaction=batchmode", "main.tex"],
                       directory) == tmp_path / "main.log"  # fmt: skip
    assert compile_log("pdflatex", ["pdflatex", "-jobname", "x", "main.tex"], directory) == (
        tmp_path / "x.log"
    )
    # Elsewhere than the bound dir, or a jobname that is a path: no note at all.
    assert compile_log("latexmk", ["latexmk", "-outdir=/tmp", "a.tex"], directory) is None
    assert compile_log("latexmk", ["latexmk", "-jobname=../x", "a.tex"], directory) is None
    assert compile_log("texcount", ["texcount", "main.tex"], directory) is None


def test_the_note_is_an_error_line_the_editor_shows() -> None:
    line, detail = log_note.stop_reason(Limit.TIMEOUT, Limits(timeout=180))
    note = log_note.render(line, detail).decode()
    assert note.startswith("\n! sharelatex-init: the compile was stopped after 180 s")
    lines = note.split("\n")
    assert lines[1].startswith("! ") and "(the site's compile time limit)" in lines[1]
    # The log parser joins a line of exactly 79 characters with the next: never one of ours.
    assert all(len(text) != 79 for text in lines)
    padded = log_note.render("x" * (79 - len(log_note.PREFIX))).decode().split("\n")[1]
    assert len(padded) == 80
    assert len(log_note.render("y" * 10_000)) == log_note.NOTE_CAP


@pytest.mark.parametrize("limit", [Limit.MEMORY, Limit.PROCESSES, Limit.OUTPUT_SIZE])
def test_each_limit_has_its_reason(limit: Limit) -> None:
    line, _ = log_note.stop_reason(limit, Limits())
    assert line.startswith("the compile was stopped: ")


def test_the_note_is_appended_to_the_log(tmp_path: Path) -> None:
    (tmp_path / "output.log").write_text("This is pdfTeX\n! Emergency stop")
    assert log_note.append(tmp_path, "output.log", b"\n! note\n")
    assert (tmp_path / "output.log").read_text() == "This is pdfTeX\n! Emergency stop\n! note\n"
    assert log_note.append(tmp_path, "new.log", b"\n! note\n")  # none yet: made
    assert (tmp_path / "new.log").read_text() == "\n! note\n"


def test_the_note_never_follows_a_link_nor_writes_a_non_regular_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("keep\n")
    project = tmp_path / "p"
    project.mkdir()
    (project / "output.log").symlink_to(secret)
    (project / "dangling.log").symlink_to(tmp_path / "nothing-here")
    os.mkfifo(project / "fifo.log")
    (project / "dir.log").mkdir()
    for name in ("output.log", "dangling.log", "fifo.log", "dir.log"):
        assert not log_note.append(project, name, b"\n! note\n"), name
    assert secret.read_text() == "keep\n"
    assert not (tmp_path / "nothing-here").exists()
    # The dir itself as a link: refused too.
    (tmp_path / "link").symlink_to(project)
    assert not log_note.append(tmp_path / "link", "x.log", b"! note\n")


def test_removing_the_pdf_removes_the_entry_never_a_links_target(tmp_path: Path) -> None:
    target = tmp_path / "target.pdf"
    target.write_bytes(b"%PDF")
    (tmp_path / "output.pdf").symlink_to(target)
    assert log_note.remove(tmp_path, "output.pdf")
    assert target.exists() and not (tmp_path / "output.pdf").is_symlink()
    assert not log_note.remove(tmp_path, "output.pdf")


def test_the_log_says_when_conversions_run_outside_the_sandbox() -> None:
    shim_dir = Path("/run/sharelatex-init/shim")
    plain = compile_env.describe_shim(shim_dir, ())
    assert plain.startswith("the sandboxing latexmk, ")
    assert plain.endswith("synctex and texcount in /run/sharelatex-init/shim")
    assert compile_env.unsandboxed_conversions({"ENABLE_PANDOC_CONVERSIONS": "1"}) == ()
    on = compile_env.unsandboxed_conversions(
        {"ENABLE_PANDOC_CONVERSIONS": "true", "ENABLE_PDF_CONVERSIONS": "true"}
    )
    assert on == ("pandoc", "zip", "pdftocairo")
    text = compile_env.describe_shim(shim_dir, on)
    assert "ENABLE_PANDOC_CONVERSIONS=true, ENABLE_PDF_CONVERSIONS=true" in text
    assert "pandoc, zip, pdftocairo OUTSIDE the sandbox" in text
