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


    # -- catalog/, engine/ and names/: the catalog and the name publisher -------

    def follow_catalog(self, stop, on_snapshot, on_changes, on_error=None) -> None:
        """follow() catalog/, decoded: on_snapshot({name: (entry, revision)}) and
        on_changes([(name, entry or None when deleted or undecodable, revision)])."""
        def snapshot(kvs, _revision):
            table = {}
            for kv in kvs:
                entry = _decode_catalog(kv.key, kv.value)
                if entry is not None:
                    table[kv.key[len(CATALOG):]] = (entry, kv.mod_revision)
            on_snapshot(table)

        def events(batch):
            on_changes([(e.key[len(CATALOG):],
                         _decode_catalog(e.key, e.value) if e.kind == "put" and e.value else None,
                         e.revision) for e in batch])

        _follow(self.store, CATALOG, stop, snapshot, events, on_error)

    def catalog_entry(self, name: str) -> tuple[Optional["NamedNetwork"], int]:
        """The entry and its mod_revision (None, 0 when absent or undecodable)."""
        kv = self.store.get(catalog_key(name))
        entry = _decode_catalog(kv.key, kv.value) if kv is not None else None
        return entry, (kv.mod_revision if entry is not None else 0)

    def add_catalog_entry(self, entry: "NamedNetwork") -> bool:
        """Create catalog/<name> unless it exists."""
        return self.create({catalog_key(entry.name): entry})

    def delete_catalog_entry(self, name: str, revision: int) -> bool:
        """Delete catalog/<name> if it is still at that revision."""
        key = catalog_key(name)
        return self.store.txn({key: revision}, delete=[key])

    def engine_networks(self, host: str) -> dict[str, "EngineNetwork"]:
        """engine/<host>/: name -> record. One that does not decode is deleted:
        these are the host's own records, and its catalog writes them again."""
        prefix = engine_prefix(host)
        records = {}
        for kv in self.store.list(prefix)[0]:
            try:
                records[kv.key[len(prefix):]] = EngineNetwork.from_json(kv.value)
            except (TypeError, ValueError):
                self.store.delete(kv.key)
        return records

    def put_engine_network(self, record: "EngineNetwork") -> None:
        self.store.put(engine_network_key(record.host, record.name), record.to_json())

    def delete_engine_network(self, host: str, name: str) -> None:
        self.store.delete(engine_network_key(host, name))

    def names_of(self, host: str) -> dict[tuple[int, str], "NameRecord"]:
        """names/ records one host published: (vni, endpoint ID) -> record."""
        found = {}
        for kv in self.store.list(NAMES)[0]:
            try:
                rec = NameRecord.from_json(kv.value)
                if rec.host == host:
                    found[parse_name_key(kv.key)] = rec
            except (TypeError, ValueError):
                continue  # another host's to rewrite, or garbage: the resolver skips it too
        return found

    def put_name(self, vni: int, endpoint_id: str, record: "NameRecord", lease: int = 0) -> None:
        self.store.put(name_key(vni, endpoint_id), record.to_json(), lease=lease)

    def delete_name(self, vni: int, endpoint_id: str) -> None:
        self.store.delete(name_key(vni, endpoint_id))

    # What the catalog's leftovers sweep (driver/leftovers.py) reads; the lead may fold
    # these into the store helper's networks()/pools() readers.
    def networks_of(self, host: str) -> list[Network]:
        found = []
        for kv in self.store.list("networks/")[0]:
            network = Network.from_json(kv.value)
            if network.host == host:
                found.append(network)
        return found

    def pools_held_by(self, host: str) -> list["Pool"]:
        return [pool for pool in (Pool.from_json(kv.value) for kv in self.store.list("pools/")[0])
                if host in pool.hosts]


def _decode_catalog(key: str, value: str) -> Optional["NamedNetwork"]:
    try:
        return NamedNetwork.from_json(value)
    except (TypeError, ValueError) as e:
        # One bad record must not stop every other name from syncing.
        _log.warning("catalog: ignoring %s: %s", key, e)
        return None


import logging as _logging  # noqa: E402  (this block is self-contained: see above)

from .model import EngineNetwork, NamedNetwork, Pool  # noqa: E402
from .store.follow import follow as _follow  # noqa: E402

_log = _logging.getLogger(__name__)
