"""IPv6 pools and addresses (driver/blocks6.py) against the real stores:
SQLite, etcd and ZooKeeper, three "hosts" (an Ipam each, on a store
connection of its own) sharing one store.

What the store holds is read back with the store's own list, keys and all:
the addresses handed out, nothing else, and nothing at all once released.
"""

from __future__ import annotations

import ipaddress
import threading
import uuid

import pytest

from driver.errors import DriverError
from driver.ipam import GATEWAY_REQUEST, Ipam
from driver.state import State, address_key, ip_key_prefixes
from driver.store import open_store
from tests.seed import rng

GW = {"RequestAddressType": GATEWAY_REQUEST}
HOSTS = ("10.99.0.1", "10.99.0.2", "10.99.0.3")
SPACE = "pyoverlay"
POOL6 = "fd00:20::/64"


@pytest.fixture(params=["sqlite", "etcd", "zk"])
def url(request, tmp_path):
    """A store URL of the test's own, on each real backend."""
    tag = uuid.uuid4().hex[:8]
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/state.db"
    if request.param == "etcd":
        return request.getfixturevalue("etcd_server").url, f"/v6-{tag}/"
    return f"{request.getfixturevalue('zk_server').url}/v6-{tag}"


@pytest.fixture
def stores(url):
    url, prefix = url if isinstance(url, tuple) else (url, None)
    opened = [open_store(url, **({"prefix": prefix} if prefix else {})) for _ in HOSTS]
    yield opened
    for s in opened:
        s.close()


@pytest.fixture
def cluster(stores):
    ipams = [Ipam(State(s), host) for s, host in zip(stores, HOSTS)]
    yield ipams
    for ipam in ipams:
        ipam.close()


def keys(store) -> dict[str, str]:
    kvs, _ = store.list("")
    return {kv.key: kv.value for kv in kvs}


def bare(cidr: str) -> str:
    return cidr.split("/")[0]


def test_v6_addresses_are_distinct_across_hosts_and_all_go_when_released(cluster, stores):
    for ipam in cluster:
        assert ipam.request_pool(SPACE, POOL6, "", True) == POOL6
    gateways = {ipam.request_address(POOL6, "", GW) for ipam in cluster}
    assert gateways == {"fd00:20::1/64"}  # one gateway, shared (the subnet's first address)

    got: dict[str, list[str]] = {h: [] for h in HOSTS}

    def worker(ipam: Ipam) -> None:
        for _ in range(15):
            got[ipam.host].append(ipam.request_address(POOL6, "", None))

    threads = [threading.Thread(target=worker, args=(ipam,)) for ipam in cluster]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [bare(a) for addresses in got.values() for a in addresses]
    assert len(every) == len(set(every)) == 45, "an address was handed out twice"
    assert all(a.endswith("/64") and ipaddress.ip_address(bare(a)) in ipaddress.ip_network(POOL6)
               for addresses in got.values() for a in addresses)
    # Each host hands out from its own /112, lowest first.
    regions = {h: {ipaddress.ip_network(f"{bare(a)}/112", strict=False) for a in got[h]} for h in HOSTS}
    assert all(len(r) == 1 for r in regions.values()) and len(set().union(*regions.values())) == 3, regions

    # The store holds exactly those (and the gateway), under exploded keys; no block records for IPv6.
    held = {k: v for k, v in keys(stores[0]).items() if k.startswith("addresses/")}
    assert set(held) == {address_key(POOL6, ip) for ip in [*every, "fd00:20::1"]}
    assert all(len(k.rsplit("/", 1)[1]) == 39 for k in held)  # "fd00:0020:0000:...:0001"
    assert not [k for k in keys(stores[0]) if k.startswith("blocks/")]
    # Read back, they are spelt as everywhere else (compressed).
    assert {ip for ip, _, _ in State(stores[1]).addresses(POOL6)} == {*every, "fd00:20::1"}

    # Released, an address is handed out again (lowest first); all released, all gone.
    a = cluster[0]
    first = got[a.host][0]
    a.release_address(POOL6, bare(first))
    assert a.request_address(POOL6, "", None) == first
    for ipam in cluster:
        for address in got[ipam.host]:
            ipam.release_address(POOL6, bare(address))
    assert [k for k in keys(stores[0]) if k.startswith("addresses/")] == [address_key(POOL6, "fd00:20::1")]
    for ipam in cluster:
        ipam.release_address(POOL6, "fd00:20::1")  # the gateway is the pool's: it stays until the pool goes
        ipam.release_pool(POOL6)
    assert keys(stores[0]) == {}, "the released pool left keys behind"


