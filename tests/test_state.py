"""driver/state.py: the one door to the store.

Every reader skips a record that does not decode, logs it once per key and
counts it (pyoverlay_store_bad_records); the watchers (peer sync, address
blocks, names) follow the same rule. In-memory store: no engine, no lock.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import uuid

import pytest
from prometheus_client import generate_latest

from driver import state as state_mod
from driver.blocks import BlockAllocator
from driver.model import Address, Block, Endpoint, Host, LastSeen, NameRecord, Network, Overlay, Pool, SubnetClaim
from driver.names import NameTable
from driver.peersync import PeerSync
from driver.state import State, bad_records
from driver.store import open_store
from plugin.metrics import Metrics
from tests.hosts import wait_for
from tests.test_peersync import RecordingDataplane

HOST = "10.99.0.1"
SUBNET = "10.70.0.0/24"
# Values that are no record: not JSON, JSON but not an object, a field
# missing, a field of the wrong type.
GARBAGE = ["{not json", "[1, 2]", "{}", None]  # None: a good record with one field mistyped


def _good_records(tag: str) -> dict[str, tuple[str, object]]:
    """kind -> (key, record) of a good record under each prefix."""
    ep = Endpoint(endpoint_id="e" + tag, network_id="n" + tag, vni=4100, host=HOST, address="10.70.0.5/24",
                  mac="02:00:0a:46:00:05", vtep=HOST)
    return {
        "networks": (state_mod.network_key("n" + tag), Network("n" + tag, 4100, HOST, 1450, SUBNET)),
        "endpoints": (state_mod.endpoint_key(ep.endpoint_id), ep),
        "peers": (state_mod.peer_key(4100, ep.endpoint_id), ep.peer()),
        "overlays": (state_mod.overlay_key(4100), Overlay(4100, SUBNET, 1450, {HOST: "n" + tag})),
        "subnets": (state_mod.subnet_index_key(SUBNET), SubnetClaim(4100)),
        "pools": (state_mod.pool_key(SUBNET), Pool(SUBNET, [HOST], "10.70.0.1")),
        "addresses": (state_mod.address_key(SUBNET, "10.70.0.5"), Address("container", HOST)),
        "blocks": (state_mod.block_key(SUBNET, "10.70.0.0/28"), Block(HOST, 1.0)),
        "hosts": (state_mod.host_key(HOST), Host(HOST, HOST, 1.0, "test")),
        "seen": (state_mod.seen_key(HOST), LastSeen(HOST, HOST, 2.0)),
    }


def _mistyped(record) -> str:
    """The record with its first field turned into a list (a type no field has)."""
    data = json.loads(record.to_json())
    first = next(iter(data))
    data[first] = [data[first]]
    return json.dumps(data)


def _bad_key(kind: str, n: int) -> str:
    """A key under kind's prefix that readers list alongside the good one."""
    suffix = {
        "peers": f"4100/bad{n}",
        "addresses": f"{state_mod.subnet_key(SUBNET)}/10.70.0.{100 + n}",
        "blocks": f"{state_mod.subnet_key(SUBNET)}/10.70.0.{16 * (n + 1)}_28",
        "subnets": f"10.71.{n}.0_24",
        "overlays": f"{4200 + n}",
    }.get(kind, f"bad{n}")
    return f"{kind}/{suffix}"


def _read_all(st: State) -> dict[str, list]:
    return {
        "networks": st.networks(),
        "endpoints": st.endpoints(),
        "peers": st.peers(),
        "overlays": st.overlays(),
        "pools": st.pools(),
        "addresses": st.addresses(SUBNET),
        "every_address": st.every_address(),
        "blocks": st.blocks(),
        "pool_blocks": st.blocks(SUBNET),
        "hosts": list(st.hosts().values()),
        "seen": list(st.last_seen().values()),
        "claims": [st.subnet_claim(f"10.71.{n}.0/24") for n in range(len(GARBAGE))],  # no list of them
    }


