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

    def set_peers(self, vni, peers):
        self.calls.append(("set", vni, frozenset(peers)))
        return 0, 0

    def add_peer(self, vni, peer):
        self.calls.append(("add", vni, peer))

    def remove_peer(self, vni, peer):
        self.calls.append(("remove", vni, peer))


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
        assert dataplane.calls == [("set", 5000, frozenset({remote}))]

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
