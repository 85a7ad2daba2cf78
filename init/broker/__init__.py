"""The compile broker: one long-lived owner of the compile path (issue 14).

Owns: the broker service, a child of PID 1 (`service`: its socket and its loop; `session`: one
client's connection; `execute`: one compile, with the budget, the timeout, the OOM event and the
stops around it), the messages between the broker and its clients (`messages`) and the thin
client itself (`client`: the shim, `sharelatex-init compile` and the HTTP compile service use
it), how PID 1 runs the service (`supervision`); and the warm containers: the agent that runs
compiles inside a project's container (`agent.pl`, started by `agent`), the messages between
the broker and that agent (`protocol`), the engine's multiplexed attach stream (`multiplex`),
one warm container driven over its attached stdio (`warm`), and the per-project pool with its
concurrency limits, idle retirement and sweep (`pool`, `target`).

May import: the standard library, `init.errors`, `init.config`, `init.compiles` (the profile,
settings, paths, identity, budget and outcome; the shim's and the command's answers),
`init.engine.client` (the one module
that talks to an engine) and `init.core.wakeup` (signals as bytes). `supervision` alone, which
PID 1 imports, may import `init.core.services` and `init.engine.side`. `client` imports the
standard library only: it starts under `python3 -I -S` for every compile.
"""
