"""The cluster's container names, as the resolver answers them.

    names/<vni>/<endpoint_id>  -- store watch -->  NameTable (in memory)  <-- lookup() per query

Every host publishes its own containers' names (driver/namepub.py); every
host's table follows all of them, so a query never reads the store: answers
come from the last view the watch delivered, which also stays while the
store is down.

Who is answered what mirrors Docker's embedded DNS on one host: a container
finds the containers of the networks it is on, by name, by alias and as
<name>.<network>, and the reverse (PTR) of their addresses. A name that
exists only on networks the querier is not on is answered NXDOMAIN (never
its address); anything that is no cluster name is forwarded upstream.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from .model import NameRecord
from .state import NAMES, decode_name, parse_name_key
from .store.base import Event, KeyValue, Store
from .background import store_watch

log = logging.getLogger(__name__)

# DNS numbers (dns.rdatatype / dns.rcode), kept here so that the table needs no
# wire library; the resolver (driver/dns) speaks dnspython.
A, PTR, AAAA = 1, 12, 28
NOERROR, NXDOMAIN = 0, 3
ARPA = ".in-addr.arpa"


def _answer(rcode: int, records: tuple[str, ...] = ()):
    from .dns.server import Answer  # the resolver's type; imported late: the table has no wire code

    return Answer(rcode=rcode, records=records, ttl=0)


@dataclass
class _Index:
    """One immutable view of every record; swapped whole on each change."""

    querier: dict[tuple[int, str], tuple[str, str]] = field(default_factory=dict)  # (vni, ip) -> (host, container)
    overlays: dict[tuple[str, str], frozenset[int]] = field(default_factory=dict)  # (host, container) -> VNIs
    names: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # vni -> name -> addresses
    names6: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # vni -> name -> IPv6 addresses
    reverse: dict[int, dict[str, str]] = field(default_factory=dict)  # vni -> address -> name.network
    everywhere: frozenset[str] = frozenset()  # every cluster name on any overlay
    addresses: frozenset[str] = frozenset()  # every cluster address on any overlay


def build_index(records: dict[str, NameRecord]) -> _Index:
    querier, overlays = {}, defaultdict(set)
    names: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    names6: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    reverse: dict[int, dict[str, str]] = defaultdict(dict)
    for key, rec in records.items():
        vni, _ = parse_name_key(key)
        who = (rec.host, rec.container)
        querier[(vni, rec.address)] = who
        overlays[who].add(vni)
        for label in record_names(rec):
            if rec.address not in names[vni][label]:
                names[vni][label].append(rec.address)
            if rec.address6 and rec.address6 not in names6[vni][label]:
                names6[vni][label].append(rec.address6)
        if rec.name:
            reverse[vni][rec.address] = f"{rec.name}.{rec.network}".lower() if rec.network else rec.name.lower()
    return _Index(
        querier=querier,
        overlays={who: frozenset(v) for who, v in overlays.items()},
        names={vni: {n: tuple(sorted(a, key=ipaddress.IPv4Address)) for n, a in table.items()}
               for vni, table in names.items()},
        names6={vni: {n: tuple(sorted(a, key=ipaddress.IPv6Address)) for n, a in table.items()}
                for vni, table in names6.items()},
        reverse=dict(reverse),
        everywhere=frozenset(n for table in names.values() for n in table),
        addresses=frozenset(a for table in reverse.values() for a in table),
    )


def record_names(rec: NameRecord) -> set[str]:
    """The names one endpoint answers to, lower-case, without trailing dots."""
    labels = {n.lower().rstrip(".") for n in (rec.name, *rec.aliases) if n}
    if rec.network:
        labels |= {f"{n}.{rec.network.lower()}" for n in list(labels)}
    return labels


def ptr_address(qname: str) -> Optional[str]:
    """d.c.b.a.in-addr.arpa -> a.b.c.d; None for anything else."""
    if not qname.endswith(ARPA):
        return None
    parts = qname[: -len(ARPA)].split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        return None
    return ".".join(reversed([str(int(p)) for p in parts]))


class NameTable:
    """Follows names/ into memory; lookup() is what the resolver calls per query."""

    def __init__(self, store: Store, metrics=None):
        self.store = store
        self.metrics = metrics
        self._records: dict[str, NameRecord] = {}
        self._index = _Index()
        self._lock = threading.Lock()  # writers only: lookup reads one reference
        self.synced = threading.Event()  # the first snapshot is in
        # The table keeps its last view through a store outage: known names keep resolving.
        self._watch = store_watch("names", "names-watch", store, NAMES, self._on_snapshot, self._on_events,
                                  metrics, meanwhile="answers come from the last view")

    def start(self) -> None:
        self._watch.start()

    def stop(self) -> None:
        self._watch.stop()

    # -- the watch -----------------------------------------------------------

    def _on_snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        records = {}
        for kv in kvs:
            rec = decode_name(kv.key, kv.value)
            if rec is not None:
                records[kv.key] = rec
        with self._lock:
            self._records = records
            self._index = build_index(records)
        self.synced.set()

    def _on_events(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                rec = decode_name(event.key, event.value) if event.kind == "put" and event.value else None
                if rec is None:
                    self._records.pop(event.key, None)
                else:
                    self._records[event.key] = rec
            self._index = build_index(self._records)

    def load(self, records: dict[str, NameRecord]) -> None:
        """Replace the view (tests, and callers that hold records already)."""
        with self._lock:
            self._records = dict(records)
            self._index = build_index(self._records)
        self.synced.set()

    # -- queries -------------------------------------------------------------

    def lookup(self, tag: Optional[int], source_ip: str, qname: str, qtype: int):
        """An Answer for a cluster name (or a name to refuse), None: forward it.

        tag is the overlay whose listener got the query (None: the host's own,
        for containers on no pyoverlay network: everything is forwarded)."""
        if tag is None:
            return None
        index = self._index
        qname = qname.lower().rstrip(".")
        who = index.querier.get((tag, source_ip))
        # Not known yet (its record is still on its way): the overlay it asked on.
        overlays = index.overlays.get(who, frozenset()) | {tag} if who else frozenset((tag,))
        address = ptr_address(qname)
        if address is not None:
            if address not in index.addresses:
                return None
            for vni in sorted(overlays):
                name = index.reverse.get(vni, {}).get(address)
                if name is not None:
                    return _answer(NOERROR, (name,)) if qtype == PTR else _answer(NOERROR)
            return _answer(NXDOMAIN)
        if qname not in index.everywhere:
            return None
        found: list[str] = []
        found6: list[str] = []
        for vni in sorted(overlays):
            for ip in index.names.get(vni, {}).get(qname, ()):
                if ip not in found:
                    found.append(ip)
            for ip in index.names6.get(vni, {}).get(qname, ()):
                if ip not in found6:
                    found6.append(ip)
        if not found:
            return _answer(NXDOMAIN)  # a name of networks the querier is not on
        return _answer(NOERROR, tuple(found) if qtype == A else tuple(found6) if qtype == AAAA else ())

    # -- for operators and tests --------------------------------------------

    def records(self) -> dict[str, NameRecord]:
        return dict(self._records)
