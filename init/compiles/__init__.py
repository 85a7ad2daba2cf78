"""Compiles: every LaTeX compile in its own locked-down container.

Owns: the compile runner's settings, paths, container profile, queue and outcome, the runner
itself, the thin clients (the `latexmk` shim on the services' PATH, `sharelatex-init compile`, the
HTTP compile service) and how the services' compiles are wired to the sandbox (`service_env`).

May import: init.engine (the engine boundary, the labels), init.core, init.config.
"""
