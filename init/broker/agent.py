"""The compile agent's command: core perl (every TeX Live image has it, latexmk needs it),
its program passed as `perl -e` so nothing has to be copied into the image or bound from the
broker's filesystem (the same command serves a remote engine or a pod)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

AGENT_PROGRAM = Path(__file__).with_name("agent.pl")  # package data beside this module


@cache
def program() -> str:
    return AGENT_PROGRAM.read_text(encoding="utf-8")


def entrypoint() -> list[str]:
    """The container's Entrypoint (the image's own, if any, is replaced)."""
    return ["perl", "-e", program(), "--"]


def arguments(idle: float, lifetime: float) -> list[str]:
    """The container's Cmd: the agent ends after `idle` seconds without a request, and at
    `lifetime` whatever happens."""
    return [f"{max(idle, 1):g}", f"{max(lifetime, 1):g}"]
