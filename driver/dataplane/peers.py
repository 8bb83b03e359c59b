"""Peers: vxlan0's FDB and neighbour table (moby's peerdb.go, the kernel half).

VXLAN and ARP: no multicast in the underlay, and no flooding unless the
network asks for it (-o multicast=true, below). vxlan0 has learning off and ARP
proxy on. A container's ARP request reaches vxlan0 through br0; the vxlan
device answers it locally from its neighbour table (one permanent entry per
remote IP) and sends unicast frames to the VTEP its FDB names (one entry per
remote MAC). Why: the underlay needs no multicast (clouds have none), nothing
is broadcast to every host, and what each host knows is exactly what the
control plane programmed, so a stale entry can be found and replaced rather
than waiting for learning to age it out. Unknown destinations are dropped,
never flooded. The cost: a peer must be programmed before anyone can reach it.

Flooding, for networks made with -o multicast=true: head-end replication. The
flood list is vxlan0's all-zero FDB entry (00:00:00:00:00:00), one destination
per remote VTEP that has a peer on the network; the kernel sends one unicast
copy of every broadcast, multicast and unknown-unicast frame to each. ARP is
still answered by the proxy and never flooded (the kernel's ARP proxy consumes
every ARP request, answered or not). Known unicast keeps its one FDB entry, so
its path is unchanged. Without the option the flood list is empty, and any
all-zero entry found (debris) is removed.

Peers obey one rule, which is what makes IP or MAC reuse safe: the kernel
holds at most one entry per IP and one per MAC. Adding a peer evicts whatever
held its IP or its MAC; removing a peer only removes entries that still
describe exactly that peer, so a late delete of an old record never takes
down its successor.

Peers on this host (peer.vtep == the Dataplane's vtep) are never programmed:
br0 reaches them directly, and an FDB entry pointing at ourselves would loop
flooded frames back into br0 and teach it the wrong port.
"""

from __future__ import annotations

import errno
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from driver.model import Peer

from .base import (NTF_SELF, NUD_NOARP, NUD_PERMANENT, VXLAN, DataplaneError, check_vni, ipv4, missing, norm_peer,
                   step)
from .worker import Worker

_CHUNK = 32  # peer operations per worker job (about 5 ms of kernel work)
FLOOD = "00:00:00:00:00:00"  # vxlan0's default destination: where frames with no FDB entry go


