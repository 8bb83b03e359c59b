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


def _bindings(options: dict) -> list[dict]:
    """The engine's port bindings, checked; IPv6 host addresses are left out
    (pyoverlay networks are IPv4; engine 28 may send a :: binding beside 0.0.0.0)."""
    raw = options.get(PORTMAP) or []
    out = []
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
        if ip is not None and ip.version == 6:
            continue
        if host_end and host_port and host_end < host_port:
            raise DriverError(f"-p {host_port}-{host_end}: the host port range is empty")
        host_ip = "" if ip is None or ip.is_unspecified else str(ip)
        out.append({"Proto": proto, "Port": port, "HostIP": host_ip, "HostPort": host_port,
                    "HostPortEnd": host_end or host_port})
    return out


def _overlaps(a: dict, b: dict) -> bool:
    return a["Proto"] == b["Proto"] and a["HostPort"] == b["HostPort"] and (
        not a["HostIP"] or not b["HostIP"] or a["HostIP"] == b["HostIP"])


def _bindable(proto: int, host_ip: str, port: int) -> Optional[int]:
    """None if port is free on host_ip (""=every address) for proto, else the errno.
    Port 0: the kernel picks a free one; returned negated (-port) so it is told apart."""
    with socket.socket(socket.AF_INET, SOCKET_TYPES[proto]) as s:
        if proto == 6:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
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

    def network_created(self, network: Network) -> None:
        if not self.wants_egress(network):
            return
        self.dataplane.add_egress(network.vni, network.subnet, network.gateway)
        self.sync()

    def join_gateway(self, network: Network) -> Optional[str]:
        """The Gateway Join returns (None: the engine's docker_gwbridge, or --internal)."""
        return network.gateway if self.wants_egress(network) else None

    def restore(self, networks: Iterable[Network]) -> None:
        wanted = [n for n in networks if self.wants_egress(n)]
        for network in wanted:
            self.dataplane.add_egress(network.vni, network.subnet, network.gateway)
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
            wanted = _bindings(options)
            taken = [(b, e) for e in self.state.endpoints(host=self.host) if e.endpoint_id != endpoint.endpoint_id
                     for b in e.ports]
            resolved: list[dict] = []
            for binding in wanted:
                resolved.append(self._choose(binding, taken + [(b, endpoint) for b in resolved]))
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

    def _choose(self, binding: dict, taken: list[tuple[dict, Endpoint]]) -> dict:
        proto = PROTOS[binding["Proto"]]
        first, last = binding["HostPort"], binding["HostPortEnd"]
        where = binding["HostIP"] or "every address of this host"
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
        return {PORTMAP: [dict(b, IP=endpoint.ip) for b in endpoint.ports],
                EXPOSED: [{"Proto": b["Proto"], "Port": b["Port"]} for b in endpoint.ports]}

    # -- the kernel ---------------------------------------------------------------

    def sync(self) -> None:
        """Make the NAT table what the store says (after any change, and at start)."""
        with self._lock:
            self._apply()

    def _apply(self) -> None:
        from .dataplane.firewall import FirewallError  # the kernel layer, loaded only when used
        from .dataplane.natrules import PortMapping, Uplink

        networks = {n.network_id: n for n in self.state.networks(host=self.host) if self.wants_egress(n)}
        uplinks = [Uplink(n.vni, n.subnet) for n in networks.values()]
        mappings = [PortMapping(PROTOS[b["Proto"]], b["HostIP"], b["HostPort"], e.ip, b["Port"])
                    for e in self.state.endpoints(host=self.host) if e.network_id in networks
                    for b in e.ports]
        try:
            self.nat.apply(uplinks, mappings)
        except FirewallError as exc:
            raise DriverError(f"gateway mode: {exc}; check that Debian's nftables package is installed and "
                              "that the plugin runs with CAP_NET_ADMIN") from None
