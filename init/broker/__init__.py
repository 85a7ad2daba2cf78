"""The compile broker: one long-lived owner of the compile path (issue 14).

Owns: the agent that runs compiles inside a project's warm container (`agent.pl`, started by
`agent`), the typed messages between the broker and that agent (`protocol`), the engine's
multiplexed attach stream (`multiplex`), one warm container driven over its attached stdio
(`warm`), and the per-project pool with its concurrency limits, idle retirement and sweep
(`pool`).

May import: the standard library, `init.errors`, `init.compiles` (the container's profile:
profile, settings, paths) and `init.engine.client` (the one module that talks to an engine).
Not `init.core` (PID 1's), not the shim or the HTTP service: they become the broker's clients.
"""
