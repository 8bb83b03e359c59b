"""Cluster-wide IPAM against a real etcd: three "hosts", each an Ipam on its
own State(open_store(etcd url)), so every claim crosses HTTP to etcd and
races only there (issue 3: "no two hosts ever get the same address,
including under concurrency").

What the store holds is read straight from etcd's v3 gateway, not through
the code under test.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from driver.errors import DriverError
from driver.ipam import GATEWAY_REQUEST, Ipam
from driver.state import State
from driver.store import open_store
from tests.etcdserver import EtcdServer

GW = {"RequestAddressType": GATEWAY_REQUEST}
HOSTS = ("10.99.0.1", "10.99.0.2", "10.99.0.3")
SPACE = "pyoverlay"


@pytest.fixture
def prefix():
    """A key prefix of the test's own in the shared etcd."""
    return f"/ipam-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def cluster(etcd_server, prefix):
    """Three Ipam instances, one store connection each, as three plugins have."""
    stores = [open_store(etcd_server.url, prefix=prefix) for _ in HOSTS]
    ipams = [Ipam(State(s), host) for s, host in zip(stores, HOSTS)]
    yield ipams
    for ipam in ipams:
        ipam.close()  # its watches
    for s in stores:
        s.close()


def raw_keys(etcd: EtcdServer, prefix: str) -> dict[str, dict]:
    """Every key under prefix (prefix stripped) with its JSON value, read from etcd itself."""
    start = prefix.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {
        "key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
    return {base64.b64decode(kv["key"]).decode()[len(prefix):]: json.loads(base64.b64decode(kv["value"]))
            for kv in data.get("kvs", [])}


def addresses_in_store(etcd: EtcdServer, prefix: str, subnet: str) -> dict[str, dict]:
    """ip -> Address record of the subnet, from etcd, without its random claim token."""
    head = f"addresses/{subnet.replace('/', '_')}/"
    return {k[len(head):]: {f: x for f, x in v.items() if f != "token"}
            for k, v in raw_keys(etcd, prefix).items() if k.startswith(head)}


def bare(cidr: str) -> str:
    return cidr.split("/")[0]


def test_hundreds_of_racing_requests_from_three_hosts_never_duplicate(etcd_server, prefix, cluster):
    """3 hosts x 4 threads x 50 requests, each thread also releasing every
    fourth address it got (so freed addresses are fought over again): no
    address is ever held twice, and etcd ends with exactly the held ones."""
    subnet = "10.30.0.0/22"
    threads_per_host, requests_per_thread = 4, 50
    for ipam in cluster:
        assert ipam.request_pool(SPACE, subnet, "", False) == subnet
    gateway = bare(cluster[0].request_address(subnet, "", GW))

    held: dict[str, str] = {}  # ip -> host: who holds what right now
    duplicates: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(HOSTS) * threads_per_host)
    claimed_total = Counter()

    def worker(ipam: Ipam) -> list[str]:
        mine: list[str] = []
        start.wait(10)
        for n in range(requests_per_thread):
            ip = bare(ipam.request_address(subnet, "", None))
            with lock:
                claimed_total[ipam.host] += 1
                if ip in held or ip == gateway:
                    duplicates.append(f"{ip} given to {ipam.host}, held by {held.get(ip, 'the gateway')}")
                held[ip] = ipam.host
            mine.append(ip)
            if n % 4 == 3:
                freed = mine.pop(0)
                with lock:  # out of the book before the store frees it, or a re-claim looks like a duplicate
                    del held[freed]
                ipam.release_address(subnet, freed)
        return mine

    began = time.monotonic()
    with ThreadPoolExecutor(len(HOSTS) * threads_per_host) as pool:
        futures = [pool.submit(worker, ipam) for ipam in cluster for _ in range(threads_per_host)]
        results = [f.result(timeout=120) for f in futures]
    elapsed = time.monotonic() - began

    total = len(HOSTS) * threads_per_host * requests_per_thread
    assert sum(claimed_total.values()) == total
    assert duplicates == [], f"{len(duplicates)} duplicate addresses, e.g. {duplicates[:5]}"
    remaining = [ip for r in results for ip in r]
    assert len(remaining) == len(set(remaining)) == len(held)

    in_store = addresses_in_store(etcd_server, prefix, subnet)
    expected = {ip: {"kind": "container", "host": host} for ip, host in held.items()}
    expected[gateway] = {"kind": "gateway", "host": HOSTS[0]}
    assert in_store == expected, (
        f"store and claims differ: only in store {sorted(set(in_store) - set(expected))[:10]}, "
        f"only claimed {sorted(set(expected) - set(in_store))[:10]}, "
        f"other holder {[ip for ip in set(in_store) & set(expected) if in_store[ip] != expected[ip]][:10]}")
    # Every address is usable and in the subnet.
    net = ipaddress.ip_network(subnet)
    for ip in in_store:
        addr = ipaddress.ip_address(ip)
        assert addr in net and addr not in (net.network_address, net.broadcast_address)
    print(f"\n{total} requests (+{total // 4} releases) from 3 hosts x {threads_per_host} threads "
          f"in {elapsed:.2f}s ({total / elapsed:.0f} claims/s)")


