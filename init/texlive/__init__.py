"""TeX Live: getting the compile images into the engine while the site is already up.

Owns: PID 1's side of the installer (`job.TexLiveJob`, a service of the init's own), what PID 1
and the installer exchange (`contract`: the request, the per-image status), the installer child
itself (`install`: pull, load, build, with retries and progress), the offline build recipe
(`build`, `recipes/`) and how progress reads (`progress`).

May import: init.engine (its `client` for every engine call), init.core, init.config.
"""
