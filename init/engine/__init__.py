"""The engine: everything between the init and a Docker engine, in both modes.

Docker-in-docker: the privileges it needs (`privilege`), cgroups (`cgroups`), the storage choice
(`storage`), the inner dockerd's command line and leftovers (`dockerd`), and PID 1's side of it
(`dind.InnerDocker`). Sibling containers: the socket checks and the host-dir resolution as pure
functions (`sibling`), the check child (`sibling_check`) and PID 1's side (`host.HostDocker`).
Shared: what both sides have in common (`side`), the readiness child (`ready`), mount parsing
(`mountinfo`), and the one module that talks to an engine (`client`: the Docker SDK, imported only
when an engine is asked, and the compile path's light HTTP client).

May import: init.core, init.config, init.errors, init.checks. PID 1 imports the modules it runs
(`dind`, `host`, `side`, `dockerd`, ...), never the SDK: `client` loads it only when used.
"""
