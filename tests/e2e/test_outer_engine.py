"""Two outer engines at once (the suite's beside a demo's or a benchmark's): each makes its
networks in a pool of its own (scripts/outer-engine), so two sites never share a subnet, none
is in dockerd's default pools (172.17.0.0/16 first), and the host routes each subnet to its own
engine's bridge."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.conftest import E2E_LABEL, REPO, OuterEngine

POOLS = ipaddress.ip_network("10.209.0.0/16")
DEFAULT_FIRST = ipaddress.ip_network("172.17.0.0/16")  # dockerd's first default pool


def subnet(engine: OuterEngine, name: str) -> ipaddress.IPv4Network:
    found = engine.docker("network", "inspect", name, "--format", "{{json .IPAM.Config}}")
    network = ipaddress.ip_network(json.loads(found)[0]["Subnet"])
    assert isinstance(network, ipaddress.IPv4Network)
    return network


def test_two_engines_make_networks_at_once_in_pools_of_their_own(outer: OuterEngine) -> None:
    with tempfile.TemporaryDirectory(prefix="oe-", dir="/tmp") as tmp:
        start = subprocess.run(
            [str(REPO / "scripts/outer-engine"), "start", "--dir", tmp],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert start.returncode == 0, start.stderr
        second = OuterEngine(Path(tmp))
        name = f"pool-{Path(tmp).name}"
        try:
            with ThreadPoolExecutor(2) as both:  # at the same moment, as two compose `up`s
                made = list(both.map(
                    lambda engine: engine.run("network", "create", "--label", E2E_LABEL, name),
                    (outer, second),
                ))  # fmt: skip
            assert [done.returncode for done in made] == [0, 0], [d.stderr for d in made]
            first, other = subnet(outer, name), subnet(second, name)
            assert not first.overlaps(other), (first, other)
            for network in (first, other):
                assert network.subnet_of(POOLS) and not network.overlaps(DEFAULT_FIRST), network
            routes = json.loads(subprocess.run(
                ["ip", "-4", "-j", "route", "show"], capture_output=True, text=True, check=True,
            ).stdout)  # fmt: skip
            devices = {route["dst"]: route["dev"] for route in routes}
            assert str(first) in devices and str(other) in devices, routes
            assert devices[str(first)] != devices[str(other)], routes
        finally:
            for engine in (outer, second):
                engine.run("network", "rm", name)
            subprocess.run(
                [str(REPO / "scripts/outer-engine"), "stop", tmp], capture_output=True, timeout=60
            )
