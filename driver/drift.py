"""Store vs kernel on one host: what is missing, stale or set differently.

One pure function over plain data, so the two places that ask the question
answer it the same way: NetworkDriver.restore applies the result at start-up
(stale namespaces and veths deleted, missing namespaces made; peers are peer
sync's to reconcile), and `pyoverlay doctor` reports it without repairing.
The callers build the views (store reads, Dataplane reads); nothing here does
I/O. The shape follows Dataplane.set_peers: read both sides, diff, then act.

What is compared is what the kernel view carries: a VNI missing from
``veths``, ``peers``, ``flood`` or ``vxlan`` was not read, and yields no drift there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from driver.model import Peer


@dataclass(frozen=True)
class VxlanSettings:
    """What an overlay's vxlan device carries that must match this host's flags."""

    vni: int
    port: int
    vtep: str


@dataclass
class StoreView:
    """What the store says this host should have."""

    networks: set[int]  # VNIs of the networks this host carries
    endpoints: dict[int, set[str]] = field(default_factory=dict)  # VNI -> endpoint_id[:10] of this host's
    peers: dict[int, set[Peer]] = field(default_factory=dict)  # VNI -> peer records (any host)
    vtep: str = ""  # this host's underlay address: its own peers are never programmed
    vxlan_port: int = 0  # the UDP port every vxlan device should use
    multicast: set[int] = field(default_factory=set)  # VNIs made with -o multicast=true: they flood


@dataclass
class KernelView:
    """What the kernel holds (only the VNIs that were read)."""

    namespaces: set[int]  # VNIs with an overlay namespace
    veths: dict[int, set[str]] = field(default_factory=dict)  # VNI -> endpoint_id[:10] of each veth
    peers: dict[int, set[Peer]] = field(default_factory=dict)  # VNI -> FDB/neighbour entries
    flood: dict[int, set[str]] = field(default_factory=dict)  # VNI -> VTEPs of the all-zero FDB entry
    vxlan: dict[int, Optional[VxlanSettings]] = field(default_factory=dict)  # None: no vxlan device


@dataclass
class Drift:
    missing_namespaces: list[int] = field(default_factory=list)
    stale_namespaces: list[int] = field(default_factory=list)
    stale_veths: dict[int, list[str]] = field(default_factory=dict)  # veths no endpoint owns
    missing_veths: dict[int, list[str]] = field(default_factory=dict)  # endpoints without a veth (yet)
    missing_peers: dict[int, list[Peer]] = field(default_factory=dict)
    stale_peers: dict[int, list[Peer]] = field(default_factory=dict)
    missing_flood: dict[int, list[str]] = field(default_factory=dict)  # VTEPs a multicast overlay must flood to
    stale_flood: dict[int, list[str]] = field(default_factory=dict)  # VTEPs flooded to that should not be
    vxlan: dict[int, tuple[Optional[VxlanSettings], VxlanSettings]] = field(default_factory=dict)  # (found, wanted)

    def __bool__(self) -> bool:
        return any((self.missing_namespaces, self.stale_namespaces, self.stale_veths, self.missing_veths,
                    self.missing_peers, self.stale_peers, self.missing_flood, self.stale_flood, self.vxlan))


def flood_list(peers, vtep: str) -> set[str]:
    """The VTEPs a multicast overlay floods to: every other host with a peer on it."""
    return {p.vtep for p in peers if p.vtep != vtep}


def _peer_key(p: Peer) -> tuple[str, str, str, str]:
    return (p.ip, p.mac, p.vtep, p.ip6)


def _lower(p: Peer) -> Peer:
    # The kernel reports MACs in lower case; the engine may hand them in upper.
    return replace(p, mac=p.mac.lower())


def drift(store: StoreView, kernel: KernelView) -> Drift:
    found = Drift(
        missing_namespaces=sorted(store.networks - kernel.namespaces),
        stale_namespaces=sorted(kernel.namespaces - store.networks),
    )
    for vni in sorted(store.networks & kernel.namespaces):
        if vni in kernel.veths:
            known, veths = store.endpoints.get(vni, set()), kernel.veths[vni]
            if veths - known:
                found.stale_veths[vni] = sorted(veths - known)
            if known - veths:
                found.missing_veths[vni] = sorted(known - veths)
        if vni in kernel.peers:
            want = {_lower(p) for p in store.peers.get(vni, ()) if p.vtep != store.vtep}
            have = {_lower(p) for p in kernel.peers[vni]}
            if want - have:
                found.missing_peers[vni] = sorted(want - have, key=_peer_key)
            if have - want:
                found.stale_peers[vni] = sorted(have - want, key=_peer_key)
        if vni in kernel.flood:
            want_flood = flood_list(store.peers.get(vni, ()), store.vtep) if vni in store.multicast else set()
            have_flood = kernel.flood[vni]
            if want_flood - have_flood:
                found.missing_flood[vni] = sorted(want_flood - have_flood)
            if have_flood - want_flood:
                found.stale_flood[vni] = sorted(have_flood - want_flood)
    for vni, settings in sorted(kernel.vxlan.items()):
        wanted = VxlanSettings(vni=vni, port=store.vxlan_port, vtep=store.vtep)
        if settings != wanted:
            found.vxlan[vni] = (settings, wanted)
    return found
