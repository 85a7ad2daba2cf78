"""What callers of `sharelatex-init compile` rely on: its exit statuses and their words, the
limits it names, and the TeX engines it takes.

Defined here once for the command, the shim and the HTTP compile service. The CLI builds its
parser from this module, so it imports nothing but `enum`: no runner, no engine client.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """How a compile ended: the exit status of `sharelatex-init compile`, and its `--json`
    status word (the member's name in lower case)."""

    OK = 0  # the PDF is there
    LATEX_ERROR = 1  # a LaTeX error (the first error lines follow)
    LIMIT = 2  # a sandbox limit was hit (named by Limit)
    ENGINE = 69  # sysexits EX_UNAVAILABLE: the engine cannot be reached
    # sysexits EX_CANTCREAT: the disk of the compile (or output) dir is full, of space or of
    # inodes. Not a LIMIT: a limit is the document's doing and the caller shows it to its
    # author (the HTTP service answers 413); a full disk is the server's, for its operator to
    # fix, and the same compile works once there is room (the HTTP service answers 507).
    NO_SPACE = 73
    NOT_READY = 75  # sysexits EX_TEMPFAIL: the TeX Live image is not in the engine yet
    CONFIG = 78  # sysexits EX_CONFIG: a variable or option is wrong

    @property
    def word(self) -> str:
        """`ok`, `latex_error`, `limit`, `engine`, `no_space`, `not_ready`, `config`."""
        return self.name.lower()


class Limit(enum.Enum):
    """Which sandbox limit a compile hit: the `limit` of `--json`."""

    TIMEOUT = "timeout"
    MEMORY = "memory"
    PROCESSES = "processes"
    OUTPUT_SIZE = "output size"
    DISK = "disk"  # bytes or files written past the compile's budget (init.compiles.budget)
    STOPPED = "stopped"  # SIGTERM/SIGINT/SIGHUP to the runner


# Each engine and the latexmk flag that selects it (Community Edition's LatexRunner).
ENGINE_FLAGS = {"pdflatex": "-pdf", "xelatex": "-xelatex", "lualatex": "-lualatex", "latex": "-dvi"}
ENGINES = tuple(ENGINE_FLAGS)
DEFAULT_ENGINE = "pdflatex"
# What the shim runs in the sandbox, by the name it was called as: every command Community
# Edition's compile service runs on a project's files (services/clsi CompileManager: latexmk,
# `synctex view|edit`, `texcount`), and the engines. See init.compiles.shim for what it leaves.
SHIMMED_COMMANDS = ("latexmk", *ENGINES, "synctex", "texcount")
