"""The CNM model as pyoverlay keeps it in the store.

An Overlay is the cluster-wide L2 segment: one VNI, one subnet. Each host's
engine has its own NetworkID for it (the driver is local-scope), so a Network
is one host's view of an Overlay. An Endpoint is one container interface on a
Network; its Peer record is what every other host needs to reach it. A Pool
and its Addresses are the IPAM side, shared by every host using the subnet.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import asdict, dataclass, field

from .defaults import KEY_ROTATION, OPT_ENCAP, OPT_ENCRYPTED, OPT_MTU, OPT_MULTICAST, OPT_VNI


def _without_empty(record, names: tuple[str, ...]) -> str:
    """JSON with the fields names left out when unset: hosts still running a
    version without them read the record as before, byte for byte."""
    data = asdict(record)
    for name in names:
        if not data[name]:
            del data[name]
    return json.dumps(data, sort_keys=True)


class Record:
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        # Fields a newer version added are ignored, so hosts can be upgraded one at a time.
        known = getattr(cls, "__dataclass_fields__", None)
        if known is not None:
            data = {k: v for k, v in data.items() if k in known}
        return cls(**data)


@dataclass(frozen=True)
class Peer(Record):
    """A remote endpoint as the VXLAN device needs it."""

    ip: str  # IPv4, or IPv6 for an endpoint with no IPv4 address
    mac: str
    vtep: str  # underlay address of the host that holds the endpoint
    ip6: str = ""  # a dual-stack endpoint's IPv6 address (ip holds its IPv4 one)

    def to_json(self) -> str:
        return _without_empty(self, ("ip6",))

    def ips(self) -> tuple[str, ...]:
        return (self.ip, self.ip6) if self.ip6 else (self.ip,)


@dataclass
class Overlay(Record):
    vni: int
    subnet: str
    mtu: int
    networks: dict[str, str] = field(default_factory=dict)  # host -> NetworkID
    block_size: int = 0  # prefix length of the IPAM blocks (-o block_size); 0: the default for the subnet
    multicast: bool = False  # -o multicast=true: broadcast and multicast flood to every host with a peer
    encrypted: bool = False  # -o encrypted=true: its VXLAN between hosts goes through the tunnel
    subnet6: str = ""  # a dual-stack overlay's IPv6 subnet (subnet is its IPv4 one; an IPv6-only overlay's is there)
    encap: str = ""  # -o encap=cross-subnet|never: routed between hosts on one underlay subnet; "": always VXLAN

    def to_json(self) -> str:
        return _without_empty(self, ("block_size", "multicast", "encrypted", "subnet6", "encap"))


@dataclass
class Network(Record):
    network_id: str
    vni: int
    host: str
    mtu: int
    subnet: str  # IPv4, or IPv6 for a network with no IPv4 (--ipv4=false)
    internal: bool = False
    # -o gateway=pyoverlay: pyoverlay's own egress and published ports
    # (driver/gateway.py); "" is the engine's docker_gwbridge.
    gateway_mode: str = ""
    gateway: str = ""  # the network's gateway address (no prefix length), kept for gateway_mode
    subnet6: str = ""  # a dual-stack network's IPv6 subnet
    gateway6: str = ""  # a dual-stack network's IPv6 gateway, kept for gateway_mode

    def to_json(self) -> str:
        return _without_empty(self, ("gateway_mode", "gateway", "subnet6", "gateway6"))

    def subnets(self) -> tuple[str, ...]:
        return (self.subnet, self.subnet6) if self.subnet6 else (self.subnet,)


@dataclass
class Endpoint(Record):
    endpoint_id: str
    network_id: str
    vni: int
    host: str
    address: str  # CIDR, as the engine gave it: IPv4, or IPv6 on a network with no IPv4
    mac: str
    vtep: str
    # The cluster resolver's /32 route (Join's StaticRoutes) goes to one
    # endpoint per sandbox: the engine fails a Join whose route already exists.
    sandbox: str = ""  # the SandboxKey it joined, while it carries that route
    dns_route: bool = False
    # Published ports in gateway mode (driver/gateway.py): bindings as the
    # engine's com.docker.network.portmap spells them, host ports resolved.
    ports: list = field(default_factory=list)
    address6: str = ""  # a dual-stack endpoint's IPv6 CIDR

    def to_json(self) -> str:
        return _without_empty(self, ("ports", "address6"))

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def ip6(self) -> str:
        return self.address6.split("/")[0]

    def addresses(self) -> list[tuple[str, str]]:
        """(subnet, ip) of each address the endpoint holds (one per family)."""
        return [(str(ipaddress.ip_interface(a).network), a.split("/")[0]) for a in (self.address, self.address6) if a]

    def peer(self) -> Peer:
        return Peer(ip=self.ip, mac=self.mac, vtep=self.vtep, ip6=self.ip6)


@dataclass
class Pool(Record):
    subnet: str
    hosts: list[str] = field(default_factory=list)  # hosts whose engine holds it
    gateway: str = ""  # shared by every host, so the overlay has one gateway


@dataclass
class Address(Record):
    kind: str  # "gateway" or "container"
    host: str  # the host that asked for it
    # Random per claim: two claims of one host are otherwise byte for byte
    # alike, and a claim whose answer was lost is told from another's by its
    # bytes (driver/store/etcd.py).
    token: str = ""

    @classmethod
    def container(cls, host: str) -> "Address":
        return cls(kind="container", host=host, token=secrets.token_hex(8))


@dataclass
class Host(Record):
    host: str
    vtep: str
    started: float
    version: str = ""


@dataclass
class SubnetClaim(Record):
    """Which overlay uses a subnet: hosts that give no VNI join that one."""

    vni: int


@dataclass
class Block(Record):
    """A run of a pool's addresses that one host allocates from without
    contention (key blocks/<subnet>/<block>). It is an affinity, not a fence:
    every address is still claimed on its own key, so a host may borrow
    from another's block and --ip may land anywhere."""

    host: str
    claimed: float = 0.0  # wall clock, for status


