"""Direct mode (-o encap=cross-subnet|never): container traffic routed between
hosts on one underlay subnet, without VXLAN (flannel's host-gw, Calico's
CrossSubnet, done per network).

Per network, in its namespace pyo-<vni>::

    br0 (proxy_arp) --routed-- direct0 (macvlan on the underlay link, private mode)

direct0's MAC is derived from (underlay address, VNI), so every host computes
its peers' MACs from the peer records it already follows, and no ARP ever
crosses the underlay. For each remote endpoint on a host of this host's
underlay subnet: a /32 route via direct0 and a permanent neighbour entry to
that host's direct0 MAC; for each local endpoint: a /32 route via br0 and a
permanent neighbour entry to its own MAC. A container ARPs for a remote
address as before; br0 answers with its own MAC (proxy ARP: the route points
elsewhere), the namespace routes the packet out of direct0, addressed to the
peer host's direct0 of the same VNI, whose namespace routes it to its br0.

Isolation: a namespace only ever sends to MACs of its own VNI, and the
macvlan hands a frame only to the device owning its destination MAC; private
mode keeps the macvlans of one host from reaching each other, and strict
reverse-path filtering drops a packet whose source is not reached by the
device it came in on (no spoofing of another host's containers from br0).
vxlan0 stays: cross-subnet peers still use it, and its presence keeps drift
and doctor checks identical for both kinds of network.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Iterable

from pyroute2.netlink.exceptions import NetlinkError

from driver.model import Peer

from .base import BRIDGE, NUD_PERMANENT, DataplaneError, check_vni, missing, norm_peer, step, sysctls_in
from .worker import Handle, Worker

DIRECT = "direct0"
#: Marks the /32 routes direct mode owns, so a dump never touches anyone else's.
RTPROT_DIRECT = 0x70
_CHUNK = 32


def direct_mac(vtep: str, vni: int) -> str:
    """The MAC of direct0 on the host with underlay address vtep, for VNI vni:
    0a (locally administered, unicast; unlike endpoint MACs 02:/06:), the VNI's
    24 bits, the address's last 16 bits, which differ between hosts of one
    underlay subnet up to a /16 (direct mode's whole reach)."""
    ip = ipaddress.IPv4Address(vtep).packed
    return ":".join(f"{b:02x}" for b in (0x0A, vni >> 16 & 0xFF, vni >> 8 & 0xFF, vni & 0xFF, ip[2], ip[3]))


class DirectStage(Worker):
    def create_direct(self, vni: int) -> None:
        """direct0 in the network's namespace (the namespace exists:
        create_network first), and routing on there. Idempotent."""
        check_vni(vni)
        self._call(self._create_direct, vni)

    def underlay_subnet(self) -> ipaddress.IPv4Network:
        """The prefix of this host's underlay address, at most a /16: peers
        inside it are reached directly (direct0 MACs carry an address's last
        16 bits, unique within a /16 only)."""
        found = getattr(self, "_underlay_net", None)
        if found is None:
            found = self._underlay_net = self._call(self._read_underlay)[1]
        return found

    def same_subnet(self, vtep: str) -> bool:
        return ipaddress.IPv4Address(vtep) in self.underlay_subnet()

    def set_direct(self, vni: int, remote: Iterable[Peer], local: Iterable[Peer]) -> tuple[int, int]:
        """Make the namespace's direct routes and neighbours exactly: remote
        peers via direct0 (to their host's direct0 MAC), local ones via br0.
        One dump, then the differences; returns (added, removed) routes."""
        check_vni(vni)
        want: dict[str, tuple[str, str]] = {}  # ip -> (device, MAC)
        for p in map(norm_peer, remote):
            if p.vtep != self.vtep:
                want[p.ip] = (DIRECT, direct_mac(p.vtep, vni))
        for p in map(norm_peer, local):
            want[p.ip] = (BRIDGE, p.mac)
        what = f"set_direct on VNI {vni}"
        have, neigh = self._call(self._dump_direct, vni, what)
        ops = [("route_del", ip) for ip in have.keys() - want.keys()]
        for ip, (dev, mac) in sorted(want.items()):
            # The neighbour first, so a routed packet never waits on an ARP that cannot be answered.
            if neigh.get((dev, ip)) != mac:
                ops.append(("neigh_set", ip, dev, mac))
            if have.get(ip) != dev:
                ops.append(("route_set", ip, dev))
        ops += [("neigh_del", ip, dev) for (dev, ip) in neigh.keys() if want.get(ip, (None,))[0] != dev]
        for start in range(0, len(ops), _CHUNK):
            self._call(self._apply_direct, vni, what, ops[start : start + _CHUNK])
        return sum(1 for ip in want if have.get(ip) != want[ip][0]), len(have.keys() - want.keys())

    def direct_routes(self, vni: int) -> dict[str, tuple[str, str]]:
        """ip -> (device, neighbour MAC) as the kernel holds them (empty if the
        namespace or direct0 is missing). Read-only, for doctor and tests."""
        check_vni(vni)

        def read() -> dict[str, tuple[str, str]]:
            if self._ns_handle(vni) is None:
                return {}
            have, neigh = self._dump_direct(vni, f"reading direct routes of VNI {vni}")
            return {ip: (dev, neigh.get((dev, ip), "")) for ip, dev in have.items()}

        return self._call(read)

    def has_direct(self, vni: int) -> bool:
        check_vni(vni)
        return self._call(lambda: (ns := self._ns_handle(vni)) is not None and ns.index(DIRECT) is not None)

    # -- on the worker thread ------------------------------------------------------

    def _read_underlay(self) -> tuple[int, ipaddress.IPv4Network]:
        host = self._host_handle()
        with step(f"finding the interface holding {self.vtep}"):
            for addr in host.ipr.addr("dump", family=socket.AF_INET):
                if addr.get_attr("IFA_LOCAL") == self.vtep:
                    prefix = max(addr["prefixlen"], 16)
                    return addr["index"], ipaddress.IPv4Network(f"{self.vtep}/{prefix}", strict=False)
        raise DataplaneError(f"no interface in the host namespace has address {self.vtep}: direct mode needs "
                             "the underlay address on a local interface (check --advertise-addr)")

    def _create_direct(self, vni: int) -> None:
        what = f"create_direct VNI {vni}"
        ns = self._need_ns(vni, what)
        index, _ = self._read_underlay()
        host = self._host_handle()
        with step(f"{what}: reading the underlay link"):
            mtu = host.ipr.link("get", index=index)[0].get_attr("IFLA_MTU")
        if ns.index(DIRECT) is None:
            with step(f"{what}: creating {DIRECT} (macvlan on the underlay link)",
                      "does the underlay interface take macvlan devices (a physical NIC, bond, VLAN or veth)?"):
                # Made by the host's socket straight into the namespace, as vxlan0: no temporary name.
                host.ipr.link("add", ifname=DIRECT, kind="macvlan", link=index, macvlan_mode="private",
                              address=direct_mac(self.vtep, vni), mtu=mtu, net_ns_fd=ns.fd)
        with step(f"{what}: turning routing on in {self._path(vni)}"):
            sysctls_in(ns.fd, {
                # No IPv6 on direct0: its link-local address, DAD and router solicitations would be
                # underlay noise from every network on every host, for nothing (direct mode is IPv4).
                f"net/ipv6/conf/{DIRECT}/disable_ipv6": "1",
                "net/ipv4/ip_forward": "1",
                f"net/ipv4/conf/{BRIDGE}/proxy_arp": "1",
                # Answer at once: the default delays a proxied reply to a broadcast request by up to 0.8 s.
                f"net/ipv4/neigh/{BRIDGE}/proxy_delay": "0",
                "net/ipv4/conf/all/rp_filter": "1",
                f"net/ipv4/conf/{BRIDGE}/rp_filter": "1",
                f"net/ipv4/conf/{DIRECT}/rp_filter": "1",
            })
        with step(f"{what}: bringing {DIRECT} up"):
            ns.ipr.link("set", index=ns.index(DIRECT), state="up")

    def _dump_direct(self, vni: int, what: str) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
        ns = self._need_ns(vni, what)
        names = {}
        for dev in (BRIDGE, DIRECT):
            index = ns.index(dev)
            if index is not None:
                names[index] = dev
        with step(what):
            routes = {
                r.get_attr("RTA_DST"): names.get(r.get_attr("RTA_OIF"), "?")
                for r in ns.ipr.route("dump", family=socket.AF_INET)
                if r["proto"] == RTPROT_DIRECT and r["dst_len"] == 32
            }
            neigh = {
                (names[m["ifindex"]], m.get_attr("NDA_DST")): m.get_attr("NDA_LLADDR")
                for m in ns.ipr.neigh("dump", family=socket.AF_INET)
                if m["ifindex"] in names and m["state"] & NUD_PERMANENT and m.get_attr("NDA_LLADDR")
            }
        return routes, neigh

    def _apply_direct(self, vni: int, what: str, ops: list[tuple]) -> None:
        ns = self._need_ns(vni, what)
        index = {dev: ns.index(dev) for dev in (BRIDGE, DIRECT)}
        if index[DIRECT] is None:
            raise DataplaneError(f"{what}: {self._path(vni)} has no {DIRECT}: delete the network and create it again")
        with step(what):
            for op, ip, *rest in ops:
                if op == "route_set":
                    ns.ipr.route("replace", dst=f"{ip}/32", oif=index[rest[0]], proto=RTPROT_DIRECT, scope=253)
                elif op == "route_del":
                    try:
                        ns.ipr.route("del", dst=f"{ip}/32", proto=RTPROT_DIRECT, scope=253)
                    except NetlinkError as e:
                        if e.code != errno.ESRCH and not missing(e):
                            raise
                elif op == "neigh_set":
                    ns.ipr.neigh("replace", dst=ip, lladdr=rest[1], ifindex=index[rest[0]], state=NUD_PERMANENT)
                elif op == "neigh_del":
                    try:
                        ns.ipr.neigh("del", dst=ip, ifindex=index[rest[0]])
                    except NetlinkError as e:
                        if not missing(e):
                            raise
