"""IPAM on a shared in-memory store, several hosts at once."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from driver.errors import DriverError
from driver.ipam import GATEWAY_REQUEST, Ipam
from driver.state import State
from driver.store import open_store

GW = {"RequestAddressType": GATEWAY_REQUEST}


@pytest.fixture
def store():
    s = open_store("memory://")
    yield s
    s.close()


def hosts(store, n=3, **kw):
    return [Ipam(State(store), f"10.99.0.{i + 1}", **kw) for i in range(n)]


def test_pool_is_shared_across_hosts_and_held_once_per_host(store):
    a, b, _ = hosts(store)
    assert a.request_pool("pyoverlay", "10.20.0.0/24", "", False) == "10.20.0.0/24"
    assert b.request_pool("pyoverlay", "10.20.0.0/24", "", False) == "10.20.0.0/24"
    with pytest.raises(DriverError, match="already used by another pyoverlay network on this host"):
        a.request_pool("pyoverlay", "10.20.0.0/24", "", False)
    with pytest.raises(DriverError, match="overlaps 10.20.0.0/24"):
        a.request_pool("pyoverlay", "10.20.0.0/16", "", False)


def test_default_pool_avoids_held_pools_and_host_routes(store):
    (a,) = hosts(store, 1, host_routes=lambda: ["10.213.0.0/24", "192.168.1.0/24"])
    first = a.request_pool("pyoverlay", "", "", False)
    second = a.request_pool("pyoverlay", "", "", False)
    assert (first, second) == ("10.213.1.0/24", "10.213.2.0/24")


def test_default_pool_exhaustion_is_explained(store):
    (a,) = hosts(store, 1, default_pool="10.213.0.0/23")
    a.request_pool("pyoverlay", "", "", False)
    a.request_pool("pyoverlay", "", "", False)
    with pytest.raises(DriverError, match="pass --subnet"):
        a.request_pool("pyoverlay", "", "", False)


def test_gateway_is_one_per_overlay(store):
    a, b, c = hosts(store)
    for h in (a, b, c):
        h.request_pool("pyoverlay", "10.20.0.0/24", "", False)
    assert a.request_address("10.20.0.0/24", "10.20.0.254", GW) == "10.20.0.254/24"
    assert b.request_address("10.20.0.0/24", "", GW) == "10.20.0.254/24"
    with pytest.raises(DriverError, match="--gateway 10.20.0.254"):
        c.request_address("10.20.0.0/24", "10.20.0.1", GW)


def test_addresses_unique_per_host_block_and_reusable(store):
    # Each host allocates from a block of its own (issue 13), not sequentially across hosts.
    a, b, _ = hosts(store)
    for h in (a, b):
        h.request_pool("pyoverlay", "10.20.0.0/24", "", False)
        h.request_address("10.20.0.0/24", "", GW)
    got = [a.request_address("10.20.0.0/24", "", None), b.request_address("10.20.0.0/24", "", None)]
    assert len(set(got)) == 2 and all(ipaddress.ip_interface(g) in ipaddress.ip_network("10.20.0.0/24") for g in got)
    assert ipaddress.ip_interface(got[0]).network.prefixlen == 24
    b_ip = got[1].split("/")[0]
    with pytest.raises(DriverError, match=rf"{b_ip} is already in use \(host 10.99.0.2\)"):
        a.request_address("10.20.0.0/24", b_ip, None)
    a.release_address("10.20.0.0/24", b_ip)  # not a's to free
    with pytest.raises(DriverError, match="already in use"):
        a.request_address("10.20.0.0/24", b_ip, None)
    b.release_address("10.20.0.0/24", b_ip)
    b.release_address("10.20.0.0/24", b_ip)  # idempotent
    assert a.request_address("10.20.0.0/24", b_ip, None) == f"{b_ip}/24"


def test_exhaustion(store):
    (a,) = hosts(store, 1)
    a.request_pool("pyoverlay", "10.20.0.0/30", "", False)
    a.request_address("10.20.0.0/30", "", GW)
    assert a.request_address("10.20.0.0/30", "", None) == "10.20.0.2/30"
    with pytest.raises(DriverError, match="no free address left in 10.20.0.0/30"):
        a.request_address("10.20.0.0/30", "", None)


def test_last_release_of_pool_frees_everything(store):
    a, b, _ = hosts(store)
    for h in (a, b):
        h.request_pool("pyoverlay", "10.20.0.0/24", "", False)
        h.request_address("10.20.0.0/24", "", GW)
    a.release_pool("10.20.0.0/24")
    assert store.list("addresses/")[0], "b still holds the pool: its gateway stays"
    b.release_pool("10.20.0.0/24")
    b.release_pool("10.20.0.0/24")
    assert store.list("")[0] == []


def test_racing_hosts_never_share_an_address(store):
    ipams = hosts(store)
    for h in ipams:
        h.request_pool("pyoverlay", "10.20.0.0/22", "", False)
        h.request_address("10.20.0.0/22", "", GW)
    results: list[str] = []
    lock = threading.Lock()

    def grab(h):
        for _ in range(100):
            address = h.request_address("10.20.0.0/22", "", None)
            with lock:
                results.append(address)

    threads = [threading.Thread(target=grab, args=(h,)) for h in ipams for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 600 and len(set(results)) == 600
