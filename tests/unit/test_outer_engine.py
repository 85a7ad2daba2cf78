"""scripts/outer-engine's address pools: a slot per engine, held by an flock that its dockerd
inherits, a slot a host route overlaps passed by, and a clear refusal when none is free."""

from __future__ import annotations

import fcntl
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, script_module

SCRIPT = REPO / "scripts/outer-engine"


def load() -> ModuleType:
    return script_module(SCRIPT, "_outer_engine")


@pytest.fixture
def outer_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The script, its pools' lock dir under tmp_path, two slots, no host route in the way."""
    module = load()
    monkeypatch.setattr(module, "POOLS", tmp_path / "pools")
    monkeypatch.setattr(module, "POOL_SLOTS", 2)
    monkeypatch.setattr(module, "host_routes", list)
    yield module


def test_each_engine_takes_a_slot_of_its_own(outer_engine: ModuleType) -> None:
    first, pool = outer_engine.lock_address_pool()
    second, other = outer_engine.lock_address_pool()
    try:
        assert (pool, other) == ("10.209.0.0/21", "10.209.8.0/21")
        assert os.get_inheritable(first) and os.get_inheritable(second)  # dockerd's to hold
    finally:
        os.close(first)
        os.close(second)
    # Closed (its dockerd ended): the slot is free again.
    again, pool = outer_engine.lock_address_pool()
    os.close(again)
    assert pool == "10.209.0.0/21"


def test_a_slot_a_host_route_overlaps_is_passed_by(
    outer_engine: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        outer_engine, "host_routes", lambda: [ipaddress.ip_network("10.209.4.0/24")]
    )
    fd, pool = outer_engine.lock_address_pool()
    os.close(fd)
    assert pool == "10.209.8.0/21"


def test_no_free_slot_is_refused_naming_the_dir(outer_engine: ModuleType) -> None:
    pools = outer_engine.POOLS
    pools.mkdir()
    held = []
    for slot in range(2):  # two other engines hold both
        fd = os.open(pools / f"pool-{slot}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        with pytest.raises(outer_engine.EngineError) as caught:
            outer_engine.lock_address_pool()
    finally:
        for fd in held:
            os.close(fd)
    assert str(caught.value) == f"all 2 address pools under {pools} are taken: stop an engine"


def test_the_host_routes_are_read_from_the_kernel_table_but_the_default(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "br-1\t0004D10A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    )
    assert load().host_routes(table) == [
        ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("10.209.0.0/16")
    ]  # fmt: skip
