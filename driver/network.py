"""The network driver's operations: one method per libnetwork call.

Flow is one way: a call changes the store first (so every host learns of it),
then the kernel through the dataplane; if the kernel refuses, the store change
is undone, so a failed call leaves nothing half-made.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from . import rules
from .blocks import check_block_size, default_block_size
from .defaults import ADDRESS_SPACE, DRIVER_NAME, OPT_ENCRYPTED, TUNNEL_OVERHEAD
from .drift import KernelView, StoreView, drift
from .encryption import check_overlay_encrypted, encrypted_option
from .errors import DriverError
from .gateway import OPT_GATEWAY, GatewayMode, gateway_option
from .rules import (  # noqa: F401 (the rules' names, importable from here as before)
    MIN_MTU, OPT_MTU, OPT_MULTICAST, OPT_VNI, VNI_AUTO_START, VNI_MAX, VNI_MIN, VXLAN_OVERHEAD, parse_ip, parse_subnet,
)
from .model import Address, Endpoint, Network, Overlay
from .state import State

if TYPE_CHECKING:  # the kernel layer's Protocol, without loading netlink here
    from .dataplane.protocol import KernelLayer

log = logging.getLogger(__name__)

OPT_GENERIC = "com.docker.network.generic"
OPT_IPV6 = "com.docker.network.enable_ipv6"
#: Docker 28+: false with --ipv4=false, when the engine requests no IPv4 pool.
OPT_IPV4 = "com.docker.network.enable_ipv4"
OPT_INTERNAL = "com.docker.network.internal"
OPT_BLOCK_SIZE = "block_size"  # prefix length of the per-host address blocks (driver/blocks.py)
ACCEPTED_OPTIONS = (OPT_VNI, OPT_MTU, OPT_BLOCK_SIZE, OPT_MULTICAST, OPT_GATEWAY, OPT_ENCRYPTED, rules.OPT_ENCAP)


class PeerTable(Protocol):
    """What the driver tells the peer sync: which overlays this host carries."""

    def network_added(self, vni: int, multicast: bool = False, encap: str = "") -> None: ...

    def restored(self) -> None:
        """Every overlay this host carries has been named (after a start)."""

    def network_removed(self, vni: int) -> None: ...


class Encrypting(Protocol):
    """What the driver tells the key sync (driver/encryption.py)."""

    def check(self) -> None:
        """Raise DriverError, saying what to do, if this host cannot encrypt."""

    def network_added(self, vni: int) -> None:
        """Before an encrypted overlay's vxlan device is made: the tunnel is up."""

    def network_removed(self, vni: int) -> None:
        """After it is gone."""


class DnsListeners(Protocol):
    """What the driver tells the cluster resolver (driver/dnslisteners.py)."""

    address: str

    def network_added(self, vni: int, subnet: str) -> None: ...

    def network_removed(self, vni: int) -> None: ...


def endpoint_mac(ip) -> str:
    """Locally administered MAC derived from the IP: a reused address keeps its
    MAC, so no host can hold a stale neighbour entry for it. A dual-stack
    endpoint's comes from its IPv4 address; an IPv6-only one's from the last
    40 bits of its IPv6 address (06: first, so it never equals an IPv4 one's):
    in a pool up to a /88 that is the whole host part, and in a /64 the
    allocator's per-host regions (blocks6.py) differ there unless two hosts'
    names hash alike in 24 bits."""
    if ip.version == 6:
        return "06:" + ":".join(f"{b:02x}" for b in ip.packed[-5:])
    return "02:50:" + ":".join(f"{b:02x}" for b in ip.packed)


