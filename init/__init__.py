"""sharelatex-init: PID 1 for ShareLaTeX / Overleaf containers with sandboxed compiles.

The package by concern (each subpackage's docstring says what it owns and may import):
  core/      the PID-1 core: lifecycle, event loop, processes, services, status file (stdlib)
  engine/    dind and sibling mode, the readiness and sibling checks, the engine boundary
  texlive/   the TeX Live installer: PID 1's job, the child, the offline build, progress
  compiles/  the sandboxed compile runner and its clients (shim, CLI, HTTP service)
  httpd/     the stdlib HTTP server and the status endpoint
  proxy/     the engine policy proxy: the only engine socket the services get
and at the top: `cli` (the one boundary to the operator), `commandline` (its grammar, forgotten
by `run`), `config` (every variable, once),
`errors` (the error tree), `checks` (a check's verdict), `doctor`, `status` (the readers' view
of the status document), `boot` (what `run` assembles for the configured mode).
"""

__version__ = "0.1.0"
