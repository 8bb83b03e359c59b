"""Gateway mode (-o gateway=pyoverlay): pyoverlay's own egress and published ports.

In the default mode (-o gateway=docker_gwbridge) Join returns no Gateway and
the engine gives every container a second endpoint on docker_gwbridge, which
carries egress and -p. In gateway mode Join returns the network's gateway
address (on br0 in the overlay namespace), so the engine adds no second
endpoint; the network leaves its namespace through an uplink to the host
(dataplane/egress.py), and the engine hands published ports to us through
ProgramExternalConnectivity / RevokeExternalConnectivity, which become DNAT
rules in the host (dataplane/natrules.py).

What the kernel holds is derived from the store every time (sync): the
uplinks of this host's gateway-mode networks and the ports of its
endpoints. So a restart, a killed container or a failed call all converge to
the same table, and a removed endpoint's rule goes with its record.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from dataclasses import replace
from typing import Iterable, Optional

from .errors import DriverError
from .model import Endpoint, Network
from .state import State

log = logging.getLogger(__name__)

OPT_GATEWAY = "gateway"
MODE_PYOVERLAY = "pyoverlay"
MODE_GWBRIDGE = "docker_gwbridge"
PORTMAP = "com.docker.network.portmap"
EXPOSED = "com.docker.network.endpoint.exposedports"
PROTOS = {6: "tcp", 17: "udp", 132: "sctp"}
SOCKET_TYPES = {6: socket.SOCK_STREAM, 17: socket.SOCK_DGRAM}


def gateway_option(generic: dict) -> str:
    """-o gateway=pyoverlay|docker_gwbridge: "pyoverlay", or "" for the engine's docker_gwbridge."""
    value = generic.get(OPT_GATEWAY)
    if value is None or value == MODE_GWBRIDGE:
        return ""
    if value == MODE_PYOVERLAY:
        return MODE_PYOVERLAY
    raise DriverError(f"-o {OPT_GATEWAY}={value} is not valid: use -o {OPT_GATEWAY}={MODE_PYOVERLAY} (pyoverlay "
                      f"carries egress and -p itself) or -o {OPT_GATEWAY}={MODE_GWBRIDGE} (the default: the "
                      "engine's docker_gwbridge does)")


def _bindings(options: dict, families: frozenset = frozenset({4})) -> list[dict]:
    """The engine's port bindings, checked, one per family. families: the
    endpoint's; a binding of a family it lacks is left out (engine 28 sends a
    :: binding beside 0.0.0.0 for each -p). A binding with no address (engine
    20.10) stands for every family the endpoint has. Stored HostIP: "" (every
    IPv4 address, as before IPv6), "::" (every IPv6 address) or the address given."""
    raw = options.get(PORTMAP) or []
    out: list[dict] = []
    for b in raw:
        if not isinstance(b, dict):
            raise DriverError(f"{PORTMAP}: each binding must be an object, got {b!r}")
        proto, port = b.get("Proto"), b.get("Port")
        host_port, host_end = b.get("HostPort") or 0, b.get("HostPortEnd") or 0
        host_ip = b.get("HostIP") or ""
        if proto not in PROTOS:
            raise DriverError(f"{PORTMAP}: protocol {proto!r} is not supported: publish tcp or udp ports")
        if proto not in SOCKET_TYPES:
            raise DriverError(f"-p .../{PROTOS[proto]} is not supported in gateway mode: publish tcp or udp ports")
        for what, value in (("Port", port), ("HostPort", host_port), ("HostPortEnd", host_end)):
            if not isinstance(value, int) or not 0 <= value <= 65535 or (what == "Port" and value == 0):
                raise DriverError(f"{PORTMAP}: {what} {value!r} is not a port number")
        try:
            ip = ipaddress.ip_address(host_ip) if host_ip else None
        except ValueError:
            raise DriverError(f"{PORTMAP}: host address {host_ip!r} is not an IP address") from None
        if host_end and host_port and host_end < host_port:
            raise DriverError(f"-p {host_port}-{host_end}: the host port range is empty")
        if ip is None:
            addresses = [a for f, a in ((4, ""), (6, "::")) if f in families]
        elif ip.version not in families:
            continue
        else:
            addresses = ["" if ip.version == 4 and ip.is_unspecified else str(ip)]
        for address in addresses:
            binding = {"Proto": proto, "Port": port, "HostIP": address, "HostPort": host_port,
                       "HostPortEnd": host_end or host_port}
            if binding not in out:  # an engine may send both "" and 0.0.0.0/::
                out.append(binding)
    return out


def _family(host_ip: str) -> int:
    return 4 if not host_ip else ipaddress.ip_address(host_ip).version


def _overlaps(a: dict, b: dict) -> bool:
    if a["Proto"] != b["Proto"] or a["HostPort"] != b["HostPort"] or _family(a["HostIP"]) != _family(b["HostIP"]):
        return False
    return (ipaddress.ip_address(a["HostIP"] or "0.0.0.0").is_unspecified
            or ipaddress.ip_address(b["HostIP"] or "0.0.0.0").is_unspecified or a["HostIP"] == b["HostIP"])


