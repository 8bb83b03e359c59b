"""Everything pyoverlay asks of the kernel, in one package (the only one that
imports pyroute2 or runs nft). One file per stage, behind one front class:

    worker.py     the netlink worker thread and its per-namespace handles
    host.py       the host namespace: underlay address, MTU, routes
    networks.py   a network's namespace, br0 and vxlan0
    endpoints.py  an endpoint's veth pair
    peers.py      vxlan0's FDB and neighbour table (set_peers: dump, plan, apply)
    firewall.py   the VXLAN source filter (nft)
    egress.py     gateway mode: a network's uplink to the host (-o gateway=pyoverlay)
    natrules.py   gateway mode: egress masquerade and published ports (nft)
    crypto.py     encrypted overlays: the WireGuard tunnel between hosts
    direct.py     direct mode (-o encap=...): direct0 and routes to peers on the underlay subnet
    dnsplane.py   the cluster resolver's addresses, routes and sockets
    protocol.py   what the network driver asks of all this (for stand-ins)

Layout on one host, for the overlay with VNI ``n``::

    host namespace                      overlay namespace <netns_dir>/pyo-<n>
    --------------                      -------------------------------------
    underlay NIC (vtep)                 br0 ---- vxlan0 (VNI n, dstport, local vtep)
    UDP socket :dstport  <------------- (vxlan0's socket stays in the host ns)
    pyo<id10>  (container end) <-veth-> pyb<id10> (bridge end, port of br0)

The bridge lives in a namespace of its own, as in Docker's overlay driver, so
the engine's iptables FORWARD policy never sees its frames. The host's
underlay address is called ``vtep`` throughout this package.
"""

from __future__ import annotations

from .base import DataplaneError
from .egress import EgressStage
from .crypto import CryptoStage
from .direct import DirectStage
from .endpoints import EndpointStage
from .host import HostStage, default_route_address
from .networks import NetworkStage, VxlanSettings
from .peers import PeerStage
from .protocol import KernelLayer

__all__ = ["Dataplane", "DataplaneError", "KernelLayer", "VxlanSettings", "default_route_address"]


class Dataplane(HostStage, NetworkStage, EndpointStage, PeerStage, EgressStage, CryptoStage, DirectStage):
    """One host's overlays: namespaces, bridges, vxlans, veths and peers.

    Dataplane(vtep, vxlan_port=4789, netns_dir="/run/netns", host_netns=None)

    Thread-safe; every kernel call runs on one worker thread (worker.py).
    Netlink handles open on first use, one per namespace, and the one for an
    overlay closes when its network is deleted. Each stage is a file of its
    own; they share only the worker's state (handles, vtep, port, netns_dir).
    """
