"""Peer sync against an in-memory store, with a recording stand-in for the
dataplane (the real one is exercised in test_protocol, test_isolation and e2e)."""

from __future__ import annotations

from driver.model import Peer
from driver.peersync import PeerSync
from driver.state import peer_key
from driver.store import open_store
from tests.hosts import wait_for

LOCAL, REMOTE = "10.99.0.1", "10.99.0.2"


class RecordingDataplane:
    def __init__(self):
        self.calls: list[tuple] = []

    def set_peers(self, vni, peers, flood=()):
        self.calls.append(("set", vni, frozenset(peers), frozenset(flood)))
        return 0, 0

    def add_peer(self, vni, peer):
        self.calls.append(("add", vni, peer))

    def remove_peer(self, vni, peer):
        self.calls.append(("remove", vni, peer))

    def add_flood(self, vni, vtep):
        self.calls.append(("flood+", vni, vtep))

    def remove_flood(self, vni, vtep):
        self.calls.append(("flood-", vni, vtep))


def test_the_stand_in_offers_what_peer_sync_asks_of_the_real_dataplane():
    """No type checker runs in CI: the stand-in's methods must be the real
    Dataplane's, with the same parameters."""
    import inspect

    from driver.dataplane import Dataplane

    for name in ("set_peers", "add_peer", "remove_peer", "add_flood", "remove_flood"):
        real, standin = (list(inspect.signature(getattr(cls, name)).parameters)
                         for cls in (Dataplane, RecordingDataplane))
        assert standin == real, f"{name}: {standin} != {real}"


def test_restart_never_narrows_the_vtep_filter_or_wipes_peers():
    """A restarted plugin must not tell the firewall (or the kernel) about a
    partial world: until the driver has named its overlays, nothing is sent."""
    store = open_store("memory://")
    remote = Peer(ip="10.20.0.9", mac="02:50:0a:14:00:09", vtep=REMOTE)
    store.put(peer_key(5000, "e" * 64), remote.to_json())
    dataplane, told = RecordingDataplane(), []
    sync = PeerSync(store, dataplane, vtep=LOCAL)
    sync.on_vteps = told.append
    sync.start()
    try:
        assert sync.synced.wait(5)
        assert told == [] and dataplane.calls == []  # the driver has not restored yet
        sync.network_added(5000)
        sync.restored()
        assert told == [{REMOTE}]
        assert dataplane.calls == [("set", 5000, frozenset({remote}), frozenset())]

        # A second endpoint behind the same VTEP changes the kernel, not the filter.
        other = Peer(ip="10.20.0.10", mac="02:50:0a:14:00:0a", vtep=REMOTE)
        store.put(peer_key(5000, "f" * 64), other.to_json())
        wait_for(lambda: ("add", 5000, other) in dataplane.calls, 5, "the second peer")
        store.delete(peer_key(5000, "e" * 64))
        wait_for(lambda: ("remove", 5000, remote) in dataplane.calls, 5, "the first peer to go")
        assert told == [{REMOTE}]

        store.delete(peer_key(5000, "f" * 64))
        wait_for(lambda: told[-1] == set(), 5, "the VTEP to leave the filter")
        assert told == [{REMOTE}, set()]
    finally:
        sync.stop()
        store.close()


def test_removing_a_stale_twin_puts_the_live_peers_entries_back():
    """Two peers with one IP and MAC (a stale endpoint's address handed out again):
    removing the stale one removes that IP's and MAC's kernel entries, so the live
    one is programmed again, and reachable."""
    store = open_store("memory://")
    stale = Peer(ip="10.20.0.9", mac="02:50:0a:14:00:09", vtep=REMOTE)
    live = Peer(ip="10.20.0.9", mac="02:50:0a:14:00:09", vtep="10.99.0.3")
    store.put(peer_key(5000, "e" * 64), stale.to_json())
    store.put(peer_key(5000, "f" * 64), live.to_json())
    dataplane = RecordingDataplane()
    sync = PeerSync(store, dataplane, vtep=LOCAL)
    sync.start()
    try:
        assert sync.synced.wait(5)
        sync.network_added(5000)
        sync.restored()
        store.delete(peer_key(5000, "e" * 64))
        wait_for(lambda: ("remove", 5000, stale) in dataplane.calls, 5, "the stale peer to go")
        removed = dataplane.calls.index(("remove", 5000, stale))
        assert ("add", 5000, live) in dataplane.calls[removed:], dataplane.calls
    finally:
        sync.stop()
        store.close()


