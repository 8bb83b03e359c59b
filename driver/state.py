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
    crypto/<host>                    HostKey (public keys of a host with encrypted overlays)

Subnets appear in keys with "/" replaced by "_" so that a prefix never
matches a longer one by accident. An IPv6 address's key is its exploded form
(fd00:0020:0000:...:0001, ip_key): every address of a /112 (or any block on a
nibble boundary) then shares one key prefix, as a v4 block's share a few.
Readers hand IPv6 addresses back compressed (fd00:20::1), as everything
else spells them.

Callers use State's typed readers and writers (and, for the watches, the
prefixes and decode_* functions below); every record is decoded under one
rule (driver/decoding.py): one that does not decode is skipped, logged once
per key and counted.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Callable, Iterable, Optional, TypeVar

from .decoding import bad_records, decode, skipped as _skipped  # noqa: F401 (bad_records: for plugin/metrics.py)
from .errors import DriverError
from .model import (Address, Block, Endpoint, EngineNetwork, Host, HostKey, LastSeen, NamedNetwork, NameRecord, Network,
                    Overlay, Peer, Pool, Record, SubnetClaim)
from .store.base import Store
from .store.follow import follow

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


def pool_key(subnet: str) -> str:
    return f"pools/{subnet_key(subnet)}"


def address_prefix(subnet: str) -> str:
    return f"addresses/{subnet_key(subnet)}/"


def ip_key(ip: str) -> str:
    """An address as its key spells it: IPv4 as is, IPv6 exploded (one spelling per address)."""
    return ipaddress.ip_address(ip).exploded if ":" in ip else ip


def ip_of_key(text: str) -> str:
    """The address an address key's last part names, spelt as everywhere else (compressed)."""
    return str(ipaddress.ip_address(text)) if ":" in text else text


def address_key(subnet: str, ip: str) -> str:
    return address_prefix(subnet) + ip_key(ip)


ADDRESSES = "addresses/"
BLOCKS = "blocks/"


def block_prefix(subnet: str) -> str:
    return f"{BLOCKS}{subnet_key(subnet)}/"


def block_key(subnet: str, block: str) -> str:
    return block_prefix(subnet) + subnet_key(block)