def test_readers_skip_a_bad_record_under_every_prefix_log_it_once_and_count_it(caplog):
    tag = uuid.uuid4().hex[:8]
    store = open_store("memory://")
    st = State(store)
    good = _good_records(tag)
    for key, record in good.values():
        store.put(key, record.to_json())
    bad_keys = {}
    for kind, (_, record) in good.items():
        for n, value in enumerate(GARBAGE):
            key = _bad_key(kind, n)
            store.put(key, value if value is not None else _mistyped(record))
            bad_keys[key] = kind
    before = bad_records()

    with caplog.at_level(logging.WARNING, logger="driver.decoding"):
        first = _read_all(st)
        second = _read_all(st)
        # Single-record readers treat a bad record as absent too.
        assert st.overlay(4200) is None

    # Only the good records come back, twice the same.
    assert first == second
    assert first["networks"] == [good["networks"][1]]
    assert first["endpoints"] == [good["endpoints"][1]]
    assert first["peers"] == [(4100, "e" + tag, good["peers"][1])]
    assert first["overlays"] == [good["overlays"][1]]
    assert first["pools"] == [good["pools"][1]]
    assert [(ip, rec) for ip, rec, _ in first["addresses"]] == [("10.70.0.5", good["addresses"][1])]
    assert first["every_address"] == [(SUBNET, "10.70.0.5")]
    assert [(s, b, rec) for s, b, rec, _ in first["blocks"]] == [(SUBNET, "10.70.0.0/28", good["blocks"][1])]
    assert first["pool_blocks"] == first["blocks"]
    assert first["hosts"] == [good["hosts"][1]]
    assert first["seen"] == [good["seen"][1]]
    assert first["claims"] == [None] * len(GARBAGE)
    assert st.subnet_claim(SUBNET) == good["subnets"][1]

    # Each bad key logged exactly once, though read several times.
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    for key in bad_keys:
        assert sum(f"skipping {key}," in m for m in logged) == 1, (key, logged)
    # And counted once, by kind.
    after = bad_records()
    for kind in good:
        assert after.get(kind, 0) - before.get(kind, 0) == len(GARBAGE), kind


def test_a_mended_record_that_breaks_again_is_logged_again(caplog):
    store = open_store("memory://")
    st = State(store)
    network = Network("n" + uuid.uuid4().hex, 4100, HOST, 1450, SUBNET)
    key = state_mod.network_key(network.network_id)
    with caplog.at_level(logging.WARNING, logger="driver.decoding"):
        store.put(key, "garbage")
        assert st.network(network.network_id) is None
        assert st.network(network.network_id) is None
        store.put(key, network.to_json())
        assert st.network(network.network_id) == network
        store.put(key, "garbage again")
        assert st.network(network.network_id) is None
    assert sum(f"skipping {key}," in r.getMessage() for r in caplog.records) == 2


def test_malformed_keys_are_skipped_as_bad_records():
    store = open_store("memory://")
    st = State(store)
    peer = Endpoint("e1", "n1", 4100, HOST, "10.70.0.5/24", "02:00:0a:46:00:05", HOST).peer()
    store.put("peers/notavni/e1", peer.to_json())
    store.put("peers/4100", peer.to_json())
    store.put("addresses/10.70.0.0_24/not-an-ip", Address("container", HOST).to_json())
    store.put("blocks/garbage/10.70.0.0_28", Block(HOST).to_json())
    assert st.peers() == []
    assert st.every_address() == []
    assert st.blocks() == []


def test_delete_if_unchanged_leaves_a_record_written_meanwhile():
    store = open_store("memory://")
    st = State(store)
    assert st.claim_address(SUBNET, "10.70.0.9", Address("container", HOST))
    [(ip, _, rev)] = st.addresses(SUBNET)
    store.put(state_mod.address_key(SUBNET, ip), Address("container", "10.99.0.2").to_json())
    assert not st.release_address_if_unchanged(SUBNET, ip, rev)
    assert st.address(SUBNET, ip) == Address("container", "10.99.0.2")
    [(_, _, rev)] = st.addresses(SUBNET)
    assert st.release_address_if_unchanged(SUBNET, ip, rev)
    assert st.address(SUBNET, ip) is None


def test_peer_sync_programs_good_peers_past_a_bad_one():
    """The watch does not stall on a record it cannot read, at its snapshot or in an event."""
    store = open_store("memory://")
    good = Endpoint("e" * 64, "n1", 4100, "10.99.0.2", "10.70.0.5/24", "02:00:0a:46:00:05", "10.99.0.2")
    later = Endpoint("f" * 64, "n1", 4100, "10.99.0.2", "10.70.0.6/24", "02:00:0a:46:00:06", "10.99.0.2")
    store.put(state_mod.peer_key(4100, "b" * 64), "{not json")
    store.put(state_mod.peer_key(4100, good.endpoint_id), good.peer().to_json())
    dataplane = RecordingDataplane()
    sync = PeerSync(store, dataplane, vtep=HOST)
    sync.network_added(4100)
    sync.start()
    try:
        wait_for(lambda: ("set", 4100, frozenset({good.peer()}), frozenset()) in dataplane.calls, 10, "the snapshot programmed")
        store.put(state_mod.peer_key(4100, "c" * 64), '{"ip": 1}')
        store.put(state_mod.peer_key(4100, later.endpoint_id), later.peer().to_json())
        wait_for(lambda: ("add", 4100, later.peer()) in dataplane.calls, 10, "the later peer added")
        assert sync.programmed() == 2
    finally:
        sync.stop()


