"""Per-host address blocks (issue 13) with real plugin processes on one real
etcd: each host a `pyoverlay serve` in a network namespace of its own
(tests/ipamlab.py), driven over its socket. What the store holds is read
from etcd itself."""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.hosts import wait_for
from tests.ipamlab import GW, Lab

pytestmark = pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    yield lab
    lab.close()


@pytest.fixture
def fresh(lab):
    lab.new_prefix()
    yield lab
    lab.drop_hosts()


def holder_of(blocks: dict[str, str], ip: str):
    return next((h for b, h in blocks.items() if ipaddress.ip_address(ip) in ipaddress.ip_network(b)), None)


def test_hosts_racing_for_blocks_each_allocate_from_their_own(fresh):
    """4 plugins x 4 callers x 20 addresses at once on one /22 cut into /28s:
    no duplicate, every block held by one host, and every host's addresses
    lie in blocks it holds (nobody had to borrow: the pool was far from full)."""
    subnet = "10.60.0.0/22"
    hosts = [fresh.host(i).start() for i in range(1, 5)]
    pool, _ = hosts[0].create_network(subnet, block_size="28")
    for h in hosts[1:]:
        assert h.request_pool(subnet) == pool
        h.request_address(pool, "", GW)
    got: dict[str, list[str]] = {h.addr: [] for h in hosts}
    lock = threading.Lock()

    def caller(h):
        for _ in range(20):
            ip = h.request_address(pool)
            with lock:
                got[h.addr].append(ip)

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(caller, [h for h in hosts for _ in range(4)]))
    every = [ip for ips in got.values() for ip in ips]
    assert len(every) == 320 and len(set(every)) == 320, Counter(every).most_common(3)
    stored = fresh.addresses(subnet)
    assert {ip for ip, a in stored.items() if a["kind"] == "container"} == set(every)
    assert all(stored[ip]["host"] == host for host, ips in got.items() for ip in ips)
    blocks = fresh.blocks(subnet)
    assert all(ipaddress.ip_network(b).prefixlen == 28 for b in blocks)
    for host, ips in got.items():
        assert all(holder_of(blocks, ip) == host for ip in ips), f"{host} allocated outside its blocks"
        held = sum(1 for h in blocks.values() if h == host)
        assert 5 <= held <= 7, f"{host} holds {held} blocks for 80 addresses"


def test_a_hosts_addresses_are_sent_to_no_other_host(fresh):
    """Hosts learn no other host's every address (that fan-out was what a burst
    from many hosts spent its CPU on): 40 addresses claimed on one of three
    hosts make etcd send its watchers a few block events, not an address
    event per host and address."""
    subnet = "10.66.0.0/22"
    hosts = [fresh.host(i).start() for i in range(1, 4)]
    pool, _ = hosts[0].create_network(subnet)
    for h in hosts[1:]:
        assert h.request_pool(subnet) == pool
        h.request_address(pool, "", GW)
    sent = fresh.etcd_metric("etcd_debugging_mvcc_events_total")
    got = [hosts[0].request_address(pool) for _ in range(40)]
    sent = fresh.etcd_metric("etcd_debugging_mvcc_events_total") - sent
    assert len(set(got)) == 40
    assert sent <= 3 * len(fresh.blocks(subnet)), f"etcd sent watchers {sent:.0f} events for 40 addresses"
    # Still unique across hosts: the others claim around them without having seen them.
    others = [h.request_address(pool) for h in hosts[1:] for _ in range(20)]
    assert len(set(got + others)) == 80