def test_explicit_v6_address_goes_to_one_host_and_is_refused_to_the_next(cluster):
    a, b, _ = cluster
    for ipam in (a, b):
        ipam.request_pool(SPACE, POOL6, "", True)
    assert a.request_address(POOL6, "fd00:20::abcd", None) == "fd00:20::abcd/64"
    with pytest.raises(DriverError, match=r"address fd00:20::abcd is already in use \(host 10.99.0.1\)"):
        b.request_address(POOL6, "fd00:20:0::ABCD", None)  # another spelling of the same address
    with pytest.raises(DriverError, match="not a usable address of fd00:20::/64"):
        b.request_address(POOL6, "fd00:21::5", None)
    # b's own allocation never lands on a's address, even in a's region.
    assert bare(b.request_address(POOL6, "", None)) != "fd00:20::abcd"


def test_a_small_v6_pool_is_one_region_shared_without_duplicates(cluster, stores):
    pool = "fd00:30::/124"  # 16 addresses: the first and last are never handed out, ::1 is the gateway
    for ipam in cluster:
        ipam.request_pool(SPACE, pool, "", True)
    cluster[0].request_address(pool, "", GW)
    got, refused = [], []
    lock = threading.Lock()

    def worker(ipam: Ipam) -> None:
        while True:
            try:
                address = ipam.request_address(pool, "", None)
            except DriverError as e:
                with lock:
                    refused.append(str(e))
                return
            with lock:
                got.append(bare(address))

    threads = [threading.Thread(target=worker, args=(ipam,)) for ipam in cluster]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=ipaddress.ip_address) == [f"fd00:30::{n:x}" for n in range(2, 15)]
    assert len(refused) == 3 and all("no free address left in fd00:30::/124" in r for r in refused), refused


def test_refused_v6_pools_change_nothing(cluster, stores):
    a = cluster[0]
    a.request_pool(SPACE, POOL6, "", True)
    before = keys(stores[0])
    for pool, v6, says in [
        ("", True, "pass an IPv6 --subnet"),
        ("fe80::/64", True, "not a unicast range"),
        ("ff05::/64", True, "not a unicast range"),
        ("::ffff:10.0.0.0/120", True, "not a unicast range"),
        ("fd00:20::/126", True, "too small"),
        ("fd00:20::1/64", True, "not a valid IPv6 network"),
        ("fd00:20::/64", False, "engine asked for IPv4"),
        ("10.20.0.0/24", True, "engine asked for IPv6"),
        ("fd00:20::/48", True, "overlaps fd00:20::/64"),
        (POOL6, True, "already used by another pyoverlay network on this host"),
    ]:
        with pytest.raises(DriverError, match=says):
            a.request_pool(SPACE, pool, "", v6)
    with pytest.raises(DriverError, match="--ip-range is not supported"):
        a.request_pool(SPACE, "fd00:40::/64", "fd00:40::/80", True)
    assert keys(stores[0]) == before


def test_dual_stack_pools_side_by_side(cluster, stores):
    """An IPv4 and an IPv6 pool of one network: each family from its own allocator, the
    IPv4 one in blocks as before, neither touching the other's keys."""
    r = rng("test_dual_stack_pools_side_by_side")
    a, b, _ = cluster
    for ipam in (a, b):
        assert ipam.request_pool(SPACE, "10.20.0.0/24", "", False) == "10.20.0.0/24"
        assert ipam.request_pool(SPACE, POOL6, "", True) == POOL6
    v4 = [bare(ipam.request_address("10.20.0.0/24", "", None)) for ipam in (a, b) for _ in range(r.randint(1, 6))]
    v6 = [bare(ipam.request_address(POOL6, "", None)) for ipam in (a, b) for _ in range(r.randint(1, 6))]
    assert len(set(v4)) == len(v4) and len(set(v6)) == len(v6)
    assert all(ipaddress.ip_address(ip).version == 4 for ip in v4)
    assert all(ipaddress.ip_address(ip).version == 6 for ip in v6)
    blocks = [k for k in keys(stores[0]) if k.startswith("blocks/")]
    assert blocks and all(k.startswith("blocks/10.20.0.0_24/") for k in blocks)


def test_v6_key_prefix_holds_a_block():
    block = ipaddress.ip_network("fd00:20::7:0/112")
    (prefix,) = ip_key_prefixes(block)
    assert prefix == "fd00:0020:0000:0000:0000:0000:0007:"
    assert address_key(POOL6, "fd00:20::7:1").endswith("/" + prefix + "0001")
    # A block off the nibble boundary: a wider prefix, the caller filters.
    assert ip_key_prefixes(ipaddress.ip_network("fd00:20::7:0/114")) == ["fd00:0020:0000:0000:0000:0000:0007:"]
