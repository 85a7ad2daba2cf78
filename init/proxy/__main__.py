"""`python -m init.proxy --listen SOCK --engine RAW ...`: the engine policy proxy (PID 1 runs
it as one of its own services; see init/proxy/__init__.py)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from init.core.log import Log, level_from_env
from init.proxy.server import Server
from init.proxy.settings import NAME, parse_argv

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    config = parse_argv(sys.argv[1:] if argv is None else argv)
    log = Log(level=level_from_env(os.environ))
    server = Server(config, log)
    try:
        server.listen()
    except OSError as e:
        log.error(
            NAME, f"cannot listen on {config.listen}: {e.strerror or e}; is another proxy running?"
        )
        return 1
    shown = ", ".join(r.arg() for r in config.roots) or "none"
    images = ", ".join(config.images) or "none"
    log.info(
        NAME,
        f"listening on {config.listen} for {config.engine}; images {images}; binds under {shown}",
    )
    server.serve(STOP_SIGNALS)
    server.close()
    log.info(NAME, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