class NetworkDriver:
    def __init__(self, state: State, dataplane: KernelLayer, peers: PeerTable, host: str, vtep: str,
                 name: str = DRIVER_NAME,
                 dns: Optional[DnsListeners] = None, encryption: Optional[Encrypting] = None,
                 gateway: Optional[GatewayMode] = None):
        self.state = state
        self.encryption = encryption  # None: this plugin was started without encryption
        self.gateway = gateway  # None: -o gateway=pyoverlay is refused (no kernel layer for it)
        self.dns = dns  # None: --no-dns
        # SandboxKey -> the endpoint carrying the resolver's route there (None: not loaded yet).
        self._dns_routes: Optional[dict[str, str]] = None
        self._dns_lock = threading.Lock()
        self.dataplane = dataplane
        self.peers = peers
        self.host = host
        self.vtep = vtep
        self.name = name
        # Calls on one overlay are serialised on this host; hosts race only in the store.
        self._locks: defaultdict[int, threading.Lock] = defaultdict(threading.Lock)
        # Endpoints whose veth Leave queued for deletion: their DeleteEndpoint
        # leaves the kernel alone (the deletion is the netlink worker's now).
        self._left: set[str] = set()
        # The store revision before which this process claimed no address (Ipam.claims_from).
        self.claims_from: Optional[Callable[[], int]] = None
        # Ipam.release_unused, so the allocator hears of what restore frees.
        self.release_unused: Optional[Callable[[str, str, int], bool]] = None

    @staticmethod
    def capabilities() -> dict:
        # Local scope: without swarm the engine refuses global-scope networks;
        # connectivity across hosts is ours to provide.
        return {"Scope": "local", "ConnectivityScope": "global"}

    # Networks

    def create_network(self, network_id: str, options: dict, ipv4_data: list, ipv6_data: list) -> None:
        generic = options.get(OPT_GENERIC) or {}
        v6 = options.get(OPT_IPV6) in (True, "true") or bool(ipv6_data)
        no_v4 = any(v in (False, "false") for v in (options.get(OPT_IPV4), generic.get(OPT_IPV4)))
        if no_v4 and not v6:
            raise DriverError("a network without IPv4 (--ipv4=false) needs IPv6: add --ipv6 and an IPv6 --subnet "
                              "such as fd00:20::/64")
        if no_v4 and ipv4_data:
            # An engine before 28 passes the -o on but still gives the network IPv4.
            raise DriverError("this engine gave the network an IPv4 subnet although "
                              "com.docker.network.enable_ipv4 is false (an IPv6-only network needs Docker 28's "
                              "--ipv4=false); leave the option out for a dual-stack network")
        generic = {k: v for k, v in generic.items() if k != OPT_IPV4}  # true: what pyoverlay does anyway
        unknown = sorted(set(generic) - set(ACCEPTED_OPTIONS))
        if unknown:
            raise DriverError(
                f"unknown option {', '.join('-o ' + u for u in unknown)}; pyoverlay accepts "
                f"-o {OPT_VNI}=<{VNI_MIN}-{VNI_MAX}>, -o {OPT_MTU}=<bytes>, "
                f"-o {OPT_BLOCK_SIZE}=<prefix length>, -o {OPT_MULTICAST}=true|false, "
                f"-o {OPT_GATEWAY}=pyoverlay|docker_gwbridge, -o {OPT_ENCRYPTED}=true|false and "
                f"-o {rules.OPT_ENCAP}=always|cross-subnet|never"
            )
        subnet4 = None if no_v4 else self._subnet(ipv4_data)
        subnet6 = self._subnet(ipv6_data, v6=True) if v6 else None
        # The overlay is known by its IPv4 subnet; an IPv6-only one by its IPv6 subnet.
        subnet = subnet4 or subnet6
        dual6 = (subnet6 or "") if subnet4 else ""
        block_size = None
        if OPT_BLOCK_SIZE in generic:
            if not subnet4:
                raise DriverError(f"-o {OPT_BLOCK_SIZE} sizes the IPv4 address blocks, and this network has no "
                                  "IPv4; leave the option out (IPv6 addresses come from a /112 per host)")
            block_size = check_block_size(ipaddress.ip_network(subnet), generic[OPT_BLOCK_SIZE])
        max_mtu = self.dataplane.underlay_mtu() - VXLAN_OVERHEAD
        vni = rules.vni_option(generic)
        multicast = rules.multicast_option(generic)
        gateway_mode = gateway_option(generic)
        # The gateway of `subnet` (IPv6 on an IPv6-only network), and a dual-stack network's IPv6 one.
        gateway = self._gateway_address(ipv6_data if no_v4 else ipv4_data, gateway_mode)
        gateway6 = self._gateway_address(ipv6_data, gateway_mode) if dual6 else ""
        encrypted = encrypted_option(generic)
        encap = rules.encap_option(generic)
        rules.check_encap_fits(encap, multicast, encrypted, bool(subnet6))

        if self.state.network(network_id):
            return  # the engine repeated itself
        joined = self._overlay_to_join(subnet, vni)
        # Encrypted: asked for, or the overlay being joined is. Refused here,
        # before any write, when this host cannot encrypt.
        checked = self._encryptable(encrypted if encrypted is not None else bool(joined and joined.encrypted))
        if checked:
            max_mtu -= TUNNEL_OVERHEAD
        # Routed only: nothing is encapsulated, so the underlay's whole MTU.
        if (encap if encap is not None else (joined.encap if joined else "")) == rules.ENCAP_NEVER:
            max_mtu += VXLAN_OVERHEAD
        mtu = rules.mtu_option(generic, max_mtu)
        vni = self._join_overlay(network_id, subnet, vni, mtu, max_mtu, block_size, multicast, encrypted, dual6,
                                 encap)
        with self._locks[vni]:
            overlay = self.state.overlay(vni)
            if overlay.encrypted and not checked:  # made encrypted by another host meanwhile
                try:
                    self._encryptable(True)
                except DriverError:
                    self._leave_overlay(vni, network_id)
                    raise
            network = Network(
                network_id=network_id, vni=vni, host=self.host, mtu=overlay.mtu,
                subnet=subnet, internal=options.get(OPT_INTERNAL) in (True, "true"),
                gateway_mode=gateway_mode, gateway=gateway, subnet6=dual6, gateway6=gateway6,
            )
            try:
                self.state.create_network(network)
                if overlay.encrypted:
                    self.encryption.network_added(vni)  # the tunnel first: never a clear-text moment
                    self.dataplane.create_network(vni, network.mtu, encrypted=True)
                else:
                    self.dataplane.create_network(vni, network.mtu)
                if overlay.encap:
                    try:
                        self.dataplane.create_direct(vni)
                    except Exception:
                        self.dataplane.delete_network(vni)
                        raise
                if self.dns is not None and subnet4:  # the resolver answers on IPv4 only
                    try:
                        self.dns.network_added(vni, subnet)
                    except Exception:
                        self.dns.network_removed(vni)
                        self.dataplane.delete_network(vni)
                        raise
                if gateway_mode:
                    try:
                        self.gateway.network_created(network)
                    except Exception:
                        if self.dns is not None:
                            self.dns.network_removed(vni)
                        self.dataplane.delete_network(vni)
                        self.state.delete_network(network_id)
                        self.gateway.sync()  # its uplink is gone with the namespace; so go its rules
                        raise
            except Exception:
                if overlay.encrypted:
                    self.encryption.network_removed(vni)
                self._leave_overlay(vni, network_id)
                self.state.delete_network(network_id)
                raise
            self._peers_added(vni, overlay.multicast, overlay.encap)
        log.info("network %s: overlay vni %d subnet %s mtu %d", network_id[:12], vni,
                 " ".join(network.subnets()), network.mtu)

    def _peers_added(self, vni: int, multicast: bool, encap: str) -> None:
        # encap only when set: peer tables that predate direct mode take (vni, multicast).
        if encap:
            self.peers.network_added(vni, multicast, encap)
        else:
            self.peers.network_added(vni, multicast)

    def _overlay_to_join(self, subnet: str, vni: Optional[int]) -> Optional[Overlay]:
        """The overlay this network would join (by VNI, else by subnet), if one exists: its
        settings decide what options left out mean."""
        if vni is None:
            claim = self.state.subnet_claim(subnet)
            vni = claim.vni if claim else None
        return self.state.overlay(vni) if vni is not None else None

    def _encryptable(self, encrypted: bool) -> bool:
        """encrypted, once it is known that this host can encrypt (else DriverError)."""
        if encrypted:
            if self.encryption is None:
                raise DriverError("this pyoverlay plugin runs without encryption; start it with encryption "
                                  "(the default) or create the network without -o encrypted=true")
            self.encryption.check()
        return encrypted

    def _subnet(self, data: list, v6: bool = False) -> str:
        if len(data) != 1:
            if v6:
                raise DriverError("a pyoverlay network with --ipv6 needs exactly one IPv6 subnet: pass one IPv6 "
                                  "--subnet such as fd00:20::/64")
            raise DriverError("a pyoverlay network needs exactly one IPv4 subnet: pass one --subnet")
        data = data[0]
        if data.get("AddressSpace") != ADDRESS_SPACE:
            raise DriverError(
                "this network's addresses come from another IPAM driver, which hands out the "
                "same addresses on every host; create it with: docker network create "
                f"-d {self.name} --ipam-driver {self.name} --subnet <cidr> <name>"
            )
        return str(parse_subnet(data.get("Pool", ""), v6=v6))

    def _gateway_address(self, ip_data: list, gateway_mode: str) -> str:
        """The gateway address Join returns in gateway mode ("" otherwise)."""
        if not gateway_mode:
            return ""
        if self.gateway is None:
            raise DriverError(f"-o {OPT_GATEWAY}={gateway_mode} is not available in this pyoverlay process; "
                              f"leave the option out (the engine's docker_gwbridge then carries egress and -p)")
        gateway = (ip_data[0].get("Gateway") or "") if ip_data else ""
        if not gateway:
            raise DriverError(f"-o {OPT_GATEWAY}={gateway_mode} needs a gateway address: leave --gateway out "
                              "(pyoverlay's IPAM picks one) or give one inside the subnet")
        return str(parse_ip(gateway, v6=True))  # the family is the caller's: it passes one family's data

    def _join_overlay(self, network_id: str, subnet: str, vni: Optional[int], mtu: Optional[int], max_mtu: int,
                      block_size: Optional[int] = None, multicast: Optional[bool] = None,
                      encrypted: Optional[bool] = None, subnet6: str = "", encap: Optional[str] = None) -> int:
        """Find or make the overlay for this subnet/VNI and record this host on it."""
        for _ in range(20):
            claim = self.state.subnet_claim(subnet)
            rules.check_subnet_vni(subnet, vni, claim.vni if claim else None)
            target = vni if vni is not None else (claim.vni if claim else self._free_vni())
            overlay = self.state.overlay(target)
            if overlay is None:
                overlay = Overlay(vni=target, subnet=subnet, mtu=mtu or max_mtu, networks={self.host: network_id},
                                  block_size=block_size or 0, multicast=bool(multicast), encrypted=bool(encrypted),
                                  subnet6=subnet6, encap="" if encap in (None, rules.ENCAP_ALWAYS) else encap)
                if self.state.create_overlay(overlay, claim_subnet=claim is None):
                    return target
                continue  # another host made it first: join theirs

            def join(current: Optional[Overlay]) -> Overlay:
                if current is None:
                    raise _Retry()
                rules.check_vni_subnet(target, subnet, current.subnet)
                rules.check_overlay_mtu(target, mtu, current.mtu)
                rules.check_overlay_multicast(target, multicast, current.multicast)
                check_overlay_encrypted(target, encrypted, current.encrypted)
                rules.check_overlay_subnet6(target, subnet6, current.subnet6)
                rules.check_overlay_encap(target, encap, current.encap)
                used = current.block_size or default_block_size(ipaddress.ip_network(subnet))
                if block_size is not None and block_size != used:
                    raise DriverError(
                        f"the pyoverlay network with VNI {target} uses address blocks of "
                        f"/{used} on other hosts; use -o {OPT_BLOCK_SIZE}={used} or leave the option out"
                    )
                rules.check_underlay_carries(target, current.mtu, max_mtu)
                other = current.networks.get(self.host)
                if other and other != network_id:
                    raise DriverError(
                        f"this host already has a pyoverlay network with VNI {target} "
                        f"(network id {other[:12]}); use that network or remove it first"
                    )
                current.networks[self.host] = network_id
                return current

            try:
                self.state.update_overlay(target, join)
                return target
            except _Retry:
                continue
        raise DriverError("the store is too busy to create the network; retry the command")

    def _free_vni(self) -> int:
        return rules.free_vni({o.vni for o in self.state.overlays()})

    def _leave_overlay(self, vni: int, network_id: str) -> None:
        def leave(current: Optional[Overlay]) -> Optional[Overlay]:
            if current is None:
                return None
            if current.networks.get(self.host) == network_id:
                del current.networks[self.host]
            return current if current.networks else None

        overlay = self.state.overlay(vni)
        if self.state.update_overlay(vni, leave) is None and overlay is not None:
            self.state.delete_subnet_claim(overlay.subnet)

    def delete_network(self, network_id: str) -> None:
        network = self.state.network(network_id)
        if network is None or network.host != self.host:
            return  # engine clean-up of a network we no longer know
        with self._locks[network.vni]:
            # Endpoints the engine forgot (it crashed mid-way) must not outlive the network.
            for endpoint in self.state.endpoints():
                if endpoint.network_id == network_id:
                    self._remove_endpoint(endpoint)
            self.peers.network_removed(network.vni)
            if self.dns is not None:
                self.dns.network_removed(network.vni)
            self.dataplane.delete_network(network.vni)
            if self.encryption is not None:
                self.encryption.network_removed(network.vni)  # after its vxlan device: see encryption.py
            self._leave_overlay(network.vni, network_id)
            self.state.delete_network(network_id)
            if network.gateway_mode and self.gateway is not None:
                self.gateway.sync()  # the uplink went with the namespace; its rules go now
        log.info("network %s removed (vni %d)", network_id[:12], network.vni)

    # Endpoints

    def _network(self, network_id: str) -> Network:
        network = self.state.network(network_id)
        if network is None:
            raise DriverError(
                f"network {network_id[:12]} is not known to pyoverlay on this host; "
                "remove it with docker network rm and create it again"
            )
        return network

    def _endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = self.state.endpoint(endpoint_id)
        if endpoint is None:
            raise DriverError(f"endpoint {endpoint_id[:12]} is not known to pyoverlay on this host")
        return endpoint

    def create_endpoint(self, network_id: str, endpoint_id: str, interface: dict) -> dict:
        network = self._network(network_id)
        nets = {n.version: n for n in map(ipaddress.ip_network, network.subnets())}
        given = {4: interface.get("Address") or "", 6: interface.get("AddressIPv6") or ""}
        if given[6] and 6 not in nets:
            raise DriverError("this network has no IPv6; leave out --ip6, or create the network with --ipv6 and "
                              "an IPv6 --subnet")
        if given[4] and 4 not in nets:
            raise DriverError("this network has no IPv4 (--ipv4=false); leave out --ip")
        for version in nets:
            if not given[version]:
                raise DriverError(f"the endpoint has no IPv{version} address; create the network with "
                                  f"--ipam-driver {self.name}")
        ips = {}
        for version, net in nets.items():
            ip = parse_ip(given[version], v6=True)
            if ip.version != version or ip not in net:
                raise DriverError(f"address {ip} is outside the network's subnet {net}")
            ips[version] = ip
        for version, ip in ips.items():
            self._hold_address(str(nets[version]), ip)
        mac = interface.get("MacAddress") or endpoint_mac(ips.get(4) or ips[6])
        cidr = {v: f"{ip}/{nets[v].prefixlen}" for v, ip in ips.items()}
        endpoint = Endpoint(
            endpoint_id=endpoint_id, network_id=network_id, vni=network.vni, host=self.host,
            address=cidr.get(4) or cidr[6], mac=mac, vtep=self.vtep, address6=cidr[6] if 4 in cidr and 6 in cidr else "",
        )
        # The peer record goes out now, before the container starts, so every
        # host can reach it the moment it runs.
        if not self.state.create_endpoint(endpoint):
            existing = self.state.endpoint(endpoint_id)
            if existing is None or replace(existing, sandbox="", dns_route=False, ports=[]) != endpoint:
                raise DriverError(f"endpoint {endpoint_id[:12]} already exists with other settings")
        return {} if interface.get("MacAddress") else {"Interface": {"MacAddress": mac}}

    def _hold_address(self, subnet: str, ip) -> None:
        """The endpoint's address must be claimed by this host. It normally is
        (RequestAddress came first); if a restart released it as an orphan
        (see restore), claim it again rather than share it with a later container."""
        holder = self.state.address(subnet, str(ip))
        if holder is None and self.state.claim_address(subnet, str(ip), Address.container(self.host)):
            return
        holder = holder or self.state.address(subnet, str(ip))
        if holder is not None and (holder.kind != "container" or holder.host != self.host):
            what = "the network's gateway" if holder.kind == "gateway" else f"in use on host {holder.host}"
            raise DriverError(f"address {ip} is {what}; remove the container and start it again")

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        endpoint = self.state.endpoint(endpoint_id)
        left = endpoint_id in self._left
        if endpoint is not None and endpoint.host == self.host:
            self._remove_endpoint(endpoint, kernel=not left)
        self._left.discard(endpoint_id)

    def _remove_endpoint(self, endpoint: Endpoint, kernel: bool = True) -> None:
        if kernel:
            self.dataplane.delete_endpoint(endpoint.vni, endpoint.endpoint_id)
        self.state.delete_endpoint(endpoint)  # its DNS name goes now, not at the next event
        self._forget_dns_route(endpoint)
        if endpoint.ports and self.gateway is not None:
            self.gateway.sync()  # the engine did not revoke them (it crashed): they go with the record

    def endpoint_oper_info(self, network_id: str, endpoint_id: str) -> dict:
        endpoint = self._endpoint(endpoint_id)
        network = self._network(network_id)
        return {
            "host": endpoint.host,
            "vtep": endpoint.vtep,
            "vni": endpoint.vni,
            "mtu": network.mtu,
            "address": endpoint.address,
            **({"address6": endpoint.address6} if endpoint.address6 else {}),
            "mac": endpoint.mac,
            "interface": self.dataplane.endpoint_ifname(endpoint_id),
            "overlay_namespace": self.dataplane.netns_name(endpoint.vni),
            **GatewayMode.oper_info(endpoint),
        }

    def join(self, network_id: str, endpoint_id: str, sandbox_key: str) -> dict:
        network = self._network(network_id)
        endpoint = self._endpoint(endpoint_id)
        self._left.discard(endpoint_id)
        ifname = self.dataplane.create_endpoint(network.vni, endpoint_id, endpoint.mac, network.mtu)
        # No Gateway: the engine then gives the container docker_gwbridge for
        # traffic leaving the overlay and for published ports (as Docker's overlay).
        response = {"InterfaceName": {"SrcName": ifname, "DstPrefix": "eth"}}
        if self.gateway is not None:
            # Gateway mode: no docker_gwbridge endpoint; the engine asks us to publish ports.
            response.update(self.gateway.join_gateways(network))
        if self.dns is not None and ":" not in endpoint.ip and self._carries_dns_route(endpoint, sandbox_key):
            # The resolver's address, on this interface: its queries then come
            # from the container's overlay address, on internal networks too.
            response["StaticRoutes"] = [{"Destination": f"{self.dns.address}/32", "RouteType": 1}]
        return response

    def _carries_dns_route(self, endpoint: Endpoint, sandbox_key: str) -> bool:
        """Is this the sandbox's first pyoverlay endpoint (or the one that already has the route)?"""
        if not sandbox_key:
            return False
        with self._dns_lock:
            if self._dns_routes is None:
                self._dns_routes = {e.sandbox: e.endpoint_id for e in self.state.endpoints(host=self.host)
                                    if e.dns_route and e.sandbox}
            holder = self._dns_routes.get(sandbox_key)
            if holder is not None and holder != endpoint.endpoint_id:
                return False

            def mark(current: Optional[Endpoint]) -> Optional[Endpoint]:
                if current is None:
                    raise DriverError(f"endpoint {endpoint.endpoint_id[:12]} is not known to pyoverlay on this host")
                return replace(current, sandbox=sandbox_key, dns_route=True)

            self.state.update_endpoint(endpoint.endpoint_id, mark)
            self._dns_routes[sandbox_key] = endpoint.endpoint_id
            return True

    def _forget_dns_route(self, endpoint: Endpoint) -> None:
        with self._dns_lock:
            if self._dns_routes is not None and endpoint.sandbox and \
                    self._dns_routes.get(endpoint.sandbox) == endpoint.endpoint_id:
                del self._dns_routes[endpoint.sandbox]

    def leave(self, network_id: str, endpoint_id: str) -> None:
        endpoint = self.state.endpoint(endpoint_id)
        if endpoint is not None and endpoint.host == self.host:
            # Answered before the veth is gone: its deletion is most of the
            # cost of a container's endpoint cycle, and nothing waits on it.
            # The pair's name is the endpoint's, which no other Join uses; a
            # kill before it is done leaves a veth restore() deletes.
            self.dataplane.delete_endpoint_soon(endpoint.vni, endpoint_id)
            self._left.add(endpoint_id)
            if endpoint.dns_route:
                # Its interface, and the route with it, left the sandbox: a later
                # Join there may carry it. (The record goes at DeleteEndpoint, next.)
                self._forget_dns_route(endpoint)

    def program_external_connectivity(self, network_id: str, endpoint_id: str, options: dict) -> None:
        network = self.state.network(network_id)
        if network is None or not network.gateway_mode or self.gateway is None:
            return  # docker_gwbridge mode: the engine publishes ports through its bridge
        self.gateway.program(network, self._endpoint(endpoint_id), options)

    def revoke_external_connectivity(self, network_id: str, endpoint_id: str) -> None:
        if self.gateway is not None and endpoint_id:
            self.gateway.revoke(endpoint_id)

    # Start-up

    def restore(self) -> None:
        """Make the kernel match the store after a (re)start: networks this host
        holds exist, nothing else of ours does."""
        networks = self.state.networks(host=self.host)
        endpoints = self.state.endpoints(host=self.host)
        wanted = {n.vni: n for n in networks}
        store = StoreView(networks=set(wanted), vtep=self.vtep, endpoints={
            vni: {e.endpoint_id[:10] for e in endpoints if e.vni == vni} for vni in wanted})
        namespaces = self.dataplane.networks()
        kernel = KernelView(namespaces=namespaces,
                            veths={vni: self.dataplane.endpoints(vni) for vni in set(wanted) & namespaces})
        found = drift(store, kernel)
        for vni in found.stale_namespaces:
            self.dataplane.delete_network(vni)
        overlays = self.state.overlays()
        multicast = {o.vni for o in overlays if o.multicast}
        encrypted = {o.vni for o in overlays if o.encrypted}
        encap = {o.vni: o.encap for o in overlays if o.encap}
        for vni, network in wanted.items():
            with self._locks[vni]:
                # Missing namespaces are made; present ones converge (MTU) and
                # their vxlan device is checked against this host's flags.
                if vni in encrypted:
                    if not self._restore_encrypted(vni, network):
                        continue
                else:
                    self.dataplane.create_network(vni, network.mtu)
                if vni in encap:
                    self.dataplane.create_direct(vni)  # the macvlan again, if the namespace was made anew
                if self.dns is not None and ":" not in network.subnet:
                    self.dns.network_added(vni, network.subnet)
                for stale in found.stale_veths.get(vni, ()):
                    self.dataplane.delete_endpoint(vni, stale)
                self._peers_added(vni, vni in multicast, encap.get(vni, ""))
        self.peers.restored()
        if self.gateway is not None:
            # Uplinks of gateway-mode networks, and the NAT table rewritten from
            # the store: a rule of an endpoint gone while we were down goes.
            self.gateway.restore(wanted.values())
        released = self._release_orphan_addresses()
        log.info("restored %d networks, %d endpoints; released %d orphan addresses",
                 len(networks), len(endpoints), released)

    def _restore_encrypted(self, vni: int, network: Network) -> bool:
        """The tunnel (kept running across the restart, or started again), then
        the network. If this host can no longer encrypt, the network is left as
        it is: its vxlan device's traffic stays blackholed, never clear."""
        try:
            self._encryptable(True)
            self.encryption.network_added(vni)
        except Exception as e:
            log.error("network %s (vni %d) is encrypted but this host cannot encrypt now: %s; "
                      "it carries no traffic until that is fixed and the plugin restarted",
                      network.network_id[:12], vni, e)
            return False
        self.dataplane.create_network(vni, network.mtu, encrypted=True)
        return True

    def _release_orphan_addresses(self) -> int:
        """Container addresses this host claimed that no endpoint uses. A crash
        between claiming an address and answering RequestAddress leaves one the
        engine never learnt of, so it can never release it. (One the engine
        did get, and uses in a CreateEndpoint after the restart, is claimed
        again there: _hold_address.)"""
        # Claims this process made (requests answered while restore ran) are
        # newer than the IPAM's first read of the addresses: never orphans.
        before = self.claims_from() if self.claims_from is not None else None
        used = {address for e in self.state.endpoints() for address in e.addresses()}
        released = 0
        for pool in self.state.pools():
            if self.host not in pool.hosts:
                continue
            for ip, address, revision in self.state.addresses(pool.subnet):
                if before is not None and revision > before:
                    continue
                if address.kind == "container" and address.host == self.host and (pool.subnet, ip) not in used:
                    # Only if unchanged since read: a claim made meanwhile is live.
                    release = self.release_unused or self.state.release_address_if_unchanged
                    released += release(pool.subnet, ip, revision)
        return released


class _Retry(Exception):
    pass
