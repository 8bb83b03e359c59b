"""A gateway-mode network's way out of its namespace (-o gateway=pyoverlay).

    host namespace                               overlay namespace pyo-<vni>
    --------------                               ---------------------------
    pyg<vni> 169.254.31.1/32  <----veth---->     up0 169.254.31.2/32
             fe80::31:1/64                           fe80::31:2/64           (IPv6 networks)
    route <subnet> via 169.254.31.2 onlink       default via 169.254.31.1 onlink
    route <subnet6> via fe80::31:2               default via fe80::31:1
    route_localnet=1 (127.0.0.1 -p, see below)   br0 also holds the gateway address(es)
                                                 ip_forward=1, ipv6 forwarding=1

The containers' default route is the network's gateway address, on br0 in the
overlay namespace; the namespace forwards to the host over the uplink veth,
and the host routes, NATs (egress masquerade, published ports' DNAT: the nft
table in natrules.py) and filters. The host routes the subnet to the
namespace as the engine's bridge driver routes a bridge's subnet.

Why the same link addresses on every network: they only ever name the two
ends of one veth, and both routes are `onlink` through a named device, so the
host holding 169.254.31.1 on several uplinks is never ambiguous; nothing to
allocate, nothing to collide (a /31 per VNI would not fit 169.254/16).

Why the gateway address on every host's br0 at once: ARP never crosses the
overlay (vxlan0 answers ARP from its proxy table, which holds containers
only), so each host's containers find their own host's br0: a distributed
gateway, and egress leaves from the container's own host.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2.netlink.exceptions import NetlinkError

from . import dnsplane
from .base import BRIDGE, DataplaneError, check_vni, step, sysctls_in
from .worker import Handle, Worker

UPLINK_PREFIX = "pyg"  # host end: pyg<vni> (at most 11 characters)
UPLINK_NS = "up0"  # namespace end
LINK_HOST = "169.254.31.1"
LINK_NS = "169.254.31.2"
# IPv6: link-local, the same pair on every uplink (scoped to the device, never ambiguous).
LINK6_HOST = "fe80::31:1"
LINK6_NS = "fe80::31:2"
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200
RTNH_F_ONLINK = 0x4  # the next hop needs no route of its own: it is on this device


def uplink_name(vni: int) -> str:
    return f"{UPLINK_PREFIX}{vni}"


class EgressStage(Worker):
    def add_egress(self, vni: int, subnet: str, gateway: str, subnet6: str = "", gateway6: str = "") -> None:
        """The gateway address(es) on br0 and the uplink to the host, for each
        family the network has (subnet may be IPv6: an IPv6-only network). Idempotent."""
        check_vni(vni)
        pairs = []
        for sub, gw in ((subnet, gateway), (subnet6, gateway6)):
            if not sub:
                continue
            net, addr = ipaddress.ip_network(sub), ipaddress.ip_address(gw)
            if addr not in net:
                raise DataplaneError(f"gateway {gw} is outside the subnet {sub}")
            pairs.append((net, addr))
        self._call(self._add_egress, vni, pairs)

    def _add_egress(self, vni: int, pairs: list) -> None:
        what = f"gateway mode for VNI {vni}"
        ns = self._need_ns(vni, what)
        host = self._host_handle()
        name = uplink_name(vni)
        bridge = ns.bridge or ns.index(BRIDGE)
        for net, gw in pairs:
            with step(f"{what}: putting {gw} on {BRIDGE}"):
                try:
                    # No prefix route from the address: the subnet's route on br0
                    # is added below only if absent (the resolver's has a source of its own).
                    # No DAD: every host's br0 holds this address, and none is a duplicate.
                    ns.ipr.addr("add", index=bridge, address=str(gw), prefixlen=net.prefixlen,
                                flags=IFA_F_NOPREFIXROUTE | (IFA_F_NODAD if net.version == 6 else 0))
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                try:
                    ns.ipr.route("add", dst=str(net.network_address), dst_len=net.prefixlen, oif=bridge,
                                 scope=dnsplane.SCOPE_LINK)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
        with step(f"{what}: creating the uplink {name}/{UPLINK_NS}",
                  f"if {name} is debris, delete it (ip link del {name}) and retry"):
            if ns.index(UPLINK_NS) is None:
                if host.index(name) is not None:  # its peer is elsewhere: not ours to keep
                    host.link_del(host.index(name))
                ns.ipr.link("add", ifname=UPLINK_NS, kind="veth", state="up",
                            peer={"ifname": name, "net_ns_fd": host.fd})
            up = ns.index(UPLINK_NS)
            ns.ipr.link("set", index=up, state="up")
            hostend = host.index(name)
            if hostend is None:
                raise DataplaneError(f"{what}: {name} is not in the host namespace: delete the network and "
                                     "create it again")
            host.ipr.link("set", index=hostend, state="up")
        with step(f"{what}: addresses and routes of the uplink"):
            for net, _ in pairs:
                if net.version == 4:
                    self._address(ns, up, LINK_NS)
                    self._address(host, hostend, LINK_HOST)
                    self._route(ns, "0.0.0.0", 0, LINK_HOST, up)
                    self._route(host, str(net.network_address), net.prefixlen, LINK_NS, hostend)
                else:
                    self._address(ns, up, LINK6_NS, 64)
                    self._address(host, hostend, LINK6_HOST, 64)
                    self._route(ns, "::", 0, LINK6_HOST, up)
                    self._route(host, str(net.network_address), net.prefixlen, LINK6_NS, hostend)
        with step(f"{what}: turning forwarding on", "the plugin needs write access to /proc/sys"):
            inside, outside = {}, {}
            if any(net.version == 4 for net, _ in pairs):
                inside["net/ipv4/ip_forward"] = outside["net/ipv4/ip_forward"] = "1"
                # route_localnet: a DNAT of 127.0.0.1 may leave through the uplink
                # (the source is then masqueraded, see natrules.py).
                outside[f"net/ipv4/conf/{name}/route_localnet"] = "1"
            if any(net.version == 6 for net, _ in pairs):
                # As the engine's bridge does for an IPv6 network (the host then
                # ignores router advertisements on interfaces with accept_ra=1).
                inside["net/ipv6/conf/all/forwarding"] = outside["net/ipv6/conf/all/forwarding"] = "1"
            sysctls_in(ns.fd, inside)
            sysctls_in(host.fd, outside)

    @staticmethod
    def _address(handle: Handle, index: int, address: str, prefixlen: int = 32) -> None:
        try:
            handle.ipr.addr("add", index=index, address=address, prefixlen=prefixlen,
                            flags=IFA_F_NODAD if ":" in address else 0)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    @staticmethod
    def _route(handle: Handle, dst: str, dst_len: int, gateway: str, index: int) -> None:
        # replace: a restart converges a route someone changed. A link-local
        # IPv6 next hop is on the device already; an IPv4 one needs onlink.
        handle.ipr.route("replace", dst=dst, dst_len=dst_len, gateway=gateway, oif=index,
                         flags=0 if ":" in gateway else RTNH_F_ONLINK)

    def uplinks(self) -> set[int]:
        """VNIs with an uplink in the host namespace."""
        return self._call(self._uplinks)

    def _uplinks(self) -> set[int]:
        host = self._host_handle()
        with step("listing the gateway-mode uplinks"):
            names = [link.get_attr("IFLA_IFNAME") for link in host.ipr.link("dump", family=socket.AF_UNSPEC)]
        return {int(n[len(UPLINK_PREFIX):]) for n in names
                if n.startswith(UPLINK_PREFIX) and n[len(UPLINK_PREFIX):].isdigit()}
