"""`python -m init` is the same as the `sharelatex-init` console script."""

# First of all, before the imports below: a stop signal during the start must wait for the
# loop, not be dropped by the kernel's rule for PID 1 (init.core.signals).
from init.core import signals

signals.hold()

from init.cli import main  # noqa: E402 - after the hold, on purpose

raise SystemExit(main())
