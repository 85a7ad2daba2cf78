"""The PID-1 core: the life of the init as an operator knows it, and nothing that talks to Docker.

Owns: the lifecycle (`pid1`), the signals it takes and their hold during the start (`signals`), the
event loop (`loop`: signals through a wakeup fd, children reaped on SIGCHLD, timers), starting and
reaping processes through one seam (`process.System`), the services (`services` discovery,
`supervisor`, `states`, `backoff`, `output`), wrap mode (`wrap`), my_init's container environment
(`container_env`), the init's own helper children (`children`), the Docker side as an interface
(`docker_side`, implemented in init.engine), the component state the status shows (`component`) and
the status file (`status_file`).

May import: the standard library, and init.config / init.errors (themselves stdlib only).
Never the Docker SDK, requests or urllib3: PID 1 must not be taken down by a library.
"""
