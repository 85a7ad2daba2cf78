"""The allow-list: which calls pass, on what, rewritten how. Pure: a route and a body in, a
Forward out or Refused raised; what it needs to know of the engine (is this a compile
container?) it asks through `Facts`, which the server answers by asking the engine.

Only what compile runners do passes: ping, version, a trimmed info, the allowed images and the
compile containers listed, a create held to the profile (create.py), then start, attach, logs,
wait, inspect, kill, stop, resize, exec and remove of a compile container, and its events.
Every container named is looked up first and then addressed by its full id, so a name cannot
be re-pointed at another container between the check and the call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from init.proxy import body, create
from init.proxy.binds import Resolver, resolve_on_disk
from init.proxy.decision import Answer, Forward, Missing, Refused
from init.proxy.route import Route
from init.proxy.settings import ProxyConfig

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FULL_ID = re.compile(r"^[0-9a-f]{64}$")
EXEC_FIELDS = ("AttachStdin", "AttachStdout", "AttachStderr", "DetachKeys", "Tty",
               "ConsoleSize", "Env", "Cmd", "Privileged", "User", "WorkingDir")  # fmt: skip
EXEC_START_FIELDS = ("Detach", "Tty", "ConsoleSize")


@dataclass(frozen=True)
class Container:
    id: str  # the full id
    compile: bool  # carries the compile label


class Facts:
    """What the policy asks of the engine; the server's answers ask the engine itself."""

    def container(self, name: str) -> Container | None:
        """The container `name` (a name, an id or a prefix), None when there is none."""
        raise NotImplementedError

    def exec_container(self, exec_id: str) -> str | None:
        """The id of the container exec `exec_id` runs in, None when there is no such exec."""
        raise NotImplementedError


@dataclass(frozen=True)
class Action:
    """A call on one compile container: its method, the query it may carry, its body."""

    method: str
    query: tuple[str, ...] = ()
    body: str = "none"  # none (empty or {} only), exec (an exec's config)
    answer: Answer = Answer.PASS
    hijack: bool = False


CONTAINER_ACTIONS: Mapping[str, Action] = {
    "json": Action("GET", ("size",), answer=Answer.RETIRE_STALE),
    "start": Action("POST", ("detachKeys",)),
    "wait": Action("POST", ("condition",)),
    "attach": Action(
        "POST", ("stream", "stdin", "stdout", "stderr", "logs", "detachKeys"), hijack=True
    ),
    "logs": Action(
        "GET", ("follow", "stdout", "stderr", "since", "until", "timestamps", "tail", "details")
    ),
    "kill": Action("POST", ("signal",)),
    "stop": Action("POST", ("t", "signal")),
    "resize": Action("POST", ("h", "w")),
    "exec": Action("POST", body="exec", answer=Answer.REMEMBER_EXEC),
}
EXEC_ACTIONS: Mapping[str, Action] = {
    "start": Action("POST", body="exec-start", hijack=True),
    "json": Action("GET"),
    "resize": Action("POST", ("h", "w")),
}


def decide(
    route: Route,
    payload: bytes,
    upgrade: bool,
    config: ProxyConfig,
    facts: Facts,
    now: float | None = None,
    resolve: Resolver = resolve_on_disk,
) -> Forward:
    """What to send the engine for `route` with body `payload`; Refused (or Missing) else.
    `upgrade`: the caller asked for the raw stream (`Upgrade: tcp`)."""
    method, segments = route.method, route.segments
    head = segments[0] if segments else ""
    if segments in (("_ping",),) and method in ("GET", "HEAD"):
        return Forward(method, route.target(query=()))
    if segments == ("version",) and method == "GET":
        return Forward(method, route.target(query=()))
    if segments == ("info",) and method == "GET":
        return Forward(method, route.target(query=()), answer=Answer.TRIM_INFO)
    if head == "images" and method == "GET" and len(segments) >= 2 and segments[-1] == "json":
        if len(segments) == 2:
            query = _keep(route, ("all", "digests", "filters", "shared-size"))
            return Forward(method, route.target(query=query), answer=Answer.FILTER_IMAGES)
        create.check_image("/".join(segments[1:-1]), config.images)
        return Forward(method, route.target(query=()))
    if head == "containers":
        return _containers(route, payload, upgrade, config, facts, now, resolve)
    if head == "exec" and len(segments) == 3 and segments[2] in EXEC_ACTIONS:
        action = EXEC_ACTIONS[segments[2]]
        _method(route, action.method)
        container_id = facts.exec_container(segments[1])
        if container_id is None:
            raise Missing(f"No such exec instance: {segments[1][:64]}")
        _compile_container(container_id, facts)
        return Forward(
            method,
            route.target(query=_keep(route, action.query)),
            _body(action.body, payload),
            action.answer,
            stream=action.hijack,
            upgrade=upgrade and action.hijack,
        )
    if segments == ("events",) and method == "GET":
        return _events(route, facts)
    raise Refused(f"{method} {route.path[:80]} is not a call compile runners make")


