"""A gateway-mode network's way out of its namespace (-o gateway=pyoverlay).

    host namespace                               overlay namespace pyo-<vni>
    --------------                               ---------------------------
    pyg<vni> 169.254.31.1/32  <----veth---->     up0 169.254.31.2/32
    route <subnet> via 169.254.31.2 onlink       default via 169.254.31.1 onlink
    route_localnet=1 (127.0.0.1 -p, see below)   br0 also holds the gateway address
                                                 ip_forward=1

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
from .base import BRIDGE, DataplaneError, check_vni, in_namespace, step
from .worker import Handle, Worker

UPLINK_PREFIX = "pyg"  # host end: pyg<vni> (at most 11 characters)
UPLINK_NS = "up0"  # namespace end
LINK_HOST = "169.254.31.1"
LINK_NS = "169.254.31.2"
IFA_F_NOPREFIXROUTE = 0x200
RTNH_F_ONLINK = 0x4  # the next hop needs no route of its own: it is on this device


def uplink_name(vni: int) -> str:
    return f"{UPLINK_PREFIX}{vni}"


def _sysctl_in(fd: int | None, settings: dict[str, str]) -> None:
    """Write /proc/sys/<key> in the namespace of fd (None: ours)."""
    def write() -> None:
        for key, value in settings.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    in_namespace(fd, write)


class EgressStage(Worker):
    def add_egress(self, vni: int, subnet: str, gateway: str) -> None:
        """The gateway address on br0 and the uplink to the host. Idempotent."""
        check_vni(vni)
        net = ipaddress.IPv4Network(subnet)
        gw = ipaddress.IPv4Address(gateway)
        if gw not in net:
            raise DataplaneError(f"gateway {gateway} is outside the subnet {subnet}")
        self._call(self._add_egress, vni, net, gw)

    def _add_egress(self, vni: int, net: ipaddress.IPv4Network, gw: ipaddress.IPv4Address) -> None:
        what = f"gateway mode for VNI {vni}"
        ns = self._need_ns(vni, what)
        host = self._host_handle()
        name = uplink_name(vni)
        with step(f"{what}: putting {gw} on {BRIDGE}"):
            bridge = ns.bridge or ns.index(BRIDGE)
            try:
                # No prefix route from the address: the subnet's route on br0
                # is added below only if absent (the resolver's has a source of its own).
                ns.ipr.addr("add", index=bridge, address=str(gw), prefixlen=net.prefixlen,
                            flags=IFA_F_NOPREFIXROUTE)
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
            self._address(ns, up, LINK_NS)
            self._address(host, hostend, LINK_HOST)
            self._route(ns, "0.0.0.0", 0, LINK_HOST, up)
            self._route(host, str(net.network_address), net.prefixlen, LINK_NS, hostend)
        with step(f"{what}: turning forwarding on", "the plugin needs write access to /proc/sys"):
            _sysctl_in(ns.fd, {"net/ipv4/ip_forward": "1"})
            # route_localnet: a DNAT of 127.0.0.1 may leave through the uplink
            # (the source is then masqueraded, see natrules.py).
            _sysctl_in(host.fd, {"net/ipv4/ip_forward": "1", f"net/ipv4/conf/{name}/route_localnet": "1"})

    @staticmethod
    def _address(handle: Handle, index: int, address: str) -> None:
        try:
            handle.ipr.addr("add", index=index, address=address, prefixlen=32)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    @staticmethod
    def _route(handle: Handle, dst: str, dst_len: int, gateway: str, index: int) -> None:
        # replace: a restart converges a route someone changed.
        handle.ipr.route("replace", dst=dst, dst_len=dst_len, gateway=gateway, oif=index,
                         flags=RTNH_F_ONLINK)

    def uplinks(self) -> set[int]:
        """VNIs with an uplink in the host namespace."""
        return self._call(self._uplinks)

    def _uplinks(self) -> set[int]:
        host = self._host_handle()
        with step("listing the gateway-mode uplinks"):
            names = [link.get_attr("IFLA_IFNAME") for link in host.ipr.link("dump", family=socket.AF_UNSPEC)]
        return {int(n[len(UPLINK_PREFIX):]) for n in names
                if n.startswith(UPLINK_PREFIX) and n[len(UPLINK_PREFIX):].isdigit()}