class PeerStage(Worker):
    def add_peer(self, vni: int, peer: Peer) -> None:
        """Program peer; evict whatever held its IP or its MAC."""
        check_vni(vni)
        peer = norm_peer(peer)
        if peer.vtep != self.vtep:
            self._call(self._add_peer, vni, peer)

    def remove_peer(self, vni: int, peer: Peer) -> None:
        """Remove peer if the kernel still holds exactly it. Idempotent."""
        check_vni(vni)
        self._call(self._remove_peer, vni, norm_peer(peer))

    def add_flood(self, vni: int, vtep: str) -> None:
        """Flood broadcast/multicast/unknown unicast to vtep too. Idempotent."""
        check_vni(vni)
        vtep = str(ipv4(vtep, "flood VTEP"))
        if vtep != self.vtep:
            self._call(self._flood_op, vni, f"add_flood {vtep} on VNI {vni}", "flood_add", vtep)

    def remove_flood(self, vni: int, vtep: str) -> None:
        """Stop flooding to vtep. Idempotent."""
        check_vni(vni)
        vtep = str(ipv4(vtep, "flood VTEP"))
        self._call(self._flood_op, vni, f"remove_flood {vtep} on VNI {vni}", "flood_del", vtep)

    def set_peers(self, vni: int, peers: Iterable[Peer], flood: Iterable[str] = ()) -> tuple[int, int]:
        """Make vxlan0's entries exactly peers, and its flood list exactly
        flood (one dump, then the differences).

        Returns (added, removed): peers programmed that were not there as
        such, and peers that were there and are gone (a changed peer counts
        in both). Debris that is not a whole peer is removed too, and peers
        on this host are left out (see above). flood: the remote VTEPs that
        get a copy of every broadcast and multicast frame (empty: none, the
        default); this host's own VTEP is left out.
        """
        check_vni(vni)
        want_flood = {str(ipv4(v, "flood VTEP")) for v in flood} - {self.vtep}
        want = {p for p in map(norm_peer, peers) if p.vtep != self.vtep}
        for key in ("ip", "mac"):
            seen: dict[str, Peer] = {}
            for p in sorted(want, key=lambda p: (p.ip, p.mac, p.vtep, p.ip6)):
                for value in p.ips() if key == "ip" else (p.mac,):
                    other = seen.setdefault(value, p)
                    if other is p:
                        continue
                    raise DataplaneError(
                        f"set_peers VNI {vni}: {other} and {p} have the same {key.upper()}; the kernel "
                        "holds one entry per IP and per MAC: fix the peer records in the store"
                    )
        what = f"set_peers on VNI {vni}"
        neigh, fdb = self._call(self._dump, vni, what)
        have_flood = fdb.pop(FLOOD, set())
        have = _join(neigh, fdb)
        want_neigh = {ip: p.mac for p in want for ip in p.ips()}
        want_fdb = {p.mac: p.vtep for p in want}
        ops = [
            *(("neigh_del", ip) for ip in neigh.keys() - want_neigh.keys()),
            *(("fdb_del", mac) for mac in fdb.keys() - want_fdb.keys()),
            *(("fdb_set", mac, vtep) for mac, vtep in want_fdb.items() if fdb.get(mac) != {vtep}),
            *(("neigh_set", ip, mac) for ip, mac in want_neigh.items() if neigh.get(ip) != mac),
            *(("flood_del", vtep) for vtep in sorted(have_flood - want_flood)),
            *(("flood_add", vtep) for vtep in sorted(want_flood - have_flood)),
        ]
        # Applied in chunks, each its own job on the worker thread, so a Join
        # (create_endpoint) waits for one chunk, not for the whole reconcile.
        for start in range(0, len(ops), _CHUNK):
            self._call(self._apply, vni, what, ops[start : start + _CHUNK])
        return len(want - have), len(have - want)

    def peers(self, vni: int) -> set[Peer]:
        """Peers as the kernel holds them: permanent neighbour joined with its
        FDB entry (empty if the network is not on this host). Read-only."""
        check_vni(vni)
        return self._call(self._peers, vni)

    def flood(self, vni: int) -> set[str]:
        """The VTEPs vxlan0 floods to (empty if none, or if the network is not
        on this host). Read-only."""
        check_vni(vni)
        return self._call(self._flood, vni)

    def _vxlan(self, vni: int, what: str) -> _Table:
        ns = self._need_ns(vni, what)
        if ns.vxlan is None:
            with step(f"{what}: finding {VXLAN}"):
                ns.vxlan = ns.index(VXLAN)
            if ns.vxlan is None:
                raise DataplaneError(
                    f"{what}: {self._path(vni)} has no {VXLAN}: delete the network and create it again"
                )
        return _Table(ns.ipr, ns.vxlan, what)

    def _add_peer(self, vni: int, peer: Peer) -> None:
        table = self._vxlan(vni, f"add_peer {peer.ip} on VNI {vni}")
        ips = peer.ips()
        with step(table.what):
            old_macs = {ip: table.neigh_get(ip) for ip in ips}
            old_vtep = table.fdb_get(peer.mac)
            for old_mac in set(old_macs.values()) - {None, peer.mac}:
                # IP reuse: the old MAC belonged to this IP (and its other family's) alone.
                table.fdb_del(old_mac)
                for ip, mac in table.neigh_dump().items():
                    if mac == old_mac and ip not in ips:
                        table.neigh_del(ip)
            if old_vtep is not None and any(m != peer.mac for m in old_macs.values()):
                # MAC reuse under a new IP (rare): find who else points at it.
                for ip, mac in table.neigh_dump().items():
                    if mac == peer.mac and ip not in ips:
                        table.neigh_del(ip)
            # FDB before neighbour, so ARP (or neighbour discovery) is never
            # answered with a MAC that cannot be delivered yet.
            if old_vtep != peer.vtep:
                table.fdb_set(peer.mac, peer.vtep)
            for ip in ips:
                if old_macs[ip] != peer.mac:
                    table.neigh_set(ip, peer.mac)

    def _remove_peer(self, vni: int, peer: Peer) -> None:
        ns = self._ns_handle(vni)
        if ns is None:
            return
        table = self._vxlan(vni, f"remove_peer {peer.ip} on VNI {vni}")
        with step(table.what):
            mac = table.neigh_get(peer.ip)
            vtep = table.fdb_get(peer.mac)
            if mac != peer.mac:
                return  # IP gone or reused: the entry is someone else's now
            if vtep not in (None, peer.vtep):
                return  # the MAC moved to another host: a newer record
            for ip in peer.ips():
                if ip == peer.ip or table.neigh_get(ip) == peer.mac:
                    table.neigh_del(ip)
            if vtep is not None:
                table.fdb_del(peer.mac)

    def _dump(self, vni: int, what: str) -> tuple[dict[str, str], dict[str, set[str]]]:
        table = self._vxlan(vni, what)
        with step(what):
            return table.neigh_dump(), table.fdb_dump()

    def _apply(self, vni: int, what: str, ops: list[tuple]) -> None:
        table = self._vxlan(vni, what)
        with step(what):
            for op, *args in ops:
                getattr(table, op)(*args)

    def _flood_op(self, vni: int, what: str, op: str, vtep: str) -> None:
        if op == "flood_del" and self._ns_handle(vni) is None:
            return  # the network went, and its flood list with it
        table = self._vxlan(vni, what)
        with step(what):
            getattr(table, op)(vtep)

    def _flood(self, vni: int) -> set[str]:
        if self._ns_handle(vni) is None:
            return set()
        table = self._vxlan(vni, f"reading the flood list of VNI {vni}")
        with step(table.what):
            return table.fdb_dump().get(FLOOD, set())

    def _peers(self, vni: int) -> set[Peer]:
        if self._ns_handle(vni) is None:
            return set()
        table = self._vxlan(vni, f"reading peers of VNI {vni}")
        with step(table.what):
            return _join(table.neigh_dump(), table.fdb_dump())


