"""Compiles: every LaTeX compile in its own locked-down container.

Owns: the compiles' settings, paths, identities, container profile, budget and outcome (the
compile broker, init.broker, runs compiles with these), the front ends (the `latexmk` shim on
the services' PATH, `sharelatex-init compile`, the HTTP compile service), the broker's thin
client and the messages it exchanges with the broker (`client`, `messages`: standard library
only, the shim starts them under `python3 -I -S`), and how the services' compiles are wired to
the sandbox (`service_env`).

May import: init.engine (the engine boundary, the labels), init.core, init.config.
"""
