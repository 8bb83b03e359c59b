"""Typed access to the store. The key layout lives here and nowhere else.

    overlays/<vni>                   Overlay
    subnets/<subnet>                 VNI of the overlay using that subnet
    networks/<network_id>            Network (one host's view of an overlay)
    endpoints/<endpoint_id>          Endpoint
    peers/<vni>/<endpoint_id>        Peer (watched by every host)
    pools/<subnet>                   Pool
    addresses/<subnet>/<ip>          Address
    blocks/<subnet>/<block>          Block (the host allocating in that part of the pool)
    hosts/<host>                     Host (under a lease: gone when the host is)
    seen/<host>                      LastSeen (kept: when a host was last alive)
    catalog/<name>                   NamedNetwork (a network name every host's engine gets)
    engine/<host>/<name>             EngineNetwork (that name in one host's engine)
    names/<vni>/<endpoint_id>        NameRecord (a container's DNS names; under its host's lease)

Subnets appear in keys with "/" replaced by "_" so that a prefix never
matches a longer one by accident.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, TypeVar

from .errors import DriverError
from .model import Endpoint, Network, Record
from .store.base import Store

R = TypeVar("R", bound=Record)

#: How often a read-modify-write is retried when another writer got there first.
CAS_ATTEMPTS = 50


def subnet_key(subnet: str) -> str:
    return subnet.replace("/", "_")


def overlay_key(vni: int) -> str:
    return f"overlays/{vni}"


def subnet_index_key(subnet: str) -> str:
    return f"subnets/{subnet_key(subnet)}"


def network_key(network_id: str) -> str:
    return f"networks/{network_id}"


def endpoint_key(endpoint_id: str) -> str:
    return f"endpoints/{endpoint_id}"


PEERS = "peers/"


def peer_key(vni: int, endpoint_id: str) -> str:
    return f"{PEERS}{vni}/{endpoint_id}"


def parse_peer_key(key: str) -> tuple[int, str]:
    vni, endpoint_id = key[len(PEERS):].split("/", 1)
    return int(vni), endpoint_id


def pool_key(subnet: str) -> str:
    return f"pools/{subnet_key(subnet)}"


def address_prefix(subnet: str) -> str:
    return f"addresses/{subnet_key(subnet)}/"


def address_key(subnet: str, ip: str) -> str:
    return address_prefix(subnet) + ip


ADDRESSES = "addresses/"
BLOCKS = "blocks/"


def block_prefix(subnet: str) -> str:
    return f"{BLOCKS}{subnet_key(subnet)}/"


def block_key(subnet: str, block: str) -> str:
    return block_prefix(subnet) + subnet_key(block)


def parse_pool_key(key: str, prefix: str) -> tuple[str, str]:
    """addresses/<subnet>/<ip> or blocks/<subnet>/<block> -> (subnet, ip or block), in CIDR."""
    subnet, rest = key[len(prefix):].split("/", 1)
    return subnet.replace("_", "/"), rest.replace("_", "/")


def host_key(host: str) -> str:
    return f"hosts/{host}"


SEEN = "seen/"


def seen_key(host: str) -> str:
    return f"{SEEN}{host}"


CATALOG = "catalog/"


def catalog_key(name: str) -> str:
    return f"{CATALOG}{name}"


ENGINE = "engine/"


def engine_prefix(host: str) -> str:
    return f"{ENGINE}{host}/"


def engine_network_key(host: str, name: str) -> str:
    return engine_prefix(host) + name


NAMES = "names/"


def name_key(vni: int, endpoint_id: str) -> str:
    return f"{NAMES}{vni}/{endpoint_id}"


def parse_name_key(key: str) -> tuple[int, str]:
    vni, endpoint_id = key[len(NAMES):].split("/", 1)
    return int(vni), endpoint_id


@dataclass(frozen=True)
class NameRecord(Record):
    """names/<vni>/<endpoint_id>: what the cluster resolver answers for one endpoint."""

    host: str  # the host that publishes it (its lease holds the key)
    container: str  # container ID
    name: str  # container name, without the leading "/"
    address: str  # IPv4 on the overlay, no prefix length
    network: str = ""  # the network's name in that host's engine
    aliases: tuple[str, ...] = ()  # --network-alias (and the engine's own DNS names)

    @classmethod
    def from_json(cls, text: str) -> "NameRecord":
        data = json.loads(text)
        data["aliases"] = tuple(data.get("aliases") or ())
        return cls(**data)


class State:
    def __init__(self, store: Store):
        self.store = store

    def read(self, key: str, cls: type[R]) -> tuple[Optional[R], int]:
        """The record and its mod_revision (0 when absent)."""
        kv = self.store.get(key)
        if kv is None:
            return None, 0
        return cls.from_json(kv.value), kv.mod_revision

    def get(self, key: str, cls: type[R]) -> Optional[R]:
        return self.read(key, cls)[0]

    def list(self, prefix: str, cls: type[R]) -> list[R]:
        kvs, _ = self.store.list(prefix)
        return [cls.from_json(kv.value) for kv in kvs]

    def update(
        self,
        key: str,
        cls: type[R],
        change: Callable[[Optional[R]], Optional[R]],
    ) -> Optional[R]:
        """Read-modify-write with compare-and-set, retried on conflict.

        change gets the current record (None if absent) and returns the new
        one, or None to delete it; it may raise DriverError to refuse."""
        for _ in range(CAS_ATTEMPTS):
            current, rev = self.read(key, cls)
            new = change(current)
            if new is None:
                if current is None or self.store.txn({key: rev}, delete=[key]):
                    return None
            elif self.store.txn({key: rev}, put={key: new.to_json()}):
                return new
        raise DriverError(f"too much contention on {key} in the store; retry the command")

    def create(self, records: dict[str, Record], lease: int = 0) -> bool:
        """Write all records at once if none of the keys exists yet."""
        return self.store.txn(
            {key: 0 for key in records},
            put={key: rec.to_json() for key, rec in records.items()},
            lease=lease,
        )

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.store.txn({}, delete=keys)

    # Shortcuts used on every request.
    def network(self, network_id: str) -> Optional[Network]:
        return self.get(network_key(network_id), Network)

    def endpoint(self, endpoint_id: str) -> Optional[Endpoint]:
        return self.get(endpoint_key(endpoint_id), Endpoint)

