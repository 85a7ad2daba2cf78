"""The proxy's reading of request targets: decoded and cleaned once, as the engine does."""

from __future__ import annotations

import pytest

from init.proxy.decision import Refused
from init.proxy.route import parse


@pytest.mark.parametrize(
    ("target", "version", "segments"),
    [
        ("/_ping", None, ("_ping",)),
        ("/v1.41/containers/create", "1.41", ("containers", "create")),
        ("//v1.41//containers///create", "1.41", ("containers", "create")),
        ("/v1.41/containers/x/../../images/create", "1.41", ("images", "create")),
        ("/v1.41/./info", "1.41", ("info",)),
        ("/v1.41%2Fimages%2Fcreate", "1.41", ("images", "create")),
        ("/%76%31%2E%34%31/_ping", "1.41", ("_ping",)),
        ("/images/quay.io/sharelatex/texlive-full:2017.1/json", None,
         ("images", "quay.io", "sharelatex", "texlive-full:2017.1", "json")),
        ("/v01.041/info", "1.41", ("info",)),
    ],
)  # fmt: skip
def test_targets_are_decoded_and_cleaned_once(
    target: str, version: str | None, segments: tuple[str, ...]
) -> None:
    route = parse("GET", target)
    assert (route.version, route.segments) == (version, segments)


def test_the_forwarded_target_is_the_canonical_one_not_the_callers_spelling() -> None:
    route = parse("POST", "//v1.41/containers/%2e%2e/containers/create?name=a%20b&platform=")
    assert route.target() == "/v1.41/containers/create?name=a%20b&platform="
    assert parse("GET", "/containers/a%252Fb/json").target() == "/containers/a%252Fb/json"


def test_the_query_reads_plus_as_space_like_go() -> None:
    assert parse("GET", "/events?filters=a+b").param("filters") == "a b"


@pytest.mark.parametrize(
    ("method", "target", "why"),
    [
        ("GET", "http://docker/_ping", "origin form"),
        ("GET", "/../_ping", "climbs above"),
        ("GET", "/v1.23/info", "older than 1.24"),
        ("POST", "/v1.12/containers/x/start", "older than 1.24"),
        ("GET", "/v1.4.1/info", "not of the form"),
        ("GET", "/v1.41x/info", "not of the form"),
        ("GET", "/_ping%zz", "malformed percent"),
        ("GET", "/_ping%00", "control character"),
        ("GET", "/_ping%ff", "not UTF-8"),
        ("GET", "/containers/json?all=1;all=0", "';'"),
        ("GET", "/_ping#x", "fragment"),
        ("get", "/_ping", "method"),
        ("BREW", "/_ping", "method"),
    ],
)
def test_targets_the_engine_could_read_otherwise_are_refused(
    method: str, target: str, why: str
) -> None:
    with pytest.raises(Refused) as refused:
        parse(method, target)
    assert refused.value.status == 400
    assert why in refused.value.reason


def test_a_repeated_query_key_is_read_and_forwarded_as_its_first_only() -> None:
    """As the engine reads it (Go's Form.Get); dockerode repeats Cmd and Env in a create's
    query, beside the body the engine takes them from."""
    parsed = parse("POST", "/containers/create?Cmd=latexmk&Cmd=-cd&name=p&name=q")
    assert parsed.query == (("Cmd", "latexmk"), ("name", "p"))
    assert parsed.target() == "/containers/create?Cmd=latexmk&name=p"
