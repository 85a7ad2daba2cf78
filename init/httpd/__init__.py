"""HTTP: a small stdlib server (`server`) and the optional /healthz /readyz /status child
(`status`); the compile service (init.compiles.api) sits on the same server.

May import: init.core, init.config, and init.status (the readers' view of the status document).
"""
