"""The engine policy proxy: the only Docker engine socket the services can open.

It owns a unix socket in the services' group (`python -m init.proxy`, one of PID 1's own
services, started before the services and stopped after them) and forwards to the raw engine
socket, which only the init's root processes may open. Every request is judged by what it means,
not how it is spelled: the target is normalized once (`route`), only the calls a compile runner
makes pass (`policy`), and every container create is held to the compile profile (`create`),
its bind sources resolved on disk (`binds`). `server` does the I/O (the standard library only:
threads, HTTP/1.1 framing in `wire`, hijacked streams spliced both ways).

May import: init.engine (the labels, the light client for its look-ups, the side's
`EngineProxy` interface), init.compiles.settings (Limits), init.config, init.core (log, wakeup,
services). Nothing imports it but init.boot (`service.ProxyService`, its ServiceSpec).
"""
