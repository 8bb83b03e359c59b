"""The host namespace: which address and route the underlay has, its MTU, the
routes IPAM must avoid, and the resolver's address on lo."""

from __future__ import annotations

import socket

from pyroute2 import IPRoute

from . import dnsplane
from .base import IFA_F_SECONDARY, RT_TABLE_MAIN, RTN_UNICAST, DataplaneError, step
from .worker import Worker, ns_path


def default_route_address(netns: str | None = None) -> str:
    """IPv4 address of the interface holding the default route (main table).

    The route's preferred source wins if it has one; otherwise the interface's
    first primary global address. netns is a name or path (None: our own).
    """
    where = f"namespace {netns}" if netns else "this host"
    hint = "give the underlay address explicitly (--advertise-addr)"
    with step(f"reading the default route in {where}", hint):
        ipr = IPRoute(netns=ns_path(netns), flags=0, groups=0) if netns else IPRoute(groups=0)
    try:
        with step(f"reading the default route in {where}", hint):
            routes = [
                r
                for r in ipr.route("dump", family=socket.AF_INET)
                if r["dst_len"] == 0
                and r["type"] == RTN_UNICAST
                and r.get_attr("RTA_TABLE", r["table"]) == RT_TABLE_MAIN
            ]
            if not routes:
                raise DataplaneError(f"{where} has no IPv4 default route; {hint}")
            route = min(routes, key=lambda r: r.get_attr("RTA_PRIORITY", 0))
            if route.get_attr("RTA_PREFSRC"):
                return route.get_attr("RTA_PREFSRC")
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                hops = route.get_attr("RTA_MULTIPATH") or []
                oif = hops[0]["oif"] if hops else None
            for addr in ipr.addr("dump", family=socket.AF_INET, index=oif):
                if addr["scope"] == 0 and not addr["flags"] & IFA_F_SECONDARY:
                    return addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
            raise DataplaneError(
                f"the default route's interface (index {oif}) in {where} has no global IPv4 address; {hint}"
            )
    finally:
        ipr.close()


class HostStage(Worker):
    def underlay_mtu(self) -> int:
        """MTU of the host interface holding the vtep address (netlink, not /sys:
        a process that only entered the netns sees the root namespace's /sys)."""
        found = self._call(self._underlay_link, self.vtep, socket.AF_INET)
        if found is None:
            raise DataplaneError(
                f"no interface in the host namespace has address {self.vtep}: "
                "the VTEP address must be one of this host's underlay addresses (check --advertise-addr)"
            )
        return found[1]

    def underlay_link(self, address: str | None = None) -> tuple[str, int] | None:
        """(name, MTU) of the host interface holding address (default: the
        vtep), or None if no interface holds it."""
        return self._call(self._underlay_link, address or self.vtep, socket.AF_UNSPEC)

    def _underlay_link(self, address: str, family: int) -> tuple[str, int] | None:
        host = self._host_handle()
        kwargs = {"family": family} if family else {}
        with step(f"reading the MTU of the interface holding {address}"):
            for addr in host.ipr.addr("dump", **kwargs):
                if address in (addr.get_attr("IFA_LOCAL"), addr.get_attr("IFA_ADDRESS")):
                    link = host.ipr.link("get", index=addr["index"])[0]
                    return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")
        return None

    def routes(self) -> list[str]:
        """IPv4 destinations routed in the host namespace (main table), so IPAM
        never hands out a subnet the host already reaches some other way."""
        return self._call(self._routes)

    def _routes(self) -> list[str]:
        host = self._host_handle()
        with step("reading the host's routes"):
            return [
                f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
                for r in host.ipr.route("dump", family=socket.AF_INET)
                if r["dst_len"] > 0 and r.get_attr("RTA_TABLE", r["table"]) == RT_TABLE_MAIN
            ]

    def add_local_address(self, address: str, present: bool = True) -> None:
        """address/32 on the host namespace's lo (present=False: take it off)."""

        def apply() -> None:
            host = self._host_handle()
            with step(f"{'putting' if present else 'removing'} {address} on lo"):
                (dnsplane.add_address if present else dnsplane.remove_address)(host.ipr, host.index("lo"), address)

        self._call(apply)