def test_same_explicit_address_raced_by_three_hosts_goes_to_one(etcd_server, prefix, cluster):
    """`docker run --ip X` on three hosts at once, for 60 addresses: each has
    exactly one winner; the losers are told who holds it."""
    subnet = "10.31.0.0/24"
    for ipam in cluster:
        ipam.request_pool(SPACE, subnet, "", False)
    wanted = [f"10.31.0.{i}" for i in range(100, 160)]
    barrier = threading.Barrier(len(HOSTS))
    outcome: dict[str, list] = {ip: [] for ip in wanted}
    lock = threading.Lock()

    def worker(ipam: Ipam) -> None:
        for ip in wanted:
            barrier.wait(10)
            try:
                got = ipam.request_address(subnet, ip, None)
                result = ("won", ipam.host, got)
            except DriverError as e:
                result = ("lost", ipam.host, str(e))
            with lock:
                outcome[ip].append(result)

    with ThreadPoolExecutor(len(HOSTS)) as pool:
        for f in [pool.submit(worker, ipam) for ipam in cluster]:
            f.result(timeout=120)

    in_store = addresses_in_store(etcd_server, prefix, subnet)
    for ip in wanted:
        winners = [r for r in outcome[ip] if r[0] == "won"]
        losers = [r for r in outcome[ip] if r[0] == "lost"]
        assert len(winners) == 1 and len(losers) == 2, f"{ip}: {outcome[ip]}"
        assert winners[0][2] == f"{ip}/24"
        for _, _, message in losers:
            assert "already in use" in message and winners[0][1] in message, message
        assert in_store[ip] == {"kind": "container", "host": winners[0][1]}
    assert set(in_store) == set(wanted)


def test_dynamic_and_explicit_requests_racing_for_a_nearly_full_pool(etcd_server, prefix, cluster):
    """A /27 (29 usable once the gateway is out) asked for 40 times at once,
    dynamic and explicit mixed: 29 distinct addresses handed out, the rest
    refused with "no free address" or "already in use"."""
    subnet = "10.32.0.0/27"
    for ipam in cluster:
        ipam.request_pool(SPACE, subnet, "", False)
    gateway = bare(cluster[1].request_address(subnet, "", GW))
    barrier = threading.Barrier(40)

    def ask(i: int):
        ipam = cluster[i % 3]
        barrier.wait(10)
        try:
            address = f"10.32.0.{i % 30 + 1}" if i % 5 == 0 else ""
            return ipam.host, bare(ipam.request_address(subnet, address, None))
        except DriverError as e:
            return ipam.host, e

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(ask, range(40), timeout=120))
    got = [(host, r) for host, r in results if isinstance(r, str)]
    refused = [str(r) for _, r in results if not isinstance(r, str)]
    ips = [ip for _, ip in got]
    assert len(ips) == len(set(ips)) == 29, f"handed out {sorted(ips)}"
    assert gateway not in ips
    for message in refused:
        assert "no free address left" in message or "already in use" in message or "gateway" in message, message
    in_store = addresses_in_store(etcd_server, prefix, subnet)
    assert {ip: r["host"] for ip, r in in_store.items() if r["kind"] == "container"} == dict(
        (ip, host) for host, ip in got)