def _containers(
    route: Route,
    payload: bytes,
    upgrade: bool,
    config: ProxyConfig,
    facts: Facts,
    now: float | None,
    resolve: Resolver,
) -> Forward:
    method, segments = route.method, route.segments
    if segments == ("containers", "json") and method == "GET":
        query = _keep(route, ("all", "limit", "size", "filters", "before", "since"))
        return Forward(method, route.target(query=query), answer=Answer.FILTER_CONTAINERS)
    if segments == ("containers", "create") and method == "POST":
        outcome = create.check(
            body.loads(payload) if payload.strip() else None, config, now, resolve
        )
        return Forward(
            method,
            route.target(query=_keep(route, ("name", "platform"))),
            body.dumps(outcome.document),
            Answer.REMEMBER_CONTAINER,
            rewritten=tuple(outcome.rewritten),
        )
    if len(segments) == 2 and method == "DELETE":
        container = _compile_container(segments[1], facts)
        return Forward(
            method,
            route.target(("containers", container.id), _keep(route, ("force", "v", "link"))),
        )
    if len(segments) == 3 and segments[2] in CONTAINER_ACTIONS:
        action = CONTAINER_ACTIONS[segments[2]]
        _method(route, action.method)
        container = _compile_container(segments[1], facts)
        return Forward(
            method,
            route.target(("containers", container.id, segments[2]), _keep(route, action.query)),
            _body(action.body, payload),
            action.answer,
            stream=action.hijack,
            upgrade=upgrade and action.hijack,
        )
    raise Refused(f"{method} {route.path[:80]} is not a call compile runners make")


def _method(route: Route, expected: str) -> None:
    if route.method != expected:
        raise Refused(f"{route.method} {route.path[:80]} is not a call compile runners make")


def _compile_container(name: str, facts: Facts) -> Container:
    container = facts.container(name)
    if container is None:
        raise Missing(f"No such container: {name[:64]}")
    if not container.compile:
        raise Refused(f"container {name[:64]} is not a compile container")
    return container


def _keep(route: Route, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in route.query if k in names)


def _body(kind: str, payload: bytes) -> bytes | None:
    if kind == "none":
        if payload.strip() not in (b"", b"{}", b"null") and not _echoed_query(payload):
            raise Refused("this call takes no body (an old client's HostConfig on start?)", 400)
        return None  # never forwarded
    document = body.loads(payload) if payload.strip() else {}
    if kind == "exec-start":
        fields, unknown = body.canonical(document, EXEC_START_FIELDS, "the exec start body")
    else:
        fields, unknown = body.canonical(document, EXEC_FIELDS, "the exec body")
        if fields.get("Privileged") not in (None, False):
            raise Refused("a privileged exec is not allowed")
        fields.pop("Privileged", None)
        create.check_user(fields.get("User"), required=False)
    for key, value in unknown.items():
        if not body.is_zero(value):
            raise Refused(f"{key[:40]} is not allowed in an exec")
    return body.dumps(fields)


def _echoed_query(payload: bytes) -> bool:
    """dockerode sends a call's query options as its JSON body too (attach's `{"stdout":1,
    "stderr":1,"stream":1}`): an object of lowercase names and plain values, which the engine
    ignores and the proxy drops. An engine field (HostConfig, ...) starts with a capital."""
    try:
        document = body.loads(payload)
    except Refused:
        return False
    return isinstance(document, dict) and all(
        key[:1].islower() and (value is None or isinstance(value, (str, int, float)))
        for key, value in document.items()
    )


def _events(route: Route, facts: Facts) -> Forward:
    """Events of named compile containers only (the runner asks whether one was OOM-killed)."""
    text = route.param("filters")
    filters, unknown = body.canonical(
        body.loads(text.encode()) if text else None, ("container", "event", "type"), "filters"
    )
    if unknown or not filters.get("container"):
        raise Refused("events are given only for named compile containers (filters container=)")
    rebuilt: dict[str, Any] = {}
    for key, value in filters.items():
        names = list(value) if isinstance(value, (list, dict)) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise Refused(f"filter {key} must list names", 400)
        rebuilt[key] = names
    rebuilt["container"] = [_compile_container(n, facts).id for n in rebuilt["container"]]
    query = (*_keep(route, ("since", "until")), ("filters", body.dumps(rebuilt).decode()))
    return Forward(route.method, route.target(query=query))


def is_full_id(text: str) -> bool:
    return bool(FULL_ID.match(text))
