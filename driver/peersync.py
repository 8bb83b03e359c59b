"""Peer sync: store watch -> peer table -> dataplane.

Every host follows the peers/ prefix. The table holds every endpoint of every
overlay; only overlays this host carries are programmed, and only with the
endpoints of other hosts (local ones sit on the bridge already). A snapshot
(at start, after a compaction) reconciles the kernel to the table, removing
whatever the store no longer holds.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from typing import Callable, Optional

from .model import Peer
from .state import PEERS, decode_peer
from .store.base import Event, KeyValue, Store
from .background import store_watch

log = logging.getLogger(__name__)


class PeerSync:
    def __init__(self, store: Store, dataplane, vtep: str, metrics=None):
        self.store = store
        self.dataplane = dataplane
        self.vtep = vtep
        # Told the remote VTEPs of the overlays this host carries whenever they
        # may have changed (driver/dataplane/firewall.py's VXLAN source filter).
        self.on_vteps: Optional[Callable[[set[str]], None]] = None
        # Optional: peer_update(op), reconciled(added, removed), watch_error(watch, exc).
        self.metrics = metrics
        self._table: defaultdict[int, dict[str, Peer]] = defaultdict(dict)
        self._local: set[int] = set()
        self._restored = False  # the driver has named every overlay this host carries
        # Remote peers per VTEP over the overlays this host carries, kept
        # incrementally so that an event costs the same at 10 or 10,000 peers.
        self._vteps: Counter[str] = Counter()
        self._told: Optional[frozenset[str]] = None
        self._lock = threading.Lock()
        self.synced = threading.Event()  # set after the first snapshot is applied
        self._watch = store_watch("peers", "peer-sync", store, PEERS, self._on_snapshot, self._on_events, metrics)

    def start(self) -> None:
        self._watch.start()

    def stop(self) -> None:
        self._watch.stop()

    def programmed(self) -> int:
        """Remote peers this host programs (for metrics)."""
        with self._lock:
            return sum(len(self._remote(vni)) for vni in self._local)

    def _reconciled(self, added: int, removed: int) -> None:
        if self.metrics is not None:
            self.metrics.reconciled(added, removed)

    def _count(self, vni: int, sign: int) -> None:
        for peer in self._remote(vni):
            self._vteps[peer.vtep] += sign
        self._vteps += Counter()  # drop VTEPs down to zero

    def _recount(self, peer: Optional[Peer], sign: int) -> None:
        if peer is not None and peer.vtep != self.vtep:
            self._vteps[peer.vtep] += sign
            if self._vteps[peer.vtep] <= 0:
                del self._vteps[peer.vtep]

    def _vteps_changed(self) -> None:
        # With the lock held and the table read from the store. Not before the
        # driver has named every overlay it carries: a partial set would shut
        # out live peers for a moment at every restart.
        if self.on_vteps is None or not self.synced.is_set() or not self._restored:
            return
        vteps = frozenset(self._vteps)
        if vteps != self._told:
            self.on_vteps(set(vteps))
            self._told = vteps

    def _remote(self, vni: int) -> list[Peer]:
        return [p for p in self._table.get(vni, {}).values() if p.vtep != self.vtep]

    # Driver side: which overlays this host carries.

    def network_added(self, vni: int) -> None:
        with self._lock:
            if vni not in self._local:
                self._local.add(vni)
                self._count(vni, +1)
            # Before the first snapshot the table is empty: reconciling to it
            # would wipe the entries a restarted plugin finds in the kernel.
            if self.synced.is_set():
                self._reconciled(*self.dataplane.set_peers(vni, self._remote(vni)))
                self._vteps_changed()

    def network_removed(self, vni: int) -> None:
        with self._lock:
            if vni in self._local:
                self._count(vni, -1)
                self._local.discard(vni)
            self._vteps_changed()

    def restored(self) -> None:
        with self._lock:
            self._restored = True
            self._vteps_changed()

    # Store side.

    def _on_snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        table: defaultdict[int, dict[str, Peer]] = defaultdict(dict)
        for kv in kvs:
            entry = decode_peer(kv.key, kv.value)
            if entry is not None:  # else skipped (logged once, counted by state.py)
                vni, endpoint_id, peer = entry
                table[vni][endpoint_id] = peer
        with self._lock:
            self._table = table
            self._vteps = Counter()
            for vni in self._local:
                self._count(vni, +1)
            for vni in self._local:
                added, removed = self.dataplane.set_peers(vni, self._remote(vni))
                self._reconciled(added, removed)
                if added or removed:
                    log.info("vni %d: reconciled peers (+%d -%d)", vni, added, removed)
            self.synced.set()
            self._vteps_changed()

    def _on_events(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                entry = decode_peer(event.key, event.value if event.kind == "put" else None)
                if entry is None:
                    continue  # skipped (logged once, counted by state.py)
                vni, endpoint_id, peer = entry
                peers = self._table[vni]
                if event.kind == "put":
                    old = peers.get(endpoint_id)
                    peers[endpoint_id] = peer
                    if vni in self._local:
                        self._recount(old, -1)
                        self._recount(peer, +1)
                    if vni in self._local and peer.vtep != self.vtep and peer != old:
                        self.dataplane.add_peer(vni, peer)
                        if self.metrics is not None:
                            self.metrics.peer_update("add")
                else:
                    peer = peers.pop(endpoint_id, None)
                    if vni in self._local:
                        self._recount(peer, -1)
                    if vni in self._local and peer is not None and peer.vtep != self.vtep:
                        self.dataplane.remove_peer(vni, peer)
                        if self.metrics is not None:
                            self.metrics.peer_update("remove")
                        # A twin with its IP or MAC (the address was handed out again while a
                        # stale endpoint still held it) lost its entries with it: put them back.
                        for twin in peers.values():
                            if twin.vtep != self.vtep and (twin.ip == peer.ip or twin.mac == peer.mac):
                                self.dataplane.add_peer(vni, twin)
            self._vteps_changed()
