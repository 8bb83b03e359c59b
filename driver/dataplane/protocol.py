"""What the network driver (driver/network.py) asks of the kernel layer.

Dataplane satisfies it; a unit test hands NetworkDriver a recording stand-in
instead (tests/test_network.py), so the driver's operations are tested
without the kernel. Peer sync asks only set_peers/add_peer/remove_peer and
add_flood/remove_flood (tests/test_peersync.py's stand-in, checked against
Dataplane's signatures there).
"""

from __future__ import annotations

from typing import Protocol


class KernelLayer(Protocol):
    def underlay_mtu(self) -> int:
        """MTU of the interface holding this host's vtep address."""

    def create_network(self, vni: int, mtu: int, encrypted: bool = False) -> None:
        """Namespace, br0 and vxlan0 for the overlay; idempotent, converges the MTU.
        encrypted: vxlan0 on the encrypted port, whose traffic goes through the tunnel."""

    def create_direct(self, vni: int) -> None:
        """Direct mode's macvlan and routing in the overlay namespace (after create_network); idempotent."""

    def delete_network(self, vni: int) -> None:
        """The namespace and everything in it; idempotent."""

    def networks(self) -> set[int]:
        """VNIs whose overlay namespace exists on this host."""

    def create_endpoint(self, vni: int, endpoint_id: str, mac: str, mtu: int) -> str:
        """The veth pair; returns the container end's interface name."""

    def delete_endpoint(self, vni: int, endpoint_id: str) -> None:
        """The veth pair, wherever its ends are; idempotent."""

    def delete_endpoint_soon(self, vni: int, endpoint_id: str) -> None:
        """Queue the pair's deletion and return at once; done in the
        background, retried while it fails, before delete_network returns."""

    def endpoints(self, vni: int) -> set[str]:
        """endpoint_id[:10] of every veth pair on the overlay."""

    def endpoint_ifname(self, endpoint_id: str) -> str:
        """The container end's name before libnetwork renames it."""

    def netns_name(self, vni: int) -> str:
        """The overlay namespace's path (for operators)."""