def test_exhausted_pool_borrows_from_other_hosts_blocks(fresh):
    """A /26 in four /28 blocks: a takes 20 addresses (two blocks, room left),
    b takes the rest with 4 callers at once: the two free blocks, then a's free
    addresses (borrowed), then a clear error. 61 addresses, none twice."""
    subnet = "10.61.0.0/26"
    a, b = fresh.host(1).start(), fresh.host(2).start()
    pool, _ = a.create_network(subnet, block_size="28")
    assert b.request_pool(subnet) == pool
    mine = [a.request_address(pool) for _ in range(20)]
    errors, theirs, lock = [], [], threading.Lock()

    def caller():
        while True:
            status, answer = b.try_address(pool)
            with lock:
                if "Error" in answer:
                    errors.append(answer["Error"])
                    return
                theirs.append(answer["Address"].split("/")[0])

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mine) + len(theirs) == 61 and len(set(mine + theirs)) == 61
    assert errors and all("no free address left in 10.61.0.0/26" in e for e in errors), errors
    blocks = fresh.blocks(subnet)
    a_blocks = [blk for blk, h in blocks.items() if h == a.addr]
    borrowed = [ip for ip in theirs if holder_of(blocks, ip) == a.addr]
    assert len(a_blocks) == 2 and blocks and len(blocks) == 4
    assert borrowed, "b never borrowed from a's blocks"
    # a, full too now, is told so; a released address is anyone's again.
    status, answer = a.try_address(pool)
    assert status == 200 and "no free address left" in answer["Error"]
    b.release_address(pool, borrowed[0])
    assert a.request_address(pool) == borrowed[0]


def test_static_address_inside_another_hosts_block(fresh):
    subnet = "10.62.0.0/24"
    a, b = fresh.host(1).start(), fresh.host(2).start()
    pool, _ = a.create_network(subnet)
    b.request_pool(subnet)
    first = a.request_address(pool)
    (block,) = [blk for blk, h in fresh.blocks(subnet).items() if h == a.addr]
    inside = [str(ip) for ip in ipaddress.ip_network(block) if str(ip) != first
              and ip not in (ipaddress.ip_network(subnet).network_address, ipaddress.ip_address("10.62.0.1"))]
    static = inside[3]
    assert b.request_address(pool, static) == static  # --ip on b, in a's block
    assert fresh.addresses(subnet)[static]["host"] == b.addr
    rest = [a.request_address(pool) for _ in range(len(inside) - 1)]
    assert static not in rest and first not in rest
    status, answer = b.try_address(pool, first)
    assert status == 200 and answer["Error"] == (
        f"address {first} is already in use (host {a.addr}); choose another --ip or leave it out")


def test_dead_hosts_blocks_go_once_their_addresses_are_free(fresh):
    """a holds two blocks, one with addresses, one emptied, with a long grace;
    a dies. Once its lease is gone the empty block goes back to the pool
    (reaped by b); the one with addresses stays a's, and b borrows around
    them but never takes them."""
    subnet = "10.63.0.0/26"
    a = fresh.host(1).start("--block-grace", "3600")
    b = fresh.host(2).start("--block-grace", "1")
    pool, _ = a.create_network(subnet, block_size="28")
    b.request_pool(subnet)
    got = [a.request_address(pool) for _ in range(20)]
    blocks = fresh.blocks(subnet)
    assert sorted(blocks.values()) == [a.addr, a.addr]
    full, partial = sorted(blocks, key=lambda blk: -sum(holder_of({blk: 1}, ip) is not None for ip in got))
    kept = [ip for ip in got if ipaddress.ip_address(ip) in ipaddress.ip_network(full)]
    for ip in got:
        if ipaddress.ip_address(ip) in ipaddress.ip_network(partial):
            a.release_address(pool, ip)
    a.kill()
    wait_for(lambda: f"hosts/{a.addr}" not in fresh.keys("hosts/"), 30, f"{a.addr}'s lease to expire")
    wait_for(lambda: fresh.blocks(subnet).get(partial) != a.addr, 15, f"{a.addr}'s empty block {partial} to go")
    assert fresh.blocks(subnet).get(full) == a.addr
    theirs = []
    while True:
        status, answer = b.try_address(pool)
        if "Error" in answer:
            break
        theirs.append(answer["Address"].split("/")[0])
    assert not set(theirs) & set(kept) and len(theirs) + len(kept) == 61
    blocks = fresh.blocks(subnet)
    assert blocks[full] == a.addr and blocks.get(partial) == b.addr
    assert set(fresh.addresses(subnet)) >= set(kept)  # a's containers keep their addresses


