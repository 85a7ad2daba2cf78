"""Request bodies as the engine will read them: JSON decoded strictly, field names canonical.

Go's encoding/json, which the engine uses, matches an object's keys to struct fields without
regard to case (Unicode folding too: the long s is `s`, the Kelvin sign `k`) and lets the last
of repeated keys win. So `{"Privileged": false, "privileged": true}` is a privileged container to
the engine. Here every object's keys must differ after case folding, each known field is taken
by its folded name and re-emitted in its canonical spelling, and the proxy forwards only the body
it re-serialized: what was checked is what the engine gets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from init.proxy.decision import Refused

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 32


def loads(data: bytes) -> Any:
    """The JSON value of `data`; Refused (400) for bad JSON, repeated keys (in any case), NaN
    or infinities, or nesting deeper than MAX_DEPTH."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            folded = key.casefold()
            if folded in seen:
                raise Refused(f"the JSON key {key[:40]!r} is given twice (keys ignore case)", 400)
            seen.add(folded)
        return dict(items)

    def constant(name: str) -> Any:
        raise Refused(f"{name} is not JSON", 400)

    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError:
        raise Refused("the body is not UTF-8", 400) from None
    except (ValueError, RecursionError) as e:
        if isinstance(e, Refused):
            raise
        raise Refused(f"the body is not valid JSON ({str(e)[:80]})", 400) from None
    _check_depth(value, 0)
    return value


def _check_depth(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Refused("the body is nested too deep", 400)
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise Refused("a number out of range", 400)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


def canonical(
    document: Any, fields: Iterable[str], where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known, unknown): `document`'s keys matched to `fields` without regard to case, in the
    fields' own spelling; the keys no field matches, as given. Refused unless an object."""
    if document is None:
        return {}, {}
    if not isinstance(document, dict):
        raise Refused(f"{where} must be a JSON object", 400)
    by_folded = {name.casefold(): name for name in fields}
    known: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in document.items():
        name = by_folded.get(key.casefold())
        if name is None:
            unknown[key] = value
        else:
            known[name] = value
    return known, unknown


def is_zero(value: Any) -> bool:
    """Go's zero value as JSON: what a client such as the docker CLI sends for a field it does
    not use (`false`, `0`, `""`, `null`, `[]`, `{}`)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, dict):
        return all(is_zero(v) for v in value.values())
    return value in (None, 0, "", [])