@dataclass
class LastSeen(Record):
    """seen/<host>: when a host was last alive (kept after its lease is gone)."""

    host: str
    vtep: str
    at: float  # seconds since the epoch


@dataclass(frozen=True)
class NameRecord(Record):
    """names/<vni>/<endpoint_id>: what the cluster resolver answers for one endpoint."""

    host: str  # the host that publishes it (its lease holds the key)
    container: str  # container ID
    name: str  # container name, without the leading "/"
    address: str  # IPv4 on the overlay, no prefix length
    network: str = ""  # the network's name in that host's engine
    aliases: tuple[str, ...] = ()  # --network-alias (and the engine's own DNS names)
    address6: str = ""  # a dual-stack endpoint's IPv6 address (AAAA)

    def to_json(self) -> str:
        return _without_empty(self, ("address6",))  # IPv4-only records stay as before, byte for byte

    @classmethod
    def from_json(cls, text: str) -> "NameRecord":
        data = json.loads(text)
        data["aliases"] = tuple(data.get("aliases") or ())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# -- the catalog's records (driver/catalog/) -----------------------------------

#: The network create options a catalog entry carries (as driver/network.py reads them).


@dataclass
class NamedNetwork(Record):
    """catalog/<name>: a network every host's engine should have."""

    name: str
    subnet: str
    gateway: str = ""
    vni: int = 0
    mtu: int = 0  # the -o com.docker.network.driver.mtu given; 0: the overlay's own
    internal: bool = False
    origin: str = ""  # the host whose engine it came from, or "cli"
    multicast: bool = False  # -o multicast=true, so every host's engine shows (and asks for) it
    gateway_mode: str = ""  # -o gateway=pyoverlay (driver/gateway.py), so every host carries its own egress
    encrypted: bool = False  # -o encrypted=true, likewise
    # A dual-stack network's IPv6 subnet and gateway (an IPv6-only network's are subnet and gateway).
    subnet6: str = ""
    gateway6: str = ""
    encap: str = ""  # -o encap=cross-subnet|never (rules.ENCAP_MODES); "": always VXLAN

    def to_json(self) -> str:
        data = asdict(self)
        for name in ("multicast", "gateway_mode", "encrypted", "subnet6", "gateway6", "encap"):
            if not data[name]:
                del data[name]  # entries without them read as before, byte for byte
        return json.dumps(data, sort_keys=True)

    def options(self) -> dict[str, str]:
        options = {OPT_VNI: str(self.vni)} if self.vni else {}
        if self.mtu:
            options[OPT_MTU] = str(self.mtu)
        if self.multicast:
            options[OPT_MULTICAST] = "true"
        if self.gateway_mode:
            options["gateway"] = self.gateway_mode
        if self.encrypted:
            options[OPT_ENCRYPTED] = "true"
        if self.encap:
            options[OPT_ENCAP] = self.encap
        return options

    def subnets(self) -> str:
        """For messages: "10.20.0.0/24 fd00:20::/64"."""
        return " ".join(filter(None, (self.subnet, self.subnet6)))

    def matches(self, info, vni: int = 0) -> bool:
        """Is the engine's network (an EngineNetworkInfo) this one? vni: the overlay it is on (0: unknown)."""
        return (
            info.subnet == self.subnet
            and (getattr(info, "subnet6", "") or "") == self.subnet6
            and info.internal == self.internal
            and not (self.vni and vni and vni != self.vni)
        )


@dataclass
class EngineNetwork(Record):
    """engine/<host>/<name>: a catalog name as one host's engine holds it."""

    name: str
    host: str
    network_id: str = ""  # "" while the engine refuses to create it
    subnet: str = ""
    containers: dict[str, str] = field(default_factory=dict)  # endpoint ID -> container name
    catalogued: bool = False  # matched the catalog: deleting the entry removes it here
    removing: bool = False  # deleted from the catalog; waits for its containers to leave
    error: str = ""


@dataclass(frozen=True)
class HostKey(Record):
    """crypto/<host>: the public keys a host with encrypted overlays publishes
    (driver/keys.py). Its private keys never leave it."""

    host: str
    vtep: str  # the tunnel's endpoint: this host's underlay address
    port: int  # its WireGuard listen port
    public: str  # static WireGuard public key, hex
    exchange: str  # current exchange (X25519) public key, hex
    epoch: int  # which exchange key of this host it is (grows by one per rotation)
    made: float  # when that key was made (time.time() on that host)
    rotation: float = float(KEY_ROTATION)  # its --key-rotation: a key older than two of these is stale


@dataclass(frozen=True)
class TunnelPeer:
    """Another host, as this host's WireGuard device holds it (driver/dataplane/crypto.py)."""

    public: bytes  # its static public key (32 bytes)
    vtep: str  # its underlay address: the tunnel endpoint and the one allowed inner source
    port: int  # its WireGuard listen port
    psk: bytes  # this pair's current preshared key (32 bytes)