def test_pool_and_gateway_are_shared_through_etcd(etcd_server, prefix, cluster):
    a, b, c = cluster
    subnet = "10.33.0.0/24"
    barrier = threading.Barrier(3)

    def join(ipam: Ipam):
        barrier.wait(10)
        pool_id = ipam.request_pool(SPACE, subnet, "", False)
        barrier.wait(10)
        return pool_id, ipam.request_address(pool_id, "", GW)

    # Three engines creating the same network at the same moment.
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(join, cluster, timeout=60))
    assert results == [(subnet, "10.33.0.1/24")] * 3
    keys = raw_keys(etcd_server, prefix)
    pool_record = keys["pools/10.33.0.0_24"]
    assert sorted(pool_record["hosts"]) == sorted(HOSTS) and pool_record["gateway"] == "10.33.0.1"
    assert addresses_in_store(etcd_server, prefix, subnet) == {
        "10.33.0.1": {"kind": "gateway", "host": keys["addresses/10.33.0.0_24/10.33.0.1"]["host"]}}

    # The same pool twice on one host, or an overlapping one anywhere, is refused.
    with pytest.raises(DriverError, match="already used by another pyoverlay network on this host"):
        b.request_pool(SPACE, subnet, "", False)
    with pytest.raises(DriverError, match="overlaps 10.33.0.0/24"):
        c.request_pool(SPACE, "10.33.0.128/25", "", False)
    # Another --gateway for the same overlay is refused, naming the one in use.
    with pytest.raises(DriverError, match="--gateway 10.33.0.1"):
        c.request_address(subnet, "10.33.0.254", GW)
    # The gateway is never handed to a container, asked for or not.
    with pytest.raises(DriverError, match="gateway"):
        a.request_address(subnet, "10.33.0.1", None)
    ips = {bare(h.request_address(subnet, "", None)) for h in cluster}
    assert len(ips) == 3 and "10.33.0.1" not in ips

    # A host frees only its own addresses, never the gateway or another host's.
    b_ip = next(ip for ip, r in addresses_in_store(etcd_server, prefix, subnet).items() if r["host"] == b.host
                and r["kind"] == "container")
    a.release_address(subnet, b_ip)
    a.release_address(subnet, "10.33.0.1")
    assert b_ip in addresses_in_store(etcd_server, prefix, subnet)
    assert "10.33.0.1" in addresses_in_store(etcd_server, prefix, subnet)

    # One host removes the network: the others keep pool, gateway and addresses.
    a.release_pool(subnet)
    keys = raw_keys(etcd_server, prefix)
    assert sorted(keys["pools/10.33.0.0_24"]["hosts"]) == sorted([b.host, c.host])
    assert keys["pools/10.33.0.0_24"]["gateway"] == "10.33.0.1"
    with pytest.raises(DriverError, match="not held by pyoverlay on this host"):
        a.request_address(subnet, "", None)
    assert b.request_address(subnet, "", GW) == "10.33.0.1/24"
    assert bare(c.request_address(subnet, "", None)) not in ips

    # It comes back and joins the same pool and gateway.
    assert a.request_pool(SPACE, subnet, "", False) == subnet
    assert a.request_address(subnet, "", GW) == "10.33.0.1/24"

    # The last holder gone, the pool and every address of it go.
    for ipam in cluster:
        ipam.release_pool(subnet)
    left = [k for k in raw_keys(etcd_server, prefix) if k.startswith(("pools/", "addresses/"))]
    assert left == [], f"keys left after every host released the pool: {left}"
    # And the subnet is free for a new overlay with another gateway.
    c.request_pool(SPACE, subnet, "", False)
    assert c.request_address(subnet, "10.33.0.254", GW) == "10.33.0.254/24"


def test_automatic_pools_requested_at_once_never_collide(etcd_server, prefix, cluster):
    """Networks created without --subnet on three hosts at once: each gets a
    /24 of the default range that no other host got."""
    barrier = threading.Barrier(12)

    def ask(i: int) -> tuple[str, str]:
        ipam = cluster[i % 3]
        barrier.wait(10)
        return ipam.host, ipam.request_pool(SPACE, "", "", False)

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, range(12), timeout=60))
    subnets = [s for _, s in got]
    assert len(set(subnets)) == 12, f"a subnet was handed out twice: {sorted(subnets)}"
    pools = {k: v for k, v in raw_keys(etcd_server, prefix).items() if k.startswith("pools/")}
    assert {v["subnet"]: v["hosts"] for v in pools.values()} == {s: [h] for h, s in got}
