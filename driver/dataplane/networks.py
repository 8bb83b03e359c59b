"""A network's devices: the overlay namespace <netns_dir>/pyo-<vni>, its br0
and vxlan0 (moby's ov_network.go).

vxlan0 is created by the host namespace's netlink socket straight into the
overlay namespace (the namespace fd rides in the create request). The kernel
binds a vxlan's UDP socket in the namespace that asked, so this is what
create-in-host-then-move achieves, in one atomic step, with no temporary
device name that a crash could leave behind.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from typing import Iterable

from pyroute2 import netns as pr_netns

from driver.drift import VxlanSettings

from . import dnsplane
from .base import BRIDGE, NS_PREFIX, VXLAN, DataplaneError, check_mtu, check_vni, in_namespace, step
from .worker import Handle, Worker, is_netns

log = logging.getLogger(__name__)

_NS_NAME = re.compile(r"^" + NS_PREFIX + r"([0-9]+)$")


def _local_mac() -> str:
    """A random locally administered unicast MAC."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


#: br_netfilter's switches, per namespace (kernel >= 5.3). A namespace starts
#: with them on once the module is loaded (the engine loads it): every frame
#: br0 forwards then passes the namespace's IPv4/IPv6/ARP hooks, which hold
#: nothing of ours (the VXLAN filter is in the host namespace). Off: one
#: TCP stream across the overlay measured faster (bench/throughput.py).
BRIDGE_NF = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables")


_NF_SKIPPED: list[str] = []  # why the switches could not be set (said once)


def bridge_netfilter_off(ns: Handle) -> None:
    """Set the overlay namespace's br_netfilter switches to 0 (nothing to do
    if the module is not loaded: no switches, no hooks). Where /proc/sys is
    read-only (a managed plugin's container) they stay on: a few percent of
    throughput, nothing else, so that is logged once and never fails a call."""
    def inside() -> None:
        try:
            for name in BRIDGE_NF:
                try:
                    with open(f"/proc/sys/net/bridge/{name}", "w") as f:
                        f.write("0")
                except FileNotFoundError:
                    return
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                if not _NF_SKIPPED:
                    _NF_SKIPPED.append(str(e))
                    log.warning("bridge netfilter stays on in the overlay namespaces (%s): "
                                "traffic is unaffected, throughput a little lower", e)
                return
            raise

    in_namespace(ns.fd, inside)