def _bindable(proto: int, host_ip: str, port: int) -> Optional[int]:
    """None if port is free on host_ip (""=every IPv4 address, "::" every IPv6
    one) for proto, else the errno. Port 0: the kernel picks a free one;
    returned negated (-port) so it is told apart."""
    v6 = _family(host_ip) == 6
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, SOCKET_TYPES[proto]) as s:
        if proto == 6:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4's side is checked on its own
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as e:
            return e.errno
        return -s.getsockname()[1] if port == 0 else None


class GatewayMode:
    """Gateway mode's operations, called from NetworkDriver's hooks.

    dataplane: add_egress(vni, subnet, gateway); nat: NatTable (apply(uplinks, mappings))."""

    def __init__(self, state: State, dataplane, nat, host: str):
        self.state = state
        self.dataplane = dataplane
        self.nat = nat
        self.host = host
        self._lock = threading.Lock()  # port choice and the table's rewrite, one at a time

    # -- networks -----------------------------------------------------------------

    @staticmethod
    def wants_egress(network: Network) -> bool:
        return network.gateway_mode == MODE_PYOVERLAY and not network.internal

    def _add_egress(self, network: Network) -> None:
        v6 = (network.subnet6, network.gateway6) if network.subnet6 and network.gateway6 else ()
        self.dataplane.add_egress(network.vni, network.subnet, network.gateway, *v6)

    def network_created(self, network: Network) -> None:
        if not self.wants_egress(network):
            return
        self._add_egress(network)
        self.sync()

    def join_gateways(self, network: Network) -> dict:
        """What Join adds: Gateway and GatewayIPv6 ({}: the engine's docker_gwbridge, or --internal)."""
        if not self.wants_egress(network):
            return {}
        out = {}
        for gateway in (network.gateway, network.gateway6):
            if gateway:
                out["GatewayIPv6" if ":" in gateway else "Gateway"] = gateway
        return out

    def restore(self, networks: Iterable[Network]) -> None:
        wanted = [n for n in networks if self.wants_egress(n)]
        for network in wanted:
            self._add_egress(network)
        try:
            self.sync()
        except DriverError as exc:
            if wanted:
                raise  # restore retries: this host's gateway-mode networks need the table
            # A host that uses no gateway mode must not fail its start for want of nft.
            log.warning("%s (no gateway-mode network on this host: nothing needs it)", exc)

    # -- published ports ----------------------------------------------------------

    def program(self, network: Network, endpoint: Endpoint, options: dict) -> None:
        """ProgramExternalConnectivity: publish the endpoint's -p. Checks every
        binding before anything changes; a refusal changes nothing."""
        if not self.wants_egress(network):
            return  # docker_gwbridge mode: the engine publishes through its bridge
        with self._lock:
            wanted = _bindings(options, frozenset(ipaddress.ip_address(ip).version for _, ip in endpoint.addresses()))
            taken = [(b, e) for e in self.state.endpoints(host=self.host) if e.endpoint_id != endpoint.endpoint_id
                     for b in e.ports]
            resolved: list[dict] = []
            for binding in wanted:
                # Both families of one -p get one host port where they can (as the engine's bridge).
                twin = next((r for w, r in zip(wanted, resolved) if _family(w["HostIP"]) != _family(binding["HostIP"])
                             and dict(w, HostIP="") == dict(binding, HostIP="")), None)
                resolved.append(self._choose(binding, taken + [(b, endpoint) for b in resolved],
                                             twin["HostPort"] if twin else 0))
            previous = list(endpoint.ports)
            if resolved == previous:
                return  # most containers publish nothing: no store write, no nft run
            self._set_ports(endpoint.endpoint_id, resolved)
            try:
                self._apply()
            except Exception:
                self._set_ports(endpoint.endpoint_id, previous)
                raise
        if resolved:
            log.info("endpoint %s: published %s", endpoint.endpoint_id[:12], ", ".join(
                f"{b['HostIP'] or '*'}:{b['HostPort']}->{b['Port']}/{PROTOS[b['Proto']]}" for b in resolved))

    def _choose(self, binding: dict, taken: list[tuple[dict, Endpoint]], prefer: int = 0) -> dict:
        proto = PROTOS[binding["Proto"]]
        first, last = binding["HostPort"], binding["HostPortEnd"]
        where = {"": "every IPv4 address of this host", "::": "every IPv6 address of this host"}.get(
            binding["HostIP"], binding["HostIP"])
        if prefer and (first == 0 or first <= prefer <= last):
            candidate = dict(binding, HostPort=prefer, HostPortEnd=prefer)
            if not any(_overlaps(candidate, b) for b, _ in taken) and \
                    _bindable(binding["Proto"], binding["HostIP"], prefer) is None:
                return candidate
        if first == 0:
            for _ in range(20):  # the kernel's pick, unless one of ours holds it
                got = _bindable(binding["Proto"], binding["HostIP"], 0)
                if got is not None and got < 0:
                    candidate = dict(binding, HostPort=-got, HostPortEnd=-got)
                    if not any(_overlaps(candidate, b) for b, _ in taken):
                        return candidate
            raise DriverError(f"no free {proto} port to publish container port {binding['Port']} on {where}; "
                              "free some ports or publish a given one (-p HOSTPORT:PORT)")
        reasons = []
        for port in range(first, last + 1):
            candidate = dict(binding, HostPort=port, HostPortEnd=port)
            holder = next((e for b, e in taken if _overlaps(candidate, b)), None)
            if holder is not None:
                reasons.append(f"published by pyoverlay endpoint {holder.endpoint_id[:12]}")
                continue
            err = _bindable(binding["Proto"], binding["HostIP"], port)
            if err is None:
                return candidate
            if err == errno.EADDRNOTAVAIL:
                raise DriverError(f"-p {binding['HostIP']}:{port}:{binding['Port']}: {binding['HostIP']} is not an "
                                  "address of this host; publish on one of its addresses or leave the address out")
            reasons.append("in use by another program on this host" if err == errno.EADDRINUSE
                           else f"not usable ({errno.errorcode.get(err, err)})")
        span = f"{first}" if first == last else f"{first}-{last}"
        raise DriverError(f"host port {span}/{proto} on {where} is already taken ({'; '.join(sorted(set(reasons)))}); "
                          f"publish container port {binding['Port']} on another host port (-p OTHER:{binding['Port']}) "
                          "or stop what holds it")

    def revoke(self, endpoint_id: str) -> None:
        """RevokeExternalConnectivity: the endpoint's ports go (unknown endpoint: nothing to do)."""
        endpoint = self.state.endpoint(endpoint_id)
        if endpoint is None or not endpoint.ports:
            return
        with self._lock:
            self._set_ports(endpoint_id, [])
            self._apply()
        log.info("endpoint %s: published ports withdrawn", endpoint_id[:12])

    def _set_ports(self, endpoint_id: str, ports: list[dict]) -> None:
        def put(current: Optional[Endpoint]) -> Endpoint:
            if current is None:
                raise DriverError(f"endpoint {endpoint_id[:12]} is not known to pyoverlay on this host")
            return replace(current, ports=ports)

        self.state.update_endpoint(endpoint_id, put)

    @staticmethod
    def oper_info(endpoint: Endpoint) -> dict:
        """What EndpointOperInfo adds: the bindings, in the engine's own keys."""
        if not endpoint.ports:
            return {}
        return {PORTMAP: [dict(b, IP=endpoint.ip6 if _family(b["HostIP"]) == 6 and endpoint.ip6 else endpoint.ip)
                          for b in endpoint.ports],
                EXPOSED: [{"Proto": b["Proto"], "Port": b["Port"]} for b in endpoint.ports]}

    # -- the kernel ---------------------------------------------------------------

    def sync(self) -> None:
        """Make the NAT table what the store says (after any change, and at start)."""
        with self._lock:
            self._apply()

    def _apply(self) -> None:
        from .dataplane.firewall import FirewallError  # the kernel layer, loaded only when used

        uplinks, mappings = wanted_nat(self.state, self.host)
        try:
            self.nat.apply(uplinks, mappings)
        except FirewallError as exc:
            raise DriverError(f"gateway mode: {exc}; check that Debian's nftables package is installed and "
                              "that the plugin runs with CAP_NET_ADMIN") from None


