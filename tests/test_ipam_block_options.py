"""-o block_size, the block metrics and the status section, through the real
app (tests/conftest.py's plugin: real dataplane in a throw-away namespace,
in-memory store)."""

from __future__ import annotations

import ipaddress
import json

from driver.blocks import default_block_size
from driver.ipam import GATEWAY_REQUEST, Ipam
from driver.network import NetworkDriver
from driver.state import State
from driver.store import open_store
from ops.commands import collect_status, render_status
from plugin.metrics import Metrics
from tests.test_protocol import make_endpoint, make_network


def blocks(store) -> dict[str, str]:
    return {kv.key.rsplit("/", 1)[1].replace("_", "/"): json.loads(kv.value)["host"]
            for kv in store.list("blocks/")[0]}


def test_block_size_option_is_stored_with_the_overlay_and_used(plugin):
    network_id, pool_id, _ = make_network(plugin, options={"block_size": "29"})
    (overlay,) = [json.loads(kv.value) for kv in plugin.store.list("overlays/")[0]]
    assert overlay["block_size"] == 29
    addresses = [make_endpoint(plugin, network_id, pool_id)[1] for _ in range(8)]
    held = blocks(plugin.store)
    assert {ipaddress.ip_network(b).prefixlen for b in held} == {29} and len(held) == 2
    assert all(any(ipaddress.ip_interface(a).ip in ipaddress.ip_network(b) for b in held) for a in addresses)


def test_default_block_sizes():
    sizes = {p: default_block_size(ipaddress.ip_network(f"10.0.0.0/{p}")) for p in (8, 16, 22, 24, 26, 30)}
    assert sizes == {8: 26, 16: 26, 22: 26, 24: 28, 26: 30, 30: 30}


class _Kernel:
    """What NetworkDriver.create_network asks of the dataplane, nothing more."""

    def underlay_mtu(self) -> int:
        return 1500

    def create_network(self, vni, mtu) -> None:
        pass


class _Peers:
    def network_added(self, vni, multicast=False) -> None:
        pass


def test_other_hosts_must_not_ask_for_another_block_size():
    store = open_store("memory://")
    drivers = [NetworkDriver(State(store), _Kernel(), _Peers(), host=h, vtep=h) for h in ("10.9.0.1", "10.9.0.2")]
    data = [{"AddressSpace": "pyoverlay", "Pool": "10.40.0.0/16"}]
    drivers[0].create_network("a" * 64, {"com.docker.network.generic": {"block_size": "24"}}, data, [])
    try:
        drivers[1].create_network("b" * 64, {"com.docker.network.generic": {"block_size": "26"}}, data, [])
    except Exception as e:
        assert "uses address blocks of /24 on other hosts; use -o block_size=24" in str(e)
    else:
        raise AssertionError("a second host got another block size")
    drivers[1].create_network("b" * 64, {"com.docker.network.generic": {}}, data, [])  # leaving it out is fine
    ipam = Ipam(State(store), "10.9.0.2")
    try:
        assert ipam.block_size(ipaddress.ip_network("10.40.0.0/16")) == 24
    finally:
        ipam.close()


def test_metrics_count_block_claims_and_borrows_and_status_shows_blocks():
    store = open_store("memory://")
    metrics = Metrics()
    from driver.model import Host

    for h in ("10.9.0.1", "10.9.0.2"):  # both alive: neither may take over the other's blocks
        store.put(f"hosts/{h}", Host(host=h, vtep=h, started=0.0).to_json())
    a, b = (Ipam(State(store), h, metrics=metrics if h.endswith("2") else None) for h in ("10.9.0.1", "10.9.0.2"))
    try:
        for ipam in (a, b):
            ipam.request_pool("pyoverlay", "10.50.0.0/28", "", False)
            ipam.request_address("10.50.0.0/28", "", {"RequestAddressType": GATEWAY_REQUEST})
        # A /28 in /30 blocks (the default): 13 usable addresses, a holds three blocks.
        for _ in range(8):
            a.request_address("10.50.0.0/28", "", None)
        got = [b.request_address("10.50.0.0/28", "", None) for _ in range(5)]  # the last block, then borrows
        assert len(set(got)) == 5
        events = {s.labels["event"]: s.value for m in metrics.registry.collect() if m.name == "pyoverlay_ipam_events"
                  for s in m.samples if s.name.endswith("_total")}
        (own,) = [blk for blk, h in blocks(store).items() if h == "10.9.0.2"]
        inside = sum(ipaddress.ip_address(ip.split("/")[0]) in ipaddress.ip_network(own) for ip in got)
        assert inside in (3, 4) and events.get("block_claim") == 1 and events.get("borrow") == 5 - inside, events
        status = collect_status(store)
        mine = [r for r in status["blocks"] if r["host"] == "10.9.0.2"]
        assert [(r["block"], r["used"], r["size"]) for r in mine] == [(own, inside, 4)]
        text = render_status(status)
        assert "ADDRESS BLOCKS" in text and f"10.9.0.2  1       {inside} of 4" in text
    finally:
        a.close()
        b.close()


def test_restore_never_frees_an_address_this_process_claimed():
    """Restore runs in the background at start and frees container addresses
    of this host that no endpoint uses (a crash between claim and answer). An
    address claimed by a request answered meanwhile is not such an orphan:
    freeing it would hand it out twice."""
    from driver.model import Address
    from driver.state import address_key

    store = open_store("memory://")
    state = State(store)
    host = "10.9.0.1"
    ipam = Ipam(state, host)
    driver = NetworkDriver(state, _Kernel(), _Peers(), host=host, vtep=host)
    driver.claims_from = ipam.claims_from
    driver.release_unused = ipam.release_unused
    try:
        ipam.request_pool("pyoverlay", "10.60.0.0/24", "", False)
        state.create({address_key("10.60.0.0/24", "10.60.0.200"): Address(kind="container", host=host)})  # a crash's leftover
        fresh = ipam.request_address("10.60.0.0/24", "", None).split("/")[0]  # answered before restore got there
        assert driver._release_orphan_addresses() == 1
        left = {kv.key.rsplit("/", 1)[1] for kv in store.list("addresses/")[0]}
        assert left == {fresh}
    finally:
        ipam.close()