class NetworkStage(Worker):
    def create_network(self, vni: int, mtu: int, encrypted: bool = False) -> None:
        """Make <netns_dir>/pyo-<vni> with br0 and vxlan0, all up. Idempotent
        (a repeat converges the MTU); on failure removes what this call made.
        encrypted: vxlan0 uses the encrypted port, routed into the tunnel (crypto.py)."""
        check_vni(vni)
        check_mtu(mtu)
        self._call(self._create_network, vni, mtu, self.encrypted_port if encrypted else self.vxlan_port)

    def _create_network(self, vni: int, mtu: int, port: int) -> None:
        path = self._path(vni)
        host = self._host_handle()
        with self._dir_lock():
            made_ns = not is_netns(path)
            if made_ns:
                with step(f"create_network VNI {vni}: creating namespace {path}"):
                    if os.path.lexists(path):  # an unmounted file left by a crash mid-create
                        os.unlink(path)
                    pr_netns.create(path)
            made: list[str] = []
            try:
                ns = self._need_ns(vni, f"create_network VNI {vni}")
                ns.bridge = ns.vxlan = None
                self._build_network(host, ns, vni, mtu, made, port)
            except BaseException as error:
                try:
                    if made_ns:
                        self._destroy_ns(vni)
                    else:
                        self._delete_links(self._ns_handle(vni), made)
                except DataplaneError as cleanup:
                    error.add_note(f"cleaning up also failed: {cleanup}")
                raise

    def _build_network(self, host: Handle, ns: Handle, vni: int, mtu: int, made: list[str], port: int) -> None:
        what = f"create_network VNI {vni}"
        with step(f"{what}: creating {BRIDGE}"):
            # br0's MAC is pinned: a bridge left to itself takes its lowest port's
            # MAC and changes it when that port goes, and containers that cached
            # the old one for the resolver's address (DNS_ADDR, on br0) then get
            # no answer until their ARP entry ages out (15 s and more).
            if ns.index(BRIDGE) is None:
                ns.ipr.link("add", ifname=BRIDGE, kind="bridge", mtu=mtu, address=_local_mac())
                made.append(BRIDGE)
            else:  # made by an earlier version: pin the MAC it has now
                current = ns.ipr.link("get", ifname=BRIDGE)[0].get_attr("IFLA_ADDRESS")
                ns.ipr.link("set", index=ns.index(BRIDGE), address=current)
            ns.bridge = ns.index(BRIDGE)
        vxlan = None
        with step(f"{what}: reading {VXLAN}"):
            if ns.index(VXLAN) is not None:
                vxlan = ns.ipr.link("get", ifname=VXLAN)[0]
        if vxlan is None:
            # Created by the host namespace's socket straight into the overlay
            # namespace: the kernel binds the UDP socket in the namespace that
            # asked (the underlay's), and no temporary name is ever visible.
            with step(
                f"{what}: creating {VXLAN} (VNI {vni}, port {port}, local {self.vtep})",
                f"is VNI {vni} already used by another VXLAN device on port {port} "
                "in the host namespace? Delete that device or use another VNI",
            ):
                # Learning off and ARP proxy on: peers come from the store only.
                host.ipr.link("add", ifname=VXLAN, kind="vxlan", mtu=mtu, net_ns_fd=ns.fd,
                              vxlan_id=vni, vxlan_port=port, vxlan_local=self.vtep,
                              vxlan_learning=0, vxlan_proxy=1)
            made.append(VXLAN)
        else:
            self._check_vxlan(vxlan, vni, port)
        with step(f"{what}: enslaving {VXLAN} to {BRIDGE} and bringing both up"):
            ns.vxlan = ns.index(VXLAN)
            ns.ipr.link("set", index=ns.vxlan, master=ns.bridge, mtu=mtu, state="up")
            ns.ipr.link("set", index=ns.bridge, mtu=mtu, state="up")
        with step(f"{what}: turning bridge netfilter off in {self._path(vni)}"):
            bridge_netfilter_off(ns)

    def _check_vxlan(self, link, vni: int, port: int) -> None:
        data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        have = {
            "VNI": data.get_attr("IFLA_VXLAN_ID") if data else None,
            "port": data.get_attr("IFLA_VXLAN_PORT") if data else None,
            "local": data.get_attr("IFLA_VXLAN_LOCAL") if data else None,
            "learning": data.get_attr("IFLA_VXLAN_LEARNING") if data else None,
            "proxy": data.get_attr("IFLA_VXLAN_PROXY") if data else None,
        }
        want = {"VNI": vni, "port": port, "local": self.vtep, "learning": 0, "proxy": 1}
        if have != want:
            raise DataplaneError(
                f"create_network VNI {vni}: {self._path(vni)} already holds a {VXLAN} with "
                f"{have}, expected {want}: delete the network and create it again"
            )

    def delete_network(self, vni: int) -> None:
        """Remove the overlay namespace and every device in it. Idempotent."""
        check_vni(vni)
        self._call(self._delete_network, vni)

    def _delete_network(self, vni: int) -> None:
        # Deferred work on this network (Leave's veth deletions) is done now,
        # while its namespace is there; what fails goes with the namespace.
        try:
            self._run_deferred_now(lambda key: getattr(key, "vni", None) == vni)
        except DataplaneError:
            pass
        with self._dir_lock():
            self._destroy_ns(vni)

    def _destroy_ns(self, vni: int) -> None:
        path = self._path(vni)
        ns = self._ns_handle(vni)
        if ns is not None:
            # Delete the devices explicitly: a handle another process still
            # holds would keep the namespace, and with it vxlan0's VNI and UDP
            # port, alive after the unmount. vxlan0 first, to free them soonest.
            with step(f"delete_network VNI {vni}: listing devices"):
                names = [link.get_attr("IFLA_IFNAME") for link in ns.ipr.link("dump")]
            names = sorted((n for n in names if n != "lo"), key=lambda n: n != VXLAN)
            self._delete_links(ns, names)
            del self._ns[vni]
            ns.close()
        with step(f"delete_network VNI {vni}: removing namespace {path}"):
            if is_netns(path):
                pr_netns.remove(path)
            elif os.path.lexists(path):
                os.unlink(path)

    @staticmethod
    def _delete_links(ns: Handle | None, names: Iterable[str]) -> None:
        for name in names:
            with step(f"deleting {name}"):
                index = ns.index(name) if ns is not None else None
                if index is not None:
                    ns.link_del(index)

    def networks(self) -> set[int]:
        """VNIs whose overlay namespace exists (a mounted one, not a leftover file)."""
        try:
            names = os.listdir(self.netns_dir)
        except FileNotFoundError:
            return set()
        found = set()
        for name in names:
            m = _NS_NAME.match(name)
            if m and is_netns(os.path.join(self.netns_dir, name)):
                found.add(int(m.group(1)))
        return found

    def netns_name(self, vni: int) -> str:
        """Where the overlay's namespace is (for operators: ip netns exec)."""
        return self._path(vni)

    def vxlan_settings(self, vni: int) -> VxlanSettings | None:
        """The VNI, UDP port and local address of the overlay's vxlan device,
        or None if the namespace or the device is missing (read-only)."""
        check_vni(vni)
        return self._call(self._vxlan_settings, vni)

    def _vxlan_settings(self, vni: int) -> VxlanSettings | None:
        ns = self._ns_handle(vni)
        if ns is None:
            return None
        with step(f"reading the vxlan device of VNI {vni}"):
            for link in ns.ipr.link("dump"):
                info = link.get_attr("IFLA_LINKINFO")
                if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
                    continue
                data = info.get_attr("IFLA_INFO_DATA")
                return VxlanSettings(
                    vni=data.get_attr("IFLA_VXLAN_ID"),
                    port=data.get_attr("IFLA_VXLAN_PORT"),
                    vtep=data.get_attr("IFLA_VXLAN_LOCAL"),
                )
        return None

    # -- the cluster resolver's addresses (dnsplane.py) ------------------------

    def add_dns_address(self, vni: int, subnet: str, address: str) -> None:
        """address on the overlay's br0, and its subnet routed via br0 from it. Idempotent."""

        def apply() -> None:
            ns = self._need_ns(vni, f"DNS address for VNI {vni}")
            with step(f"VNI {vni}: putting {address} on {BRIDGE} with a route for {subnet}"):
                bridge = ns.bridge or ns.index(BRIDGE)
                dnsplane.add_address(ns.ipr, bridge, address)
                dnsplane.route_subnet(ns.ipr, bridge, subnet, address)

        self._call(apply)