def ip_key_prefixes(block, most: int = 16) -> Optional[list[str]]:
    """Prefixes of the address keys' IP part that together hold every address
    of block, and a few others (the caller filters): keys are dotted decimal,
    so a block is not one key range; .64/26 is '6' '7' '8' '9' '10' '11' '12'.
    None when it would take more than `most` (a block spanning many /24s).
    IPv6 keys are exploded: one prefix, the block's whole nibbles."""
    if block.version == 6:
        nibbles = block.prefixlen // 4
        return [block.network_address.exploded[:nibbles + nibbles // 4]]
    first, last = int(block.network_address), int(block.broadcast_address)
    found = set()
    for net24 in range(first >> 8, (last >> 8) + 1):
        head = str(ipaddress.IPv4Address(net24 << 8))[:-1]  # "a.b.c."
        lo, hi = max(first, net24 << 8) & 255, min(last, net24 << 8 | 255) & 255
        if lo == 0 and hi == 255:
            found.add(head)
        else:
            found.update(head + (str(n) if n < 10 else str(n)[:-1]) for n in range(lo, hi + 1))
    prefixes = sorted(p for p in found if not any(q != p and p.startswith(q) for q in found))
    return prefixes if len(prefixes) <= most else None


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


CRYPTO = "crypto/"


def crypto_key(host: str) -> str:
    return f"{CRYPTO}{host}"


def decode_host_key(key: str, value: Optional[str]) -> Optional[HostKey]:
    """A crypto/ record, or None (deleted, or skipped as a bad record)."""
    return decode(key, value, HostKey) if value is not None else None


def parse_name_key(key: str) -> tuple[int, str]:
    vni, endpoint_id = key[len(NAMES):].split("/", 1)
    return int(vni), endpoint_id


def _split(key: str, prefix: str) -> Optional[tuple[str, str]]:
    """<prefix><a>/<b> -> (a, b), or None (skipped, as a bad record) when the key is malformed."""
    a, sep, b = key[len(prefix):].partition("/")
    if not sep or not a or not b:
        _skipped(key, "malformed key")
        return None
    return a, b


# -- watch events, decoded (the watchers follow PEERS, ADDRESSES, BLOCKS, NAMES) ---

def _vni_key(key: str, prefix: str) -> Optional[tuple[int, str]]:
    """<prefix><vni>/<endpoint_id> -> (vni, endpoint_id), or None (skipped, as a bad record)."""
    parts = _split(key, prefix)
    if parts is not None and not parts[0].isdigit():
        _skipped(key, "malformed key")
        return None
    return (int(parts[0]), parts[1]) if parts else None


def decode_peer(key: str, value: Optional[str]) -> Optional[tuple[int, str, Optional[Peer]]]:
    """peers/<vni>/<endpoint_id> -> (vni, endpoint_id, the peer or None for a delete); None: skip it."""
    parts = _vni_key(key, PEERS)
    peer = decode(key, value, Peer) if parts and value is not None else None
    if parts is None or (value is not None and peer is None):
        return None
    return parts[0], parts[1], peer


@functools.lru_cache(maxsize=1024)
def _network(subnet: str) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(subnet)  # a few pools, read on every address event


def _decode_pool_item(key: str, value: Optional[str], prefix: str, cls: type[R]):
    parts = _split(key, prefix)
    if parts is None:
        return None
    subnet, item = parts[0].replace("_", "/"), parts[1].replace("_", "/")
    try:
        _network(subnet)
        (ipaddress.ip_address if prefix == ADDRESSES else ipaddress.ip_network)(item)
        if prefix == ADDRESSES:
            item = ip_of_key(item)
    except ValueError as e:
        _skipped(key, f"malformed key: {e}")
        return None
    record = decode(key, value, cls) if value is not None else None
    if value is not None and record is None:
        return None
    return subnet, item, record


def decode_address(key: str, value: Optional[str]) -> Optional[tuple[str, str, Optional[Address]]]:
    """addresses/<subnet>/<ip> -> (subnet, ip, the address or None for a delete); None: skip it."""
    return _decode_pool_item(key, value, ADDRESSES, Address)


def decode_block(key: str, value: Optional[str]) -> Optional[tuple[str, str, Optional[Block]]]:
    """blocks/<subnet>/<block> -> (subnet, block in CIDR, the block or None for a delete); None: skip it."""
    return _decode_pool_item(key, value, BLOCKS, Block)


def decode_name(key: str, value: str) -> Optional[NameRecord]:
    """names/<vni>/<endpoint_id> -> its record; None: skip it."""
    return decode(key, value, NameRecord) if _vni_key(key, NAMES) else None


class State:
    def __init__(self, store: Store):
        self.store = store

    # -- primitives (for this module's readers and writers) ----------------------

    def read(self, key: str, cls: type[R]) -> tuple[Optional[R], int]:
        """The record and its mod_revision (0 when absent; the record None when it does not decode)."""
        kv = self.store.get(key)
        if kv is None:
            return None, 0
        return decode(key, kv.value, cls), kv.mod_revision

    def get(self, key: str, cls: type[R]) -> Optional[R]:
        return self.read(key, cls)[0]

    def list(self, prefix: str, cls: type[R]) -> list[R]:
        return [rec for _, rec, _ in self._entries(prefix, cls)]

    def _entries(self, prefix: str, cls: type[R]) -> list[tuple[str, R, int]]:
        """(key after prefix, record, mod_revision) for every record under prefix that decodes."""
        kvs, _ = self.store.list(prefix)
        found = []
        for kv in kvs:
            record = decode(kv.key, kv.value, cls)
            if record is not None:
                found.append((kv.key[len(prefix):], record, kv.mod_revision))
        return found

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
        if keys:
            self.store.txn({}, delete=keys)

    def delete_if_unchanged(self, key: str, revision: int) -> bool:
        """Delete key only if nobody wrote it since revision (its mod_revision when read)."""
        return self.store.txn({key: revision}, delete=[key])

    # -- networks and overlays ---------------------------------------------------

    def network(self, network_id: str) -> Optional[Network]:
        return self.get(network_key(network_id), Network)

    def networks(self, host: Optional[str] = None) -> list[Network]:
        """Every host's networks, or one host's."""
        return [n for n in self.list("networks/", Network) if host is None or n.host == host]

    def create_network(self, network: Network) -> bool:
        return self.create({network_key(network.network_id): network})

    def delete_network(self, network_id: str) -> None:
        self.delete([network_key(network_id)])

    def overlay(self, vni: int) -> Optional[Overlay]:
        return self.get(overlay_key(vni), Overlay)

    def overlays(self) -> list[Overlay]:
        return self.list("overlays/", Overlay)

    def create_overlay(self, overlay: Overlay, claim_subnet: bool) -> bool:
        """Write a new overlay (and, if claim_subnet, its subnet's claim) if none exists yet."""
        records: dict[str, Record] = {overlay_key(overlay.vni): overlay}
        if claim_subnet:
            records[subnet_index_key(overlay.subnet)] = SubnetClaim(vni=overlay.vni)
        return self.create(records)

    def update_overlay(self, vni: int, change: Callable[[Optional[Overlay]], Optional[Overlay]]) -> Optional[Overlay]:
        return self.update(overlay_key(vni), Overlay, change)

    def subnet_claim(self, subnet: str) -> Optional[SubnetClaim]:
        """Which overlay uses subnet, if any."""
        return self.get(subnet_index_key(subnet), SubnetClaim)

    def delete_subnet_claim(self, subnet: str) -> None:
        self.delete([subnet_index_key(subnet)])

    # -- endpoints and peers -----------------------------------------------------

    def endpoint(self, endpoint_id: str) -> Optional[Endpoint]:
        return self.get(endpoint_key(endpoint_id), Endpoint)

    def endpoints(self, host: Optional[str] = None) -> list[Endpoint]:
        """Every host's endpoints, or one host's."""
        return [e for e in self.list("endpoints/", Endpoint) if host is None or e.host == host]

    def create_endpoint(self, endpoint: Endpoint) -> bool:
        """The endpoint and its peer record at once, if neither exists yet."""
        return self.create({endpoint_key(endpoint.endpoint_id): endpoint,
                            peer_key(endpoint.vni, endpoint.endpoint_id): endpoint.peer()})

    def update_endpoint(self, endpoint_id: str,
                        change: Callable[[Optional[Endpoint]], Optional[Endpoint]]) -> Optional[Endpoint]:
        return self.update(endpoint_key(endpoint_id), Endpoint, change)

    def delete_endpoint(self, endpoint: Endpoint) -> None:
        """The endpoint, its peer record and its DNS name."""
        self.delete([endpoint_key(endpoint.endpoint_id), peer_key(endpoint.vni, endpoint.endpoint_id),
                     name_key(endpoint.vni, endpoint.endpoint_id)])

    def peers(self) -> list[tuple[int, str, Peer]]:
        """(vni, endpoint_id, peer) for every endpoint of every overlay."""
        kvs, _ = self.store.list(PEERS)
        return [entry for entry in (decode_peer(kv.key, kv.value) for kv in kvs) if entry is not None]

    # -- pools, addresses, blocks ------------------------------------------------

    def pool(self, subnet: str) -> Optional[Pool]:
        return self.get(pool_key(subnet), Pool)

    def pools(self) -> list[Pool]:
        return self.list("pools/", Pool)

    def create_pool(self, pool: Pool) -> bool:
        return self.create({pool_key(pool.subnet): pool})

    def update_pool(self, subnet: str, change: Callable[[Optional[Pool]], Optional[Pool]]) -> Optional[Pool]:
        return self.update(pool_key(subnet), Pool, change)

    def forget_pool_items(self, subnet: str) -> None:
        """A released pool's addresses and blocks, all of them."""
        for prefix in (address_prefix(subnet), block_prefix(subnet)):
            kvs, _ = self.store.list(prefix)
            self.delete(kv.key for kv in kvs)

    def address(self, subnet: str, ip: str) -> Optional[Address]:
        return self.get(address_key(subnet, ip), Address)

    def addresses(self, subnet: str) -> list[tuple[str, Address, int]]:
        """(ip, address, mod_revision) for every claimed address of subnet."""
        found = []
        for ip, record, revision in self._entries(address_prefix(subnet), Address):
            try:
                found.append((ip_of_key(ip), record, revision))
            except ValueError:
                _skipped(address_prefix(subnet) + ip, "malformed key")
        return found

    def addresses_in(self, subnet: str, block: str) -> list[tuple[str, Address, int]]:
        """(ip, address, mod_revision) for every claimed address inside block:
        a few short lists (ip_key_prefixes), not the whole pool's."""
        inside, found = ipaddress.ip_network(block), {}
        prefixes = ip_key_prefixes(inside)
        for prefix in prefixes if prefixes is not None else [""]:
            for ip, record, revision in self._entries(address_prefix(subnet) + prefix, Address):
                ip = prefix + ip
                try:
                    if ipaddress.ip_address(ip) in inside:
                        ip = ip_of_key(ip)
                        found[ip] = (ip, record, revision)
                except ValueError:
                    _skipped(address_key(subnet, ip), "malformed key")
        return list(found.values())

    def every_address(self) -> list[tuple[str, str]]:
        """(subnet, ip) of every claimed address of every pool."""
        kvs, _ = self.store.list(ADDRESSES)
        return [(subnet, ip) for subnet, ip, _ in filter(None, (decode_address(kv.key, kv.value) for kv in kvs))]

    def claim_address(self, subnet: str, ip: str, address: Address) -> bool:
        """Create-if-absent: False if someone holds ip already."""
        return self.create({address_key(subnet, ip): address})

    def update_address(self, subnet: str, ip: str,
                       change: Callable[[Optional[Address]], Optional[Address]]) -> Optional[Address]:
        return self.update(address_key(subnet, ip), Address, change)

    def release_address_if_unchanged(self, subnet: str, ip: str, revision: int) -> bool:
        return self.delete_if_unchanged(address_key(subnet, ip), revision)

    def blocks(self, subnet: Optional[str] = None) -> list[tuple[str, str, Block, int]]:
        """(subnet, block in CIDR, block, mod_revision) of one pool, or of every pool."""
        kvs, _ = self.store.list(block_prefix(subnet) if subnet else BLOCKS)
        found = []
        for kv in kvs:
            entry = decode_block(kv.key, kv.value)
            if entry is not None:
                found.append((entry[0], entry[1], entry[2], kv.mod_revision))
        return found

    def claim_block(self, subnet: str, block: str, record: Block, revision: int = 0) -> bool:
        """Write block if it is still at revision (0: if nobody holds it)."""
        key = block_key(subnet, block)
        return self.store.txn({key: revision}, put={key: record.to_json()})

    def release_block(self, subnet: str, block: str, revision: int) -> bool:
        return self.delete_if_unchanged(block_key(subnet, block), revision)

    # -- hosts -------------------------------------------------------------------

    def hosts(self) -> dict[str, Host]:
        """The live hosts (their records are under their leases), by host."""
        return {name: rec for name, rec, _ in self._entries("hosts/", Host)}

    def put_host(self, record: Host, lease: int) -> None:
        self.store.put(host_key(record.host), record.to_json(), lease=lease)

    def last_seen(self) -> dict[str, LastSeen]:
        """When each host, alive or gone, was last alive."""
        return {name: rec for name, rec, _ in self._entries(SEEN, LastSeen)}

    def put_last_seen(self, record: LastSeen) -> None:
        self.store.put(seen_key(record.host), record.to_json())

    # -- catalog/, engine/ and names/: the catalog and the name publisher -------

    def follow_catalog(self, stop, on_snapshot, on_changes, on_error=None) -> None:
        """follow() catalog/, decoded: on_snapshot({name: (entry, revision)}) and
        on_changes([(name, entry or None when deleted or undecodable, revision)])."""
        def snapshot(kvs, _revision):
            on_snapshot({kv.key[len(CATALOG):]: (entry, kv.mod_revision) for kv in kvs
                         if (entry := decode(kv.key, kv.value, NamedNetwork)) is not None})

        def events(batch):
            on_changes([(e.key[len(CATALOG):],
                         decode(e.key, e.value, NamedNetwork) if e.kind == "put" and e.value else None,
                         e.revision) for e in batch])

        follow(self.store, CATALOG, stop, snapshot, events, on_error)

    def catalog_entry(self, name: str) -> tuple[Optional[NamedNetwork], int]:
        """The entry and its mod_revision (None, 0 when absent or undecodable)."""
        entry, revision = self.read(catalog_key(name), NamedNetwork)
        return entry, (revision if entry is not None else 0)

    def add_catalog_entry(self, entry: NamedNetwork) -> bool:
        """Create catalog/<name> unless it exists."""
        return self.create({catalog_key(entry.name): entry})

    def delete_catalog_entry(self, name: str, revision: int) -> bool:
        """Delete catalog/<name> if it is still at that revision."""
        return self.delete_if_unchanged(catalog_key(name), revision)

    def catalog_entries(self) -> dict[str, NamedNetwork]:
        return {name: entry for name, entry, _ in self._entries(CATALOG, NamedNetwork)}

    def every_engine_network(self) -> dict[tuple[str, str], EngineNetwork]:
        """(host, name) -> what that host's engine holds under that catalog name."""
        return {(rec.host, rec.name): rec for _, rec, _ in self._entries(ENGINE, EngineNetwork)}

    def engine_networks(self, host: str) -> dict[str, EngineNetwork]:
        """engine/<host>/: name -> record; one that does not decode is left out."""
        return {name: rec for name, rec, _ in self._entries(engine_prefix(host), EngineNetwork)}

    def unreadable_engine_networks(self, host: str) -> list[str]:
        """The names under engine/<host>/ whose record does not decode."""
        prefix = engine_prefix(host)
        kvs, _ = self.store.list(prefix)
        return [kv.key[len(prefix):] for kv in kvs if decode(kv.key, kv.value, EngineNetwork) is None]

    def put_engine_network(self, record: EngineNetwork) -> None:
        self.store.put(engine_network_key(record.host, record.name), record.to_json())

    def delete_engine_network(self, host: str, name: str) -> None:
        self.delete([engine_network_key(host, name)])

    def names_of(self, host: str) -> dict[tuple[int, str], NameRecord]:
        """names/ records one host published: (vni, endpoint ID) -> record."""
        return {key: rec for key, rec in self.names().items() if rec.host == host}

    def names(self) -> dict[tuple[int, str], NameRecord]:
        """Every host's names/ records: (vni, endpoint ID) -> record."""
        kvs, _ = self.store.list(NAMES)
        return {_vni_key(kv.key, NAMES): rec for kv in kvs if (rec := decode_name(kv.key, kv.value)) is not None}

    def put_name(self, vni: int, endpoint_id: str, record: NameRecord, lease: int = 0) -> None:
        self.store.put(name_key(vni, endpoint_id), record.to_json(), lease=lease)

    def delete_name(self, vni: int, endpoint_id: str) -> None:
        self.delete([name_key(vni, endpoint_id)])

    # Encrypted overlays: hosts' public keys (driver/encryption.py)

    def host_keys(self) -> dict[str, HostKey]:
        return {rec.host: rec for rec in self.list(CRYPTO, HostKey)}

    def put_host_key(self, record: HostKey) -> None:
        self.store.put(crypto_key(record.host), record.to_json())

    def delete_host_key(self, host: str) -> None:
        self.delete([crypto_key(host)])
