"""Peer sync: store watch -> peer table -> dataplane.

Every host follows the peers/ prefix. The table holds every endpoint of every
overlay; only overlays this host carries are programmed, and only with the
endpoints of other hosts (local ones sit on the bridge already). A snapshot
(at start, after a compaction) reconciles the kernel to the table, removing
whatever the store no longer holds.

An overlay made with -o multicast=true also gets a flood list: the distinct
remote VTEPs with at least one peer on it (a host with no container there has
no receiver). It follows the same watch: a VTEP joins the list with its first
peer on the overlay and leaves it with its last.

An overlay made with -o encap=cross-subnet|never (direct mode) is programmed
from the same table in two parts: remote peers whose host is on this host's
underlay subnet, and the local ones, become routes (dataplane/direct.py); the
rest go to vxlan0 as usual (cross-subnet) or are unreachable (never: logged
once per change). split_direct() makes that split, here and in doctor. Such an
overlay is reprogrammed whole (one dump, then the differences) after each batch
of events.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from typing import Callable, Iterable, NamedTuple, Optional

from .model import Peer
from .state import PEERS, decode_peer
from .store.base import Event, KeyValue, Store
from .background import store_watch

log = logging.getLogger(__name__)


class DirectSplit(NamedTuple):
    local: list[Peer]  # on this host: routed via br0
    routed: list[Peer]  # on this host's underlay subnet: routed via direct0
    vxlan: list[Peer]  # off it, encap=cross-subnet: through vxlan0
    unreachable: list[Peer]  # off it, encap=never


def split_direct(peers: Iterable[Peer], encap: str, host: str, same_subnet: Callable[[str], bool]) -> DirectSplit:
    """A direct-mode overlay's peers, by the path they take from this host (one pass)."""
    split = DirectSplit([], [], [], [])
    for p in peers:
        if p.vtep == host:
            split.local.append(p)
        elif same_subnet(p.vtep):
            split.routed.append(p)
        elif encap == "never":
            split.unreachable.append(p)
        else:
            split.vxlan.append(p)
    return split


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
        # Remote peers per VTEP of each multicast overlay this host carries:
        # the flood list is its keys, kept incrementally as _vteps is.
        self._flood: dict[int, Counter[str]] = {}
        self._told: Optional[frozenset[str]] = None
        self._direct: dict[int, str] = {}  # VNI -> encap, for the direct-mode overlays this host carries
        self._unreachable: dict[int, frozenset[str]] = {}  # encap=never: VTEPs off the underlay subnet
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

    def _flood_list(self, vni: int) -> set[str]:
        return set(self._flood.get(vni, ()))

    def _count_flood(self, vni: int) -> None:
        if vni in self._flood:
            self._flood[vni] = Counter(p.vtep for p in self._remote(vni))

    def _reflood(self, vni: int, peer: Optional[Peer], sign: int) -> None:
        """One remote peer more (sign +1) or less (-1) on a multicast overlay:
        its VTEP enters the flood list with its first peer, leaves with its last."""
        counts = self._flood.get(vni)
        if counts is None or peer is None or peer.vtep == self.vtep:
            return
        counts[peer.vtep] += sign
        if sign > 0 and counts[peer.vtep] == 1:
            self.dataplane.add_flood(vni, peer.vtep)
        elif counts[peer.vtep] <= 0:
            del counts[peer.vtep]
            self.dataplane.remove_flood(vni, peer.vtep)

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

    def unreachable(self, vni: int) -> set[str]:
        """Hosts (VTEPs) with a peer on an encap=never overlay that this host
        cannot reach, as last logged (doctor finds them from the store)."""
        with self._lock:
            return set(self._unreachable.get(vni, ()))

    def _program(self, vni: int) -> tuple[int, int]:
        """The kernel made to match the table for one overlay this host carries."""
        encap = self._direct.get(vni)
        if encap is None:
            return self.dataplane.set_peers(vni, self._remote(vni), self._flood_list(vni))
        split = split_direct(self._table.get(vni, {}).values(), encap, self.vtep, self.dataplane.same_subnet)
        unreachable = frozenset(p.vtep for p in split.unreachable)
        if unreachable != self._unreachable.get(vni, frozenset()):
            if unreachable:
                log.warning("vni %d (encap=never): hosts %s are off this host's underlay subnet %s; their "
                            "containers on it are unreachable from here", vni, ", ".join(sorted(unreachable)),
                            self.dataplane.underlay_subnet())
            self._unreachable[vni] = unreachable
        added, removed = self.dataplane.set_peers(vni, split.vxlan, ())
        d_added, d_removed = self.dataplane.set_direct(vni, split.routed, split.local)
        return added + d_added, removed + d_removed

    def _remote(self, vni: int) -> list[Peer]:
        return [p for p in self._table.get(vni, {}).values() if p.vtep != self.vtep]

    # Driver side: which overlays this host carries.

    def network_added(self, vni: int, multicast: bool = False, encap: str = "") -> None:
        """multicast: the overlay floods broadcast and multicast to every host with a peer on it.
        encap: cross-subnet or never for a direct-mode overlay ("": VXLAN only)."""
        with self._lock:
            if encap:
                self._direct[vni] = encap
            else:
                self._direct.pop(vni, None)
                self._unreachable.pop(vni, None)
            if vni not in self._local:
                self._local.add(vni)
                self._count(vni, +1)
            if multicast:
                self._flood[vni] = Counter()
                self._count_flood(vni)
            else:
                self._flood.pop(vni, None)
            # Before the first snapshot the table is empty: reconciling to it
            # would wipe the entries a restarted plugin finds in the kernel.
            if self.synced.is_set():
                self._reconciled(*self._program(vni))
                self._vteps_changed()

    def network_removed(self, vni: int) -> None:
        with self._lock:
            if vni in self._local:
                self._count(vni, -1)
                self._local.discard(vni)
            self._flood.pop(vni, None)
            self._direct.pop(vni, None)
            self._unreachable.pop(vni, None)
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
                self._count_flood(vni)
            for vni in self._local:
                added, removed = self._program(vni)
                self._reconciled(added, removed)
                if added or removed:
                    log.info("vni %d: reconciled peers (+%d -%d)", vni, added, removed)
            self.synced.set()
            self._vteps_changed()

    def _on_events(self, events: list[Event]) -> None:
        with self._lock:
            dirty: set[int] = set()  # direct-mode overlays to reprogram after the batch
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
                        # The new VTEP first: a peer written again never leaves the list for a moment.
                        self._reflood(vni, peer, +1)
                        self._reflood(vni, old, -1)
                    if vni in self._direct and vni in self._local:
                        dirty.add(vni)
                    elif vni in self._local and peer.vtep != self.vtep and peer != old:
                        self.dataplane.add_peer(vni, peer)
                        if self.metrics is not None:
                            self.metrics.peer_update("add")
                else:
                    peer = peers.pop(endpoint_id, None)
                    if vni in self._local:
                        self._recount(peer, -1)
                        self._reflood(vni, peer, -1)
                    if vni in self._direct and vni in self._local:
                        dirty.add(vni)
                    elif vni in self._local and peer is not None and peer.vtep != self.vtep:
                        self.dataplane.remove_peer(vni, peer)
                        if self.metrics is not None:
                            self.metrics.peer_update("remove")
                        # A twin with its IP or MAC (the address was handed out again while a
                        # stale endpoint still held it) lost its entries with it: put them back.
                        for twin in peers.values():
                            if twin.vtep != self.vtep and (set(twin.ips()) & set(peer.ips()) or twin.mac == peer.mac):
                                self.dataplane.add_peer(vni, twin)
            for vni in sorted(dirty):
                self._reconciled(*self._program(vni))
            self._vteps_changed()
