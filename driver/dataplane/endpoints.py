"""Endpoints: one veth pair per endpoint (moby's ov_endpoint.go and joinleave.go).

    pyo<id10>  (container end, host namespace) <-veth-> pyb<id10> (bridge end, port of br0)

libnetwork moves ``pyo<id10>`` into the container and renames it; the bridge
end stays on br0 in the overlay namespace.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from pyroute2.netlink.exceptions import NetlinkError

from .base import (
    BRIDGE,
    BRIDGE_END,
    HOST_END,
    ID_CHARS,
    NTF_MASTER,
    VXLAN,
    DataplaneError,
    check_endpoint_id,
    check_mtu,
    check_vni,
    message,
    missing,
    norm_mac,
    step,
)
from .worker import Handle, Worker


class Deletion(NamedTuple):
    """The key of a veth pair's deferred deletion (Leave's)."""

    short: str  # endpoint_id[:10]
    vni: int

    def __str__(self) -> str:
        return f"deleting veth {HOST_END}{self.short}/{BRIDGE_END}{self.short} of VNI {self.vni}"


def _of_endpoint(short: str):
    return lambda key: isinstance(key, Deletion) and key.short == short


class EndpointStage(Worker):
    @staticmethod
    def endpoint_ifname(endpoint_id: str) -> str:
        """The container end's name before libnetwork renames it."""
        return HOST_END + endpoint_id[:ID_CHARS]

    def create_endpoint(self, vni: int, endpoint_id: str, mac: str, mtu: int) -> str:
        """Make the veth pair; return the container end's name (Join's SrcName).
        Idempotent: a repeat leaves an existing pair in place."""
        check_vni(vni)
        check_mtu(mtu)
        short = check_endpoint_id(endpoint_id)
        mac = norm_mac(mac, "endpoint MAC")
        return self._call(self._create_endpoint, vni, short, mac, mtu)

    def _create_endpoint(self, vni: int, short: str, mac: str, mtu: int) -> str:
        what = f"create_endpoint {short} on VNI {vni}"
        # A pair of this endpoint that a Leave gave up goes first: a Join wants
        # a fresh one, and the deferred deletion must not take the new one later.
        with step(f"{what}: deleting the pair an earlier Leave left"):
            self._run_deferred_now(_of_endpoint(short))
        host_end, bridge_end = HOST_END + short, BRIDGE_END + short
        host = self._host_handle()
        ns = self._need_ns(vni, what)
        with step(f"{what}: finding {BRIDGE}", "delete the network and create it again"):
            if ns.bridge is None:
                ns.bridge = ns.index(BRIDGE)
            if ns.bridge is None:
                raise DataplaneError(
                    f"{what}: {self._path(vni)} has no {BRIDGE}: delete the network and create it again"
                )
        try:
            # One request: the bridge end is born in the overlay namespace,
            # enslaved and up; its peer, the container end, lands in the host
            # namespace with the container's MAC. The kernel undoes all of it
            # if any part fails. libnetwork never sets the MTU: set both.
            ns.ipr.link(
                "add",
                ifname=bridge_end,
                kind="veth",
                mtu=mtu,
                master=ns.bridge,
                state="up",
                peer={"ifname": host_end, "address": mac, "mtu": mtu, "net_ns_fd": host.fd},
            )
            self._forget_learned(ns, mac)
            return host_end
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise DataplaneError(
                    message(f"{what}: creating veth {host_end}/{bridge_end}", os.strerror(e.code), "")
                ) from e
        # A name is taken. If the bridge end is on this network, this is a
        # repeated call: converge and keep the pair (it may already be in use).
        with step(f"{what}: checking the existing veth {host_end}/{bridge_end}"):
            index = ns.index(bridge_end)
            if index is not None:
                ns.ipr.link("set", index=index, master=ns.bridge, mtu=mtu, state="up")
                host_index = host.index(host_end)
                if host_index is not None:  # not moved into a container yet
                    host.ipr.link("set", index=host_index, address=mac, mtu=mtu)
                return host_end
        # Not deleted here: it may be a live endpoint of another network.
        raise DataplaneError(
            f"{what}: {host_end} already exists in the host namespace but is not this network's: "
            f"is the endpoint ID used on another network? If {host_end} is debris, delete it "
            f"(ip link del {host_end}) and retry"
        )

    @staticmethod
    def _forget_learned(ns: Handle, mac: str) -> None:
        """br0 learns remote MACs on vxlan0's port. A MAC that was remote and
        is now local (its IP, hence its MAC, reused here) would stay pinned to
        vxlan0 until it ages out (300 s) and its traffic blackholed: drop it."""
        try:
            ns.ipr.fdb("del", ifindex=ns.index(VXLAN), lladdr=mac, master=ns.bridge, flags=NTF_MASTER)
        except NetlinkError as e:
            if not missing(e):
                raise

    def delete_endpoint(self, vni: int, endpoint_id: str) -> None:
        """Delete the pair wherever its ends are now. Idempotent."""
        check_vni(vni)
        short = check_endpoint_id(endpoint_id)
        self._call(self._delete_endpoint_now, vni, short)

    def delete_endpoint_soon(self, vni: int, endpoint_id: str) -> None:
        """Queue the pair's deletion and return at once (Leave's): the worker
        deletes it when no call waits and retries it while it fails."""
        check_vni(vni)
        short = check_endpoint_id(endpoint_id)
        self._defer(Deletion(short, vni), self._delete_endpoint, vni, short)

    def pending_endpoint_deletions(self) -> set[str]:
        """endpoint_id[:10] of the pairs queued for deletion and not deleted yet."""
        return {key.short for key in self.pending() if isinstance(key, Deletion)}

    def _delete_endpoint_now(self, vni: int, short: str) -> None:
        try:
            self._run_deferred_now(_of_endpoint(short))  # a queued one, on another VNI if so
        finally:
            self._delete_endpoint(vni, short)

    def _delete_endpoint(self, vni: int, short: str) -> None:
        # Deleting either end of a veth deletes the pair. The bridge end is
        # always reachable; the container end may be inside a container.
        with step(f"delete_endpoint {short} on VNI {vni}"):
            ns = self._ns_handle(vni)
            if ns is not None:
                index = ns.index(BRIDGE_END + short)
                if index is not None and ns.link_del(index):
                    return
            host = self._host_handle()
            index = host.index(HOST_END + short)
            if index is not None:
                host.link_del(index)

    def endpoints(self, vni: int) -> set[str]:
        """endpoint_id[:10] of every pair on the network (empty if no network)."""
        check_vni(vni)
        return self._call(self._endpoints, vni)

    def _endpoints(self, vni: int) -> set[str]:
        ns = self._ns_handle(vni)
        if ns is None:
            return set()
        with step(f"listing endpoints of VNI {vni}"):
            names = [link.get_attr("IFLA_IFNAME") for link in ns.ipr.link("dump")]
        return {n[len(BRIDGE_END):] for n in names if n.startswith(BRIDGE_END)}
