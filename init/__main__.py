"""`python -m init` is the same as the `sharelatex-init` console script."""

from init.cli import main

raise SystemExit(main())