def test_empty_block_is_released_after_the_grace_period(fresh):
    subnet = "10.64.0.0/24"
    a = fresh.host(1).start("--block-grace", "1")
    pool, _ = a.create_network(subnet, block_size="28")
    got = [a.request_address(pool) for _ in range(17)]  # fills the first block, starts a second
    blocks = fresh.blocks(subnet)
    assert len(blocks) == 2
    last = got[-1]
    second = holder_of({blk: blk for blk in blocks}, last)
    first = next(blk for blk in blocks if blk != second)
    for ip in got:
        if ipaddress.ip_address(ip) in ipaddress.ip_network(second):
            a.release_address(pool, ip)
    wait_for(lambda: second not in fresh.blocks(subnet), 15, f"empty block {second} to be released")
    # The block still in use stays, though the sweeper has run many times since.
    assert fresh.blocks(subnet) == {first: a.addr}
    # Given back means claimable again: the next address comes from a block again.
    nxt = a.request_address(pool)
    assert holder_of(fresh.blocks(subnet), nxt) == a.addr


def test_upgrade_from_a_store_without_blocks_keeps_every_address(fresh):
    """The store as the previous version wrote it (pools, addresses, overlay,
    networks, endpoints, peers; no blocks/), then the new plugins start on it:
    no address or endpoint changes, each host adopts the blocks holding only
    its own addresses, new addresses never collide with the old ones, and
    old ones release as before."""
    subnet, key = "10.65.0.0/24", "10.65.0.0_24"
    a, b = fresh.host(1), fresh.host(2)
    old: dict[str, dict] = {
        f"pools/{key}": {"subnet": subnet, "hosts": [a.addr, b.addr], "gateway": "10.65.0.1"},
        f"addresses/{key}/10.65.0.1": {"kind": "gateway", "host": a.addr},
        "overlays/4321": {"vni": 4321, "subnet": subnet, "mtu": 1400,
                          "networks": {a.addr: "n" * 64, b.addr: "m" * 64}},
        f"subnets/{key}": {"vni": 4321},
    }
    for host, nid in ((a, "n" * 64), (b, "m" * 64)):
        old[f"networks/{nid}"] = {"network_id": nid, "vni": 4321, "host": host.addr, "mtu": 1400,
                                  "subnet": subnet, "internal": False}
    legacy = {f"10.65.0.{i}": a.addr for i in range(2, 12)} | {f"10.65.0.{i}": b.addr for i in range(12, 22)}
    for ip, host in legacy.items():
        eid = ip.replace(".", "").ljust(64, "e")
        mac = "02:50:" + ":".join(f"{int(x):02x}" for x in ip.split("."))
        nid = "n" * 64 if host == a.addr else "m" * 64
        old[f"addresses/{key}/{ip}"] = {"kind": "container", "host": host}
        old[f"endpoints/{eid}"] = {"endpoint_id": eid, "network_id": nid, "vni": 4321, "host": host,
                                   "address": f"{ip}/24", "mac": mac, "vtep": host}
        old[f"peers/4321/{eid}"] = {"ip": ip, "mac": mac, "vtep": host}
    fresh.put(old)
    before = {k: v for k, v in fresh.keys().items() if not k.startswith("hosts/")}
    a.start()
    b.start()
    # Default blocks of a /24 are /28s: .16-.31 holds only b's addresses (b adopts
    # it), .0-.15 holds the gateway, a's and b's (nobody's block).
    wait_for(lambda: fresh.blocks(subnet).get("10.65.0.16/28") == b.addr, 30, "b to adopt its legacy block")
    assert "10.65.0.0/28" not in fresh.blocks(subnet)
    now = fresh.keys()
    assert {k: v for k, v in now.items() if k in before} == before, "an old record changed"
    pool = subnet  # both engines hold the pool already (the PoolID is the subnet)
    new = [a.request_address(pool) for _ in range(5)] + [b.request_address(pool) for _ in range(5)]
    assert len(set(new)) == 10 and not set(new) & set(legacy) and "10.65.0.1" not in new
    assert all(holder_of(fresh.blocks(subnet), ip) in (a.addr, b.addr) for ip in new)
    a.release_address(pool, "10.65.0.2")
    assert "10.65.0.2" not in fresh.addresses(subnet)
    assert {k for k in fresh.keys() if k.startswith("endpoints/")} == {k for k in before if k.startswith("endpoints/")}