def _join(neigh: dict[str, str], fdb: dict[str, set[str]]) -> set[Peer]:
    """Peers from the tables: a MAC's IPv4 entry, with its IPv6 entry (dual
    stack) as ip6; a MAC with only IPv6 entries is an IPv6-only peer. A MAC
    with more entries than a peer has (debris) yields a peer per combination,
    so the ones no record has show as stale."""
    ips: dict[str, tuple[list[str], list[str]]] = {}
    for ip, mac in sorted(neigh.items()):
        ips.setdefault(mac, ([], []))[":" in ip].append(ip)
    found = set()
    for mac, (v4, v6) in ips.items():
        pairs = [(ip, ip6) for ip in v4 for ip6 in v6 or [""]] if v4 else [(ip, "") for ip in v6]
        found.update(Peer(ip=ip, mac=mac, vtep=vtep, ip6=ip6) for ip, ip6 in pairs for vtep in fdb.get(mac, ()))
    return found


class _Table:
    """vxlan0's neighbour table and FDB, as pyoverlay programs them."""

    def __init__(self, ipr: IPRoute, index: int, what: str):
        self.ipr, self.index, self.what = ipr, index, what

    def neigh_get(self, ip: str) -> str | None:
        try:
            msg = self.ipr.neigh("get", dst=ip, ifindex=self.index)[0]
        except NetlinkError as e:
            if missing(e):
                return None
            raise
        return msg.get_attr("NDA_LLADDR") if msg["state"] & NUD_PERMANENT else None

    def neigh_dump(self) -> dict[str, str]:
        return {
            m.get_attr("NDA_DST"): m.get_attr("NDA_LLADDR")
            for m in self.ipr.neigh("dump", ifindex=self.index)
            if m["ifindex"] == self.index and m["state"] & NUD_PERMANENT and m.get_attr("NDA_LLADDR")
        }

    def neigh_set(self, ip: str, mac: str) -> None:
        self.ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=self.index, state=NUD_PERMANENT)

    def neigh_del(self, ip: str) -> None:
        try:
            self.ipr.neigh("del", dst=ip, ifindex=self.index)
        except NetlinkError as e:
            if not missing(e):
                raise

    def fdb_get(self, mac: str) -> str | None:
        try:
            msg = self.ipr.fdb("get", ifindex=self.index, lladdr=mac, flags=NTF_SELF)[0]
        except NetlinkError as e:
            if missing(e):
                return None
            raise
        return msg.get_attr("NDA_DST")

    def fdb_dump(self) -> dict[str, set[str]]:
        entries: dict[str, set[str]] = {}
        for m in self.ipr.fdb("dump", ifindex=self.index):
            # only vxlan0's own entries (self, with a remote), not br0's
            if m["ifindex"] == self.index and m["flags"] & NTF_SELF and m.get_attr("NDA_DST"):
                entries.setdefault(m.get_attr("NDA_LLADDR"), set()).add(m.get_attr("NDA_DST"))
        return entries

    def fdb_set(self, mac: str, vtep: str) -> None:
        # pyroute2 fills in self/permanent only for add/del, so say it here;
        # without NTF_SELF the entry would land in br0's FDB instead.
        self.ipr.fdb(
            "replace",
            ifindex=self.index,
            lladdr=mac,
            dst=vtep,
            flags=NTF_SELF,
            state=NUD_PERMANENT | NUD_NOARP,
        )

    def fdb_del(self, mac: str) -> None:
        try:
            self.ipr.fdb("del", ifindex=self.index, lladdr=mac)  # no dst: the whole entry
        except NetlinkError as e:
            if not missing(e):
                raise

    def flood_add(self, vtep: str) -> None:
        # "append": one more destination for the all-zero entry (replace would
        # swap the whole list for this one).
        try:
            self.ipr.fdb("append", ifindex=self.index, lladdr=FLOOD, dst=vtep)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    def flood_del(self, vtep: str) -> None:
        try:
            self.ipr.fdb("del", ifindex=self.index, lladdr=FLOOD, dst=vtep)  # this destination only
        except NetlinkError as e:
            if not missing(e):
                raise
