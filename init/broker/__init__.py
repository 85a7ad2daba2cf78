"""The compile broker: one long-lived owner of the compile path (issue 14).

Owns: the broker service, a child of PID 1 (`service`: its socket and its loop; `session`: one
client's connection; `execute`: one compile, with the budget, the timeout, the OOM event and the
stops around it), how PID 1 runs the service (`supervision`); and the warm containers: the agent
that runs compiles inside a project's container (`agent.pl`, started by `agent`), the messages
between the broker and that agent (`protocol`), the engine's multiplexed attach stream
(`multiplex`), one warm container driven over its attached stdio (`warm`), and the per-project
pool with its concurrency limits, idle retirement and sweep (`pool`, `target`); its waits on fds
use poll, not select, which stops at fd 1023 (`readable`). Its clients and the messages they
exchange with it live in `init.compiles` (`client`, `messages`), below it: the front ends that
use them (the shim, `sharelatex-init compile`, the HTTP compile service) never import the
broker.

May import: the standard library, `init.errors`, `init.config`, `init.compiles` (the profile,
settings, paths, identity, budget and outcome; the messages; the shim's and the command's
answers), `init.engine.client` (the one module that talks to an engine) and `init.core.wakeup`
(signals as bytes). `supervision` alone, which PID 1 imports, may import `init.core.services`
and `init.engine.side`.
"""
