"""Stdlib modules that the stdlib imports for one rarely used function: loaded at that first use.

PID 1 keeps everything it imports for its whole life (CPython does not give freed module memory
back), and two of its imports pull in much more than they use:

- dataclasses imports inspect (and with it ast, dis, tokenize: ~1.1 MiB resident) only to
  write the __doc__ of a dataclass that has none. Every dataclass on PID 1's path has one.
- pathlib imports urllib.parse, which imports ipaddress (~0.4 MiB: its tables and caches) only
  to check a bracketed host in `urlsplit`. PID 1 splits no URLs.

Until one of its attributes is read, a stand-in holds the module's place in sys.modules; the
first read imports the real module, so code that does use it works unchanged (only slower once).
The goal this serves: PID 1 at most 12 MiB at idle with five services (scripts/bench/idle-rss).
"""

from __future__ import annotations

import sys
import types

DEFERRED = ("inspect", "ipaddress")


class _StandIn(types.ModuleType):
    """In sys.modules in place of a module not imported yet; the first attribute read imports it."""

    def __getattr__(self, attr: str) -> object:
        # Only called for attributes the stand-in lacks: __name__, __spec__ and the other
        # attributes the import system reads are set by ModuleType, so `import inspect` (which
        # finds the stand-in) does not load it; `inspect.signature` does.
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        module = __import__(self.__name__)
        return getattr(module, attr)


def defer_unused_stdlib() -> None:
    """Put the stand-ins in place; call it before anything imports dataclasses or pathlib."""
    for name in DEFERRED:
        if name not in sys.modules:
            sys.modules[name] = _StandIn(name)
