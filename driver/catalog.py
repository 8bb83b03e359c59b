"""Cluster-wide network names: a network created on one host appears on all.

The driver protocol never carries a network's name, so the catalog learns
names from the local engine's API and keeps them in the store:

    local engine   -- events, inspect -->  catalog/<name>   (publish)
    catalog/<name> -- store watch ----->   local engine     (create, remove)

Two threads per host. The watch thread follows catalog/ into a table and
pokes the worker; it never calls the engine. The worker owns the engine
connection: it subscribes to network events first, then reconciles the
engine against the table in a full pass (after connecting, after every
catalog change, every RESYNC seconds) and handles each event as it comes.
An engine failure ends in a reconnect with back-off, a store failure in a
later pass. Neither reaches the driver: no request ever waits on this.

Each host keeps engine/<host>/<name> for the catalog names its engine holds:
the network ID, the containers on it (names for `pyoverlay status`), whether
it waits for containers to leave before it goes (for `pyoverlay network rm`),
or why the engine refused to create it. After a restart, that record tells a
network deleted from the catalog while this host was away (it had a record:
remove it) from one created here meanwhile (no record: publish it).

Deleting a catalog entry (`pyoverlay network rm`, or `docker network rm` on
any host) removes the network from every engine where no container uses it;
where one does, the record says so and the network goes when the last
container leaves.

Knowing the engine's networks, the worker also forgets what the store holds
for this host that the engine does not have: an engine that stops in the
middle of `docker network create` or of its rollback (the plugin said yes to
CreateNetwork, or the ReleasePool never came) leaves a network record, a
joined overlay or a pool hold behind, and the same subnet could never be
created here again. A leftover must stay one for PHANTOM_GRACE (a create in
flight holds the pool before CreateNetwork, for milliseconds), and the
engine must hold at least one of this host's networks, or it may not be the
engine that uses this plugin.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .engine import Engine, EngineNetworkInfo, EngineRefused, EngineUnavailable
from .model import Network, Pool, Record
from .state import CATALOG, catalog_key, engine_network_key, engine_prefix, network_key
from .store.base import Event, KeyValue, Store, StoreError
from .store.follow import follow

log = logging.getLogger(__name__)

OPT_VNI = "vni"
OPT_MTU = "com.docker.network.driver.mtu"

#: Seconds between full passes when nothing happens (missed events, lost writes).
RESYNC = 30.0
#: Back-off between engine connection attempts and between failed passes.
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
#: How Docker Engine before 28.1 refuses to remove a network it counts endpoints on.
ENGINE_MISCOUNT = "has active endpoints"
#: Seconds a network must be in the store and not in the engine before it is forgotten.
PHANTOM_GRACE = 5.0


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

    def options(self) -> dict[str, str]:
        options = {OPT_VNI: str(self.vni)} if self.vni else {}
        if self.mtu:
            options[OPT_MTU] = str(self.mtu)
        return options

    def matches(self, info: EngineNetworkInfo, vni: int = 0) -> bool:
        """Is the engine's network this one? vni: the overlay it is on (0: unknown)."""
        return (
            info.subnet == self.subnet
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


def parse_named(kv: KeyValue) -> Optional[NamedNetwork]:
    try:
        return NamedNetwork.from_json(kv.value)
    except (TypeError, ValueError) as e:
        # One bad record must not stop every other name from syncing.
        log.warning("catalog: ignoring %s: %s", kv.key, e)
        return None


class Catalog:
    def __init__(self, store: Store, engine: Engine, host: str, driver: str,
                 metrics=None, resync: float = RESYNC,
                 forget: Optional[Callable[[str, str], None]] = None):
        self.store = store
        self.engine = engine
        self.host = host
        self.driver = driver
        self.metrics = metrics
        self.resync = resync
        # forget(network_id or "", subnet): the driver's own DeleteNetwork + ReleasePool.
        self.forget = forget
        self._phantoms: dict[tuple[str, str], float] = {}  # leftover -> when first seen
        self._desired: dict[str, tuple[NamedNetwork, int]] = {}  # name -> (entry, mod revision)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._dirty = threading.Event()  # a catalog change is queued: coalesces pokes
        self._records: dict[str, EngineNetwork] = {}  # this host's engine/ records, as last written
        self._attached: dict[str, dict[str, str]] = {}  # network ID -> container ID -> endpoint ID
        self._removed_here: set[str] = set()  # network IDs we removed: their destroy event is ours
        self._withdraw: dict[str, str] = {}  # name -> subnet: removed here by a user, to delete from the catalog
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wants_pass = False  # an event asks for a full pass now
        self.synced = threading.Event()  # the first catalog snapshot is in
        self.connected = threading.Event()  # subscribed to the engine's events
        self.passes = 0  # full passes completed (tests wait on it)

    def start(self) -> None:
        for target, name in ((self._watch, "catalog-watch"), (self._run, "catalog-engine")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(("stop", 0, None))
        for thread in self._threads:
            thread.join(timeout=5)
        self.engine.close()

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.catalog_action(action)

    # -- the store side (watch thread) --------------------------------------

    def _watch(self) -> None:
        follow(self.store, CATALOG, self._stop, self._on_snapshot, self._on_events, self._on_error)

    def _on_error(self, exc: Exception) -> None:
        log.warning("catalog watch: %s (resuming)", exc)
        if self.metrics is not None:
            self.metrics.watch_error("catalog", exc)

    def _on_snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        table = {}
        for kv in kvs:
            entry = parse_named(kv)
            if entry is not None:
                table[kv.key[len(CATALOG):]] = (entry, kv.mod_revision)
        with self._lock:
            self._desired = table
        self.synced.set()
        self._poke()

    def _on_events(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                name = event.key[len(CATALOG):]
                entry = parse_named(KeyValue(event.key, event.value, event.revision)) if event.value else None
                if event.kind == "put" and entry is not None:
                    self._desired[name] = (entry, event.revision)
                else:
                    self._desired.pop(name, None)
        self._poke()

    def _poke(self) -> None:
        if not self._dirty.is_set():
            self._dirty.set()
            self._queue.put(("catalog", 0, None))

    def desired(self) -> dict[str, NamedNetwork]:
        with self._lock:
            return {name: entry for name, (entry, _) in self._desired.items()}

    # -- the engine side (worker thread) ------------------------------------

    def _run(self) -> None:
        delay, generation, reported = BACKOFF_MIN, 0, None
        while not self._stop.is_set():
            try:
                stream = self.engine.network_events()
            except (EngineUnavailable, EngineRefused) as e:
                # Usual while the engine starts or restarts: say it once.
                (log.debug if reported == str(e) else log.warning)("catalog: %s; retrying", e)
                reported = str(e)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, reported, generation = BACKOFF_MIN, None, generation + 1
            log.info("catalog: following network events of the engine at %s", self.engine.url)
            reader = threading.Thread(target=self._read, args=(stream, generation),
                                      name="catalog-events", daemon=True)
            reader.start()
            self.connected.set()
            if self.metrics is not None:
                self.metrics.engine_connected(True)
            try:
                self._serve(generation)
            except EngineUnavailable as e:
                log.warning("catalog: lost the engine (%s); reconnecting", e)
            except Exception:  # a bug here must not end the catalog for good
                log.exception("catalog: unexpected error; reconnecting")
                self._stop.wait(delay)
            finally:
                self.connected.clear()
                if self.metrics is not None:
                    self.metrics.engine_connected(False)
                stream.close()
                reader.join(timeout=5)

    def _read(self, stream, generation: int) -> None:
        for event in stream:
            self._queue.put(("event", generation, event))
        self._queue.put(("closed", generation, None))

    def _serve(self, generation: int) -> None:
        """Passes and events until the stream ends (raises EngineUnavailable) or stop."""
        due, retry = 0.0, BACKOFF_MIN  # due: monotonic time of the next full pass
        while not self._stop.is_set():
            now = time.monotonic()
            if self.synced.is_set() and now >= due:
                # Never before the first snapshot: an empty table would read as
                # "every network was deleted from the catalog".
                ok = self._attempt(self._pass)
                due = time.monotonic() + (self.resync if ok else retry)
                retry = BACKOFF_MIN if ok else min(retry * 2, self.resync)
                if self._phantoms:
                    due = min(due, min(self._phantoms.values()) + PHANTOM_GRACE)
            wait = max(0.0, due - time.monotonic()) if self.synced.is_set() else 0.5
            try:
                kind, gen, payload = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if kind == "stop":
                return
            if kind == "catalog":
                due = 0.0
            elif gen != generation:
                continue  # left over from an earlier connection
            elif kind == "closed":
                raise EngineUnavailable("the engine's event stream ended")
            else:
                if not self._attempt(lambda: self._on_engine_event(payload)):
                    due = min(due, time.monotonic() + retry)  # a full pass sets it right
                elif self._wants_pass:
                    due = 0.0
                self._wants_pass = False

    def _attempt(self, step) -> bool:
        """Run step; a store failure or an engine refusal means: try again later."""
        try:
            result = step()
            return True if result is None else result
        except StoreError as e:
            log.warning("catalog: the store failed (%s); retrying", e)
        except EngineRefused as e:
            log.warning("catalog: the engine refused (%s); retrying", e)
        return False

    def _pass(self) -> bool:
        """Make the engine match the catalog; False if something must be retried soon."""
        self._dirty.clear()
        ours = {info.name: info for info in self.engine.networks(self.driver)}
        self._attached = {info.id: dict(info.attached) for info in ours.values()}
        summaries = self.engine.network_summaries()
        names = {name: driver for _, name, driver, _ in summaries}
        with self._lock:
            desired = dict(self._desired)
        self._records = self._load_records()
        ok = self._withdraw_pending(desired)
        self._forget_leftovers(summaries)
        for name, record in list(self._records.items()):
            info = ours.get(name)
            if record.network_id and (info is None or info.id != record.network_id):
                self._drop_record(name)  # removed or replaced while nobody was watching
            elif not record.network_id and (name not in desired or name in ours):
                self._drop_record(name)  # a refusal that no longer applies
        for name, info in ours.items():
            ok &= self._local(info, desired.get(name, (None, 0))[0])
        for name, (entry, _) in desired.items():
            if name not in ours and name not in self._withdraw:
                ok &= self._create(entry, names.get(name))
        self.passes += 1
        return ok

    def _local(self, info: EngineNetworkInfo, entry: Optional[NamedNetwork]) -> bool:
        """One of our driver's networks in the engine, against its catalog entry."""
        record = self._records.get(info.name)
        if record is not None and record.network_id != info.id:
            record = None
        if entry is None:
            if record is not None and record.catalogued:
                return self._remove(info)
            return self._publish(info)
        if entry.matches(info, self._vni(info)):
            self._write(EngineNetwork(info.name, self.host, info.id, info.subnet, dict(info.containers),
                                      catalogued=True))
            return True
        if record is not None and record.removing:
            return self._remove(info)  # the old definition, still in use; the new one comes after it
        self._write(EngineNetwork(
            info.name, self.host, info.id, info.subnet, dict(info.containers),
            error=f"this host's network {info.name} on {info.subnet} differs from the catalog's on "
                  f"{entry.subnet}; remove it here (docker network rm {info.name}) to get the catalog's",
        ))
        return True  # an operator must act; retrying changes nothing

    def _vni(self, info: EngineNetworkInfo) -> int:
        kv = self.store.get(network_key(info.id))
        if kv is not None:
            return Network.from_json(kv.value).vni
        try:
            return int(info.options.get(OPT_VNI) or 0)
        except ValueError:
            return 0

    def _publish(self, info: EngineNetworkInfo) -> bool:
        if info.ipam_driver != self.driver:
            return True  # the driver refuses such networks; nothing to share
        vni = self._vni(info)
        if not vni:
            return False  # the driver's record is not in the store (yet)
        # Only a gateway given explicitly: the other hosts' IPAM hands out the
        # same shared one anyway, and every engine then shows the same settings.
        gateway = info.gateway
        try:
            mtu = int(info.options.get(OPT_MTU) or 0)
        except ValueError:
            mtu = 0
        entry = NamedNetwork(info.name, info.subnet, gateway, vni, mtu, info.internal, origin=self.host)
        key = catalog_key(info.name)
        if self.store.txn({key: 0}, put={key: entry.to_json()}):
            log.info("catalog: published network %s (%s, VNI %d) for every host", info.name, info.subnet, vni)
            self._count("published")
        else:
            kv = self.store.get(key)
            existing = parse_named(kv) if kv else None
            if existing is None:
                return False  # deleted meanwhile: the next pass decides
            if not existing.matches(info, vni):
                self._write(EngineNetwork(
                    info.name, self.host, info.id, info.subnet, dict(info.containers),
                    error=f"the catalog has another network {info.name} (on {existing.subnet}); this "
                          f"host's {info.name} on {info.subnet} stays local: rename one of them",
                ))
                return True
        self._write(EngineNetwork(info.name, self.host, info.id, info.subnet, dict(info.containers),
                                  catalogued=True))
        return True

    def _create(self, entry: NamedNetwork, other_driver: Optional[str]) -> bool:
        if other_driver is not None:
            self._refused(entry, f"a {other_driver or 'other'} network named {entry.name} already exists on "
                                 "this host; remove or rename it to get the catalog's network")
            return True
        try:
            network_id = self.engine.create_network(entry.name, self.driver, entry.subnet, entry.gateway,
                                                    entry.options(), entry.internal)
        except EngineRefused as e:
            self._refused(entry, f"the engine refused to create it: {e}")
            self._count("refused")
            return False
        log.info("catalog: created network %s (%s, VNI %d) in the engine", entry.name, entry.subnet, entry.vni)
        self._count("created")
        self._write(EngineNetwork(entry.name, self.host, network_id, entry.subnet, catalogued=True))
        return True

    def _refused(self, entry: NamedNetwork, why: str) -> None:
        previous = self._records.get(entry.name)
        if previous is None or previous.error != why:
            log.warning("catalog: network %s: %s", entry.name, why)
        self._write(EngineNetwork(entry.name, self.host, subnet=entry.subnet, error=why))

    def _remove(self, info: EngineNetworkInfo) -> bool:
        if info.containers:
            names = ", ".join(sorted(info.containers.values()))
            record = EngineNetwork(info.name, self.host, info.id, info.subnet, dict(info.containers),
                                   catalogued=True, removing=True)
            if self._records.get(info.name) != record:
                log.info("catalog: network %s left the catalog; kept while in use by %s", info.name, names)
            self._write(record)
            return True
        self._removed_here.add(info.id)
        try:
            self.engine.remove_network(info.id)
        except EngineRefused as e:
            self._removed_here.discard(info.id)
            if e.status == 404:
                self._drop_record(info.name)
                return True
            if ENGINE_MISCOUNT in str(e) and not info.containers:
                return self._miscounted(info, str(e))
            # A container joined in between: its connect event updates the record.
            log.info("catalog: network %s not removed yet: %s", info.name, e)
            return False
        log.info("catalog: removed network %s (no longer in the catalog)", info.name)
        self._count("removed")
        self._drop_record(info.name)
        return True

    def _miscounted(self, info: EngineNetworkInfo, refusal: str) -> bool:
        """The engine counts endpoints on a network it lists no container on.

        Docker Engine before 28.1 keeps that count apart from the endpoints
        and gets it wrong when many containers start and stop on the network
        at once (docs/engine-miscount.md); only its restart recounts. Said once in the log and in
        the record, for `pyoverlay network rm` and `status`; the pass keeps
        trying, so the network goes once the engine has restarted."""
        again = self.engine.network(info.id)
        if again is None or again.containers:
            return False  # removed meanwhile, or a container joined: the next pass sees which
        why = (f"this host's engine refuses to remove {info.name} ({refusal}) though no container is on it: "
               "Docker Engine before 28.1 miscounts endpoints when containers start and stop at once; "
               "restart the engine here (systemctl restart docker) to recount")
        record = EngineNetwork(info.name, self.host, info.id, info.subnet, catalogued=True, removing=True,
                               error=why)
        if self._records.get(info.name) != record:
            log.warning("catalog: %s", why)
            self._count("miscounted")
            self._write(record)
        return False

    def _forget_leftovers(self, summaries) -> None:
        if self.forget is None:
            return
        now = time.monotonic()
        kvs, _ = self.store.list("networks/")
        mine = {n.network_id: n for n in (Network.from_json(kv.value) for kv in kvs) if n.host == self.host}
        # Every engine network counts here, whatever its driver's name.
        engine_ids = {network_id for network_id, _, _, _ in summaries}
        engine_subnets = {subnet for _, _, _, subnets in summaries for subnet in subnets}
        leftovers: dict[tuple[str, str], str] = {}  # (network ID or "", subnet) -> what it is
        if set(mine) & engine_ids:
            for network_id in set(mine) - engine_ids:
                leftovers[(network_id, mine[network_id].subnet)] = f"network {network_id[:12]}"
            used = {n.subnet for n in mine.values()} | engine_subnets
            for kv in self.store.list("pools/")[0]:
                pool = Pool.from_json(kv.value)
                if self.host in pool.hosts and pool.subnet not in used:
                    leftovers[("", pool.subnet)] = "the hold on the pool"
        self._phantoms = {k: t for k, t in self._phantoms.items() if k in leftovers}
        for (network_id, subnet), what in sorted(leftovers.items()):
            first = self._phantoms.setdefault((network_id, subnet), now)
            if now - first < PHANTOM_GRACE or (network_id and self.engine.network(network_id) is not None):
                continue
            try:
                self.forget(network_id, subnet)
            except Exception as e:  # the kernel or the store: try again next pass
                log.warning("catalog: could not forget %s on %s: %s", what, subnet, e)
                continue
            del self._phantoms[(network_id, subnet)]
            log.warning("catalog: forgot %s on %s: the store had it for this host, the engine does not "
                        "(the engine stopped in the middle of a create or remove?)", what, subnet)
            self._count("forgotten")

    def _withdraw_pending(self, desired: dict[str, tuple[NamedNetwork, int]]) -> bool:
        """Delete catalog entries whose network a user removed here."""
        for name, subnet in list(self._withdraw.items()):
            kv = self.store.get(catalog_key(name))
            entry = parse_named(kv) if kv else None
            if entry is not None and entry.subnet == subnet:
                if not self.store.txn({kv.key: kv.mod_revision}, delete=[kv.key]):
                    return False  # changed meanwhile: look again next pass
                log.info("catalog: network %s was removed here; removed it from the catalog", name)
                self._count("withdrawn")
                with self._lock:
                    # Not waiting for the watch to say so: a pass in between would
                    # create the network again.
                    current = self._desired.get(name)
                    if current is not None and current[1] <= kv.mod_revision:
                        del self._desired[name]
            del self._withdraw[name]
            if name in desired and desired[name][0].subnet == subnet:
                del desired[name]
        return True

    def _on_engine_event(self, event: dict) -> bool:
        if event.get("Type") != "network":
            return True
        action = event.get("Action") or event.get("status") or ""
        actor = event.get("Actor") or {}
        network_id = actor.get("ID") or event.get("id") or ""
        attributes = actor.get("Attributes") or {}
        name = attributes.get("name") or ""
        if attributes.get("type") != self.driver:
            # Another driver's network under a catalog name is a conflict the pass records.
            if action in ("create", "destroy") and name in self.desired():
                self._wants_pass = True
            return True
        if action == "create":
            info = self.engine.network(network_id)
            if info is not None:
                self._attached[info.id] = dict(info.attached)
                with self._lock:
                    entry = self._desired.get(name, (None, 0))[0]
                return self._local(info, entry)
        elif action == "destroy":
            if network_id in self._removed_here:
                self._removed_here.discard(network_id)  # our own removal
                return True
            record = self._records.get(name)
            if record is None or record.network_id != network_id:
                return True
            self._drop_record(name)
            if record.catalogued and not record.removing:
                # `docker network rm` here: the network goes from every host, as
                # it would with one cluster-wide network.
                self._withdraw[name] = record.subnet
                self._wants_pass = True
        elif action in ("connect", "disconnect"):
            record = self._records.get(name)
            if record is None or record.network_id != network_id:
                return True
            attached = self._attached.setdefault(network_id, {})
            containers = dict(record.containers)
            container_id = attributes.get("container") or ""
            if action == "connect":
                # No network inspect while containers come and go (engine.endpoint_of says why).
                found = self.engine.endpoint_of(container_id, network_id)
                if found is None:
                    return True  # gone again: its disconnect follows
                endpoint_id, container_name = found
                attached[container_id] = endpoint_id
                containers[endpoint_id] = container_name
            else:
                endpoint_id = attached.pop(container_id, None)
                if endpoint_id is None:
                    return True  # never seen attached: the next pass sets the record right
                containers.pop(endpoint_id, None)
            self._write(replace(record, containers=containers))
            if record.removing and not containers:
                self._wants_pass = True  # the last container left: the pass removes it
        return True

    # -- this host's records -------------------------------------------------

    def _load_records(self) -> dict[str, EngineNetwork]:
        prefix = engine_prefix(self.host)
        kvs, _ = self.store.list(prefix)
        records = {}
        for kv in kvs:
            try:
                records[kv.key[len(prefix):]] = EngineNetwork.from_json(kv.value)
            except (TypeError, ValueError):
                self.store.delete(kv.key)  # ours to rewrite
        return records

    def _write(self, record: EngineNetwork) -> None:
        if self._records.get(record.name) != record:
            self.store.put(engine_network_key(self.host, record.name), record.to_json())
            self._records[record.name] = record

    def _drop_record(self, name: str) -> None:
        if self._records.pop(name, None) is not None:
            self.store.delete(engine_network_key(self.host, name))