def test_a_multicast_overlay_floods_to_each_remote_host_with_a_peer_on_it():
    """The flood list is the distinct remote VTEPs with at least one peer on
    the overlay: it grows with a host's first container and shrinks with its
    last, and an overlay without the option never floods."""
    store = open_store("memory://")
    other = "10.99.0.3"
    a1 = Peer(ip="10.20.0.9", mac="02:50:0a:14:00:09", vtep=REMOTE)
    store.put(peer_key(5000, "a1" * 32), a1.to_json())
    store.put(peer_key(5000, "l1" * 32), Peer(ip="10.20.0.2", mac="02:50:0a:14:00:02", vtep=LOCAL).to_json())
    store.put(peer_key(6000, "x1" * 32), Peer(ip="10.30.0.9", mac="02:50:0a:1e:00:09", vtep=other).to_json())
    dataplane = RecordingDataplane()
    sync = PeerSync(store, dataplane, vtep=LOCAL)
    sync.start()
    try:
        assert sync.synced.wait(5)
        sync.network_added(5000, multicast=True)
        sync.network_added(6000)
        sync.restored()
        assert ("set", 5000, frozenset({a1}), frozenset({REMOTE})) in dataplane.calls, "this host's own VTEP never"
        assert dataplane.calls[-1][3] == frozenset(), "VNI 6000 has no option: no flood list"

        dataplane.calls.clear()
        a2 = Peer(ip="10.20.0.10", mac="02:50:0a:14:00:0a", vtep=REMOTE)
        b1 = Peer(ip="10.20.0.11", mac="02:50:0a:14:00:0b", vtep=other)
        store.put(peer_key(5000, "a2" * 32), a2.to_json())  # REMOTE's second: no change to the list
        store.put(peer_key(5000, "b1" * 32), b1.to_json())  # another host's first: it joins
        store.put(peer_key(6000, "x2" * 32), Peer(ip="10.30.0.10", mac="02:50:0a:1e:00:0a", vtep=REMOTE).to_json())
        wait_for(lambda: ("add", 5000, b1) in dataplane.calls, 5, "the third peer")
        wait_for(lambda: ("add", 6000, Peer(ip="10.30.0.10", mac="02:50:0a:1e:00:0a", vtep=REMOTE))
                 in dataplane.calls, 5, "the peer on the other overlay")
        assert [c for c in dataplane.calls if c[0].startswith("flood")] == [("flood+", 5000, other)]

        dataplane.calls.clear()
        store.put(peer_key(5000, "a1" * 32), a1.to_json())  # written again: stays in the list throughout
        store.delete(peer_key(5000, "a1" * 32))  # REMOTE still has a2
        store.delete(peer_key(5000, "b1" * 32))  # the other host's last: it leaves
        wait_for(lambda: ("remove", 5000, b1) in dataplane.calls, 5, "the third peer to go")
        assert [c for c in dataplane.calls if c[0].startswith("flood")] == [("flood-", 5000, other)]

        # A snapshot (a restart, a compaction) reconciles the flood list with the rest.
        dataplane.calls.clear()
        sync.stop()
        restarted = PeerSync(store, dataplane, vtep=LOCAL)
        restarted.start()
        assert restarted.synced.wait(5)
        restarted.network_added(5000, multicast=True)
        assert dataplane.calls[-1] == ("set", 5000, frozenset({a2}), frozenset({REMOTE}))
        restarted.stop()
    finally:
        sync.stop()
        store.close()
