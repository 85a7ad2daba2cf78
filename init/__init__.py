"""sharelatex-init: PID 1 for ShareLaTeX / Overleaf containers with sandboxed compiles."""

__version__ = "0.1.0"