def wanted_nat(state: State, host: str) -> tuple[list, list]:
    """(uplinks, port mappings) the host's NAT table should hold, from the store
    alone: what sync() applies and `pyoverlay doctor` compares against."""
    from .dataplane.natrules import PortMapping, Uplink  # the kernel layer's types, loaded only when used

    networks = {n.network_id: n for n in state.networks(host=host) if GatewayMode.wants_egress(n)}
    uplinks = [Uplink(n.vni, n.subnet) for n in networks.values()]
    for n in networks.values():
        if n.subnet6 and n.gateway6:
            uplinks.append(Uplink(n.vni, n.subnet6))
    mappings = []
    for e in state.endpoints(host=host):
        if e.network_id not in networks:
            continue
        by_family = {ipaddress.ip_address(ip).version: ip for _, ip in e.addresses()}
        for b in e.ports:
            ip = by_family.get(_family(b["HostIP"]))
            if ip is None:
                continue  # stored before the endpoint's family changed: nothing to map to
            host_ip = "" if ipaddress.ip_address(b["HostIP"] or "0.0.0.0").is_unspecified else b["HostIP"]
            mappings.append(PortMapping(PROTOS[b["Proto"]], host_ip, b["HostPort"], ip, b["Port"]))
    return uplinks, mappings
