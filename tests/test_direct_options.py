"""-o encap=... at the driver: accepted, fixed when made, refused where it does
not fit, with nothing changed (recording stand-ins, no kernel)."""

from __future__ import annotations

import pytest

from driver.errors import DriverError
from driver.network import NetworkDriver
from driver.state import State
from driver.store import open_store
from tests.test_network import HOST, POOL, VNI, RecordingKernel, RecordingPeers, _keys

NET, NET2 = "n" * 64, "m" * 64
POOL6 = [{"AddressSpace": "pyoverlay", "Pool": "fd00:40::/64"}]


class Peers(RecordingPeers):
    def network_added(self, vni, multicast=False, encap=""):
        self.calls.append(("added", vni, multicast, encap))


@pytest.fixture
def world():
    store = open_store("memory://")
    kernel, peers = RecordingKernel(), Peers()
    driver = NetworkDriver(State(store), kernel, peers, host=HOST, vtep=HOST)
    other = NetworkDriver(State(store), RecordingKernel(), Peers(), host="10.9.0.2", vtep="10.9.0.2")
    yield store, kernel, peers, driver, other
    store.close()


def opts(**o):
    return {"com.docker.network.generic": o}


@pytest.mark.parametrize("encap, mtu", [("never", 1500), ("cross-subnet", 1450)])
def test_direct_network_gets_its_macvlan_and_tells_peer_sync(world, encap, mtu):
    """The MTU: with never nothing is encapsulated, so the underlay's own;
    cross-subnet still sends some hosts VXLAN, so 50 bytes less."""
    store, kernel, peers, driver, _ = world
    driver.create_network(NET, opts(encap=encap), POOL, [])
    assert kernel.calls == [("underlay_mtu",), ("create_network", VNI, mtu), ("create_direct", VNI)]
    assert peers.calls == [("added", VNI, False, encap)]
    assert driver.state.overlay(VNI).encap == encap


def test_always_is_the_default_and_stays_out_of_the_record(world):
    store, kernel, peers, driver, _ = world
    driver.create_network(NET, opts(encap="always"), POOL, [])
    assert ("create_direct", VNI) not in kernel.calls
    assert "encap" not in store.get(f"overlays/{VNI}").value  # older hosts read it byte for byte
    assert driver.state.overlay(VNI).encap == ""


@pytest.mark.parametrize("options, ipv6, says", [
    (opts(encap="sometimes"), [], "-o encap=sometimes is not valid: use -o encap=always"),
    (opts(encap="never", multicast="true"), [], "cannot flood broadcast and multicast: leave out -o multicast=true"),
    (opts(encap="cross-subnet", encrypted="true"), [], "cannot be encrypted: leave out -o encrypted=true"),
    ({**opts(encap="never"), "com.docker.network.enable_ipv6": True}, POOL6, "routes IPv4 only: leave out --ipv6"),
])
def test_what_does_not_fit_is_refused_and_changes_nothing(world, options, ipv6, says):
    store, kernel, peers, driver, _ = world
    with pytest.raises(DriverError, match=says.replace(".", r"\.").replace("+", r"\+")):
        driver.create_network(NET, options, POOL, ipv6)
    assert [c for c in kernel.calls if c[0] != "underlay_mtu"] == []
    assert peers.calls == [] and _keys(store) == []


def test_fixed_when_made_another_host_must_agree(world):
    store, kernel, peers, driver, other = world
    driver.create_network(NET, opts(encap="never"), POOL, [])
    before = _keys(store)
    with pytest.raises(DriverError, match="was made with -o encap=never on other hosts; use -o encap=never or "
                                          "leave the option out"):
        other.create_network(NET2, opts(encap="always"), POOL, [])
    assert _keys(store) == before
    other.create_network(NET2, {}, POOL, [])  # leaving it out joins the overlay as made, MTU included
    assert other.peers.calls == [("added", VNI, False, "never")]
    assert ("create_network", VNI, 1500) in other.dataplane.calls
    assert other.dataplane.calls[-1] == ("create_direct", VNI)


def test_restore_makes_the_macvlan_again(world):
    store, kernel, peers, driver, _ = world
    driver.create_network(NET, opts(encap="cross-subnet"), POOL, [])
    kernel.calls.clear()
    peers.calls.clear()
    driver.restore()
    assert ("create_direct", VNI) in kernel.calls
    assert ("added", VNI, False, "cross-subnet") in peers.calls


class DirectRecorder:
    """Peer sync's view of a direct-mode dataplane: the underlay is 10.99.0.0/24."""

    def __init__(self):
        self.calls: list[tuple] = []

    def same_subnet(self, vtep):
        return vtep.startswith("10.99.0.")

    def underlay_subnet(self):
        return "10.99.0.0/24"

    def set_peers(self, vni, peers, flood=()):
        self.calls.append(("vxlan", vni, frozenset(p.ip for p in peers)))
        return 0, 0

    def set_direct(self, vni, remote, local):
        self.calls.append(("direct", vni, frozenset(p.ip for p in remote), frozenset(p.ip for p in local)))
        return 0, 0


@pytest.mark.parametrize("encap, vxlan", [("cross-subnet", {"10.20.0.3"}), ("never", set())])
def test_peer_sync_splits_peers_by_underlay_subnet(encap, vxlan):
    from driver.model import Peer
    from driver.peersync import PeerSync
    from driver.state import peer_key
    from tests.hosts import wait_for

    store = open_store("memory://")
    dataplane = DirectRecorder()
    sync = PeerSync(store, dataplane, vtep="10.99.0.1")
    sync.start()
    try:
        assert sync.synced.wait(5)
        sync.network_added(5000, encap=encap)
        for i, vtep in ((1, "10.99.0.1"), (2, "10.99.0.2"), (3, "10.98.0.3")):
            store.put(peer_key(5000, f"e{i}" * 32), Peer(ip=f"10.20.0.{i}", mac=f"02:50:0a:14:00:0{i}",
                                                         vtep=vtep).to_json())
        want = ("direct", 5000, frozenset({"10.20.0.2"}), frozenset({"10.20.0.1"}))
        wait_for(lambda: dataplane.calls[-1:] == [want], 5, "the three peers split")
        assert dataplane.calls[-2] == ("vxlan", 5000, frozenset(vxlan))
        assert sync.unreachable(5000) == ({"10.98.0.3"} if encap == "never" else set())
    finally:
        sync.stop()
        store.close()