def test_address_blocks_allocate_past_a_bad_address_record():
    store = open_store("memory://")
    store.put(state_mod.address_key(SUBNET, "10.70.0.7"), "{not json")
    blocks = BlockAllocator(store, HOST, lambda net: 28)
    try:
        ip = blocks.allocate(ipaddress.ip_network(SUBNET))
        held = State(store).address(SUBNET, str(ip))
        assert (held.kind, held.host) == ("container", HOST) and held.token
    finally:
        blocks.stop()


def test_names_table_skips_a_bad_name_record():
    store = open_store("memory://")
    good = NameRecord(HOST, "c1", "front", "10.70.0.5", "web")
    store.put(state_mod.name_key(4100, "e1"), good.to_json())
    store.put(state_mod.name_key(4100, "e2"), '{"host": "x"}')
    store.put("names/notavni/e3", good.to_json())
    table = NameTable(store)
    table.start()
    try:
        wait_for(table.synced.is_set, 10, "the names snapshot")
        assert list(table.records().values()) == [good]
    finally:
        table.stop()


def test_metrics_export_the_bad_record_count():
    store = open_store("memory://")
    store.put(state_mod.pool_key("10.72.0.0/24"), "{not json")
    State(store).pools()
    text = generate_latest(Metrics().registry).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('pyoverlay_store_bad_records_total{record="pools"}'))
    assert float(line.split()[-1]) >= 1


@pytest.mark.parametrize("value", ["{not json", "[]", "{}"])
def test_update_treats_a_bad_record_as_absent_and_rewrites_it(value):
    """A read-modify-write over a bad record replaces it (compare-and-set on its revision)."""
    store = open_store("memory://")
    st = State(store)
    store.put(state_mod.pool_key(SUBNET), value)
    pool = st.update_pool(SUBNET, lambda current: current or Pool(SUBNET, [HOST]))
    assert st.pool(SUBNET) == pool == Pool(SUBNET, [HOST])


def test_a_bad_gateway_record_is_refused_clearly_and_left_for_the_operator():
    from driver.errors import DriverError
    from driver.ipam import GATEWAY_REQUEST, REQUEST_ADDRESS_TYPE, Ipam

    store = open_store("memory://")
    ipam = Ipam(State(store), HOST)
    try:
        pool_id = ipam.request_pool("pyoverlay", SUBNET, "", False)
        store.put(state_mod.address_key(SUBNET, "10.70.0.1"), "{not json")
        with pytest.raises(DriverError, match="unreadable record for gateway 10.70.0.1"):
            ipam.request_address(pool_id, "", {REQUEST_ADDRESS_TYPE: GATEWAY_REQUEST})
        assert store.get(state_mod.address_key(SUBNET, "10.70.0.1")).value == "{not json"
    finally:
        ipam.close()


def test_addresses_in_a_block_are_read_without_the_rest_of_the_pool():
    """State.addresses_in: every claimed address inside the block, none outside,
    from lists of a few key prefixes (keys are dotted decimal: a block is no one
    key range). Random blocks of random pools; the seed is printed."""
    from tests.seed import rng

    r = rng("test_addresses_in_a_block_are_read_without_the_rest_of_the_pool")
    for _ in range(40):
        plen = r.randint(16, 24)
        pool = ipaddress.ip_network((r.getrandbits(32) >> (32 - plen) << (32 - plen), plen))
        size = r.randint(max(plen, 20), 30)
        block = next(pool.subnets(new_prefix=size)) if r.random() < 0.2 else \
            ipaddress.ip_network((int(pool.network_address) + r.randrange(pool.num_addresses >> (32 - size))
                                  * (1 << (32 - size)), size))
        store = open_store("memory://")
        st = State(store)
        near = range(max(int(pool.network_address), int(block.network_address) - 300),
                     min(int(pool.broadcast_address), int(block.broadcast_address) + 300) + 1)
        claimed = {str(ipaddress.ip_address(i)) for i in r.sample(near, min(len(near), 200))}
        for ip in claimed:
            st.claim_address(str(pool), ip, Address.container(HOST))
        reads = []
        real_list = store.list
        store.list = lambda prefix: reads.append(prefix) or real_list(prefix)
        got = {ip for ip, _, _ in st.addresses_in(str(pool), str(block))}
        assert got == {ip for ip in claimed if ipaddress.ip_address(ip) in block}, (pool, block)
        prefixes = state_mod.ip_key_prefixes(block)
        assert prefixes is not None and len(reads) == len(prefixes) <= 16, (block, reads)
    # A block spanning more /24s than that is read as the whole pool, still filtered.
    assert state_mod.ip_key_prefixes(ipaddress.ip_network("10.0.0.0/16")) is None
