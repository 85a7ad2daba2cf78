"""A request target as the engine will understand it, worked out once before any decision.

The engine (Go's net/http and gorilla/mux) decodes the path's percent-escapes once, cleans `//`,
`.` and `..`, strips an API version prefix and reads the query with `+` as a space and the first
of repeated keys. A filter that judged the raw text would be fooled by `%2F`, `/v1.41//`,
`/containers/x/../../images/create`; this module decodes and cleans the same way, and the proxy
forwards the canonical form it built (`Route.target()`), never the caller's spelling, so what
was judged is what the engine gets. Versions older than 1.24 are refused: engines still honour
them (20.10 accepts 1.12), and there `start` applies a HostConfig sent in its body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from init.proxy.decision import Refused

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OLDEST_API = (1, 24)
_VERSION = re.compile(r"^v([0-9]{1,2})\.([0-9]{1,3})$")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SEGMENT_SAFE = _UNRESERVED | frozenset(b":@")


@dataclass(frozen=True)
class Route:
    """One request's method, API version, path segments and query, all decoded."""

    method: str
    version: str | None  # "1.41", or None for an unversioned path (the engine's newest)
    segments: tuple[str, ...]
    query: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """The decoded path without the version prefix, for messages: `/containers/create`."""
        return "/" + "/".join(self.segments)

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def target(
        self,
        segments: tuple[str, ...] | None = None,
        query: tuple[tuple[str, str], ...] | None = None,
    ) -> str:
        """The canonical request target to forward (optionally with other segments or query)."""
        parts = self.segments if segments is None else segments
        prefix = f"/v{self.version}" if self.version else ""
        text = prefix + "/" + "/".join(_quote(p, _SEGMENT_SAFE) for p in parts)
        pairs = self.query if query is None else query
        if pairs:
            text += "?" + "&".join(
                f"{_quote(k, _UNRESERVED)}={_quote(v, _UNRESERVED)}" for k, v in pairs
            )
        return text


def parse(method: str, target: str) -> Route:
    """The route of `method target`; Refused (400) for a target the engine could read in
    another way than this function."""
    if method not in METHODS:
        raise Refused(f"method {method[:20]!r} is not allowed", 400)
    if not target.startswith("/"):
        raise Refused("the request target must be a path (origin form)", 400)
    if "#" in target:
        raise Refused("a fragment in the request target is not allowed", 400)
    raw_path, _, raw_query = target.partition("?")
    path = _unquote(raw_path, plus_is_space=False)
    segments: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not segments:
                raise Refused("the path climbs above the root with '..'", 400)
            segments.pop()
            continue
        segments.append(part)
    version = None
    if segments and segments[0].startswith("v") and segments[0][1:2].isdigit():
        match = _VERSION.match(segments[0])
        if match is None:
            raise Refused(f"API version {segments[0]!r} is not of the form v1.41", 400)
        major, minor = int(match.group(1)), int(match.group(2))
        if (major, minor) < OLDEST_API:
            raise Refused(
                f"API version {major}.{minor} is older than "
                f"{OLDEST_API[0]}.{OLDEST_API[1]}: use a newer client",
                400,
            )
        version = f"{major}.{minor}"
        segments = segments[1:]
    return Route(method, version, tuple(segments), _parse_query(raw_query))


def _parse_query(raw: str) -> tuple[tuple[str, str], ...]:
    if not raw:
        return ()
    if ";" in raw:
        raise Refused("';' in the query is not allowed", 400)
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in raw.split("&"):
        if not item:
            continue
        key_raw, _, value_raw = item.partition("=")
        key = _unquote(key_raw, plus_is_space=True)
        value = _unquote(value_raw, plus_is_space=True)
        if key in seen:
            # The engine reads the first (Go's Form.Get); only the first is judged and sent on.
            # dockerode repeats keys: it puts a create's every option in the query, Cmd and Env
            # one key per item, beside the body the engine reads them from.
            continue
        seen.add(key)
        pairs.append((key, value))
    return tuple(pairs)


def _unquote(text: str, plus_is_space: bool) -> str:
    """Percent-decoding as Go does it, strictly: a `%` not followed by two hex digits, bytes
    that are not UTF-8, and control characters are refused."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # %
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not all(b in _HEX for b in pair):
                raise Refused("a malformed percent-escape in the request target", 400)
            out.append(int(pair, 16))
            i += 3
            continue
        out.append(0x20 if byte == 0x2B and plus_is_space else byte)
        i += 1
    try:
        decoded = out.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("the request target is not UTF-8", 400) from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise Refused("a control character in the request target", 400)
    return decoded


def _quote(text: str, safe: frozenset[int]) -> str:
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in text.encode())
