"""This host's containers' names, published for every host's resolver.

    local engine -- events, container inspect -->  names/<vni>/<endpoint_id>  (under a lease)

A subscriber of the engine's events (driver/events.py: one stream per
process, shared with the catalog) for those that change a container's names:
network connect and disconnect, rename, destroy. Its worker thread makes a
full pass (every running container, inspected) each time the stream opens
and every RESYNC seconds, and republishes one container per event. Container
inspect only, never network inspect (Engine.endpoint_of says why); a
connect's inspect is shared with the catalog.

The records ride a lease of this publisher's own, with the host record's TTL:
a host that dies takes its names with it, and a new lease (after a store
outage outlived the old one) means every record is written again. Writes
that fail (the store is down) are retried with back-off; the rest of the
cluster keeps the names it already has meanwhile. The lease is kept alive
while the engine is down too.

Nothing here is on a request path: the driver never waits on it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

from .engine import Engine
from .events import EngineEvent, QueuedSubscriber, attempt
from .model import NameRecord
from .state import State
from .store.base import StoreError

log = logging.getLogger(__name__)

RESYNC = 30.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
LEASE_TTL = 10  # seconds; as the host record's

NameId = tuple[int, str]  # (VNI, endpoint ID): one names/ record


def records_of(inspect: dict, host: str, vni_of) -> dict[NameId, NameRecord]:
    """names/ records for one inspected container: one per endpoint on our networks.

    vni_of(network_id) -> VNI, or None for a network that is not this host's pyoverlay one."""
    name = (inspect.get("Name") or "").lstrip("/")
    container = inspect.get("Id") or ""
    found = {}
    if not (inspect.get("State") or {}).get("Running", True):
        return found
    for network, settings in ((inspect.get("NetworkSettings") or {}).get("Networks") or {}).items():
        settings = settings or {}
        endpoint, address = settings.get("EndpointID"), settings.get("IPAddress")
        if not endpoint or not address:
            continue
        vni = vni_of(settings.get("NetworkID") or "")
        if vni is None:
            continue
        # Aliases (and 25.0+'s DNSNames): --network-alias, the short ID; not the name again.
        aliases = {a for a in (settings.get("Aliases") or []) + (settings.get("DNSNames") or []) if a and a != name}
        found[(vni, endpoint)] = NameRecord(host=host, container=container, name=name, address=address,
                                            network=network, aliases=tuple(sorted(aliases)),
                                            address6=settings.get("GlobalIPv6Address") or "")
    return found


class NamePublisher(QueuedSubscriber):
    #: The engine events that change a container's names.
    EVENTS = frozenset({("network", "connect"), ("network", "disconnect"), ("container", "rename"),
                        ("container", "destroy")})

    def __init__(self, state: State, engine: Engine, host: str, ttl: int = LEASE_TTL, resync: float = RESYNC):
        self.state = state
        self.engine = engine
        self.host = host
        self.ttl = ttl
        self.resync = resync
        self._desired: dict[NameId, NameRecord] = {}  # what the engine says
        self._written: dict[NameId, NameRecord] = {}  # what the store holds under our lease
        self._lease = 0
        self._renewed = 0.0
        self._vnis: dict[str, Optional[int]] = {}  # network ID -> VNI (None: not ours)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.passes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="names-publish", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lease:
            try:
                self.state.store.revoke(self._lease)  # a clean stop: the names go now
            except StoreError:
                pass  # they expire with the lease
        self.engine.close()

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        up, due, retry = False, 0.0, BACKOFF_MIN  # due: monotonic time of the next full pass
        while not self._stop.is_set():
            if up and time.monotonic() >= due:
                ok = attempt(self._pass, "names")
                due = time.monotonic() + (self.resync if ok else retry)
                retry = BACKOFF_MIN if ok else min(retry * 2, BACKOFF_MAX)
            self._keep_lease()
            deadlines = [due] if up else [time.monotonic() + BACKOFF_MAX]
            if self._lease:
                deadlines.append(self._renewed + self.ttl / 3)
            try:
                kind, payload = self._queue.get(timeout=max(0.0, min(deadlines) - time.monotonic()))
            except queue.Empty:
                continue
            if kind == "stop":
                return
            if kind == "up":
                up, due, retry = True, 0.0, BACKOFF_MIN
            elif kind == "down":
                up = False
                log.warning("names: lost the engine (its event stream ended); waiting for it")
            elif up and not attempt(lambda: self._on_event(payload), "names"):
                # What the event changed may not be in desired yet: a full pass soon sets it right.
                due = min(due, time.monotonic() + retry)
                retry = min(retry * 2, BACKOFF_MAX)

    def _on_event(self, event: EngineEvent) -> None:
        if event.type == "network" and event.actor_id and self._vni(event.actor_id) is None:
            return  # another driver's network
        if event.container_id:
            self._republish(event.container_id, event.container(self.engine))
            self._flush()

    def _republish(self, container: str, data: Optional[dict]) -> None:
        fresh = records_of(data, self.host, self._vni) if data is not None else {}
        for key in [k for k, r in self._desired.items() if r.container == container and k not in fresh]:
            del self._desired[key]
        self._desired.update(fresh)

    def _pass(self) -> None:
        """Every running container, against what the store holds for this host."""
        self._vnis = {}
        desired = {}
        for container in self.engine.running_containers():
            data = self.engine.container(container)
            if data is not None:
                desired.update(records_of(data, self.host, self._vni))
        self._desired = desired
        if not self._lease:
            self._new_lease()
        held = self.state.names_of(self.host)
        # Leftovers of an earlier run go; ours are written again if they differ.
        self._written = {k: r for k, r in held.items() if self._written.get(k) == r}
        for key in set(held) - set(self._written):
            if key not in desired:
                self.state.delete_name(*key)
        self._flush()
        self.passes += 1

    def _flush(self) -> None:
        if not self._lease:
            self._new_lease()
        for key, rec in list(self._desired.items()):
            if self._written.get(key) != rec:
                self.state.put_name(*key, rec, lease=self._lease)
                self._written[key] = rec
        for key in [k for k in self._written if k not in self._desired]:
            self.state.delete_name(*key)
            del self._written[key]

    # -- the lease -------------------------------------------------------------

    def _new_lease(self) -> None:
        self._lease = self.state.store.grant_lease(self.ttl)
        self._renewed = time.monotonic()
        self._written = {}  # nothing is under the new lease yet

    def _keep_lease(self) -> None:
        if not self._lease or time.monotonic() - self._renewed < self.ttl / 3:
            return
        try:
            if self.state.store.keepalive(self._lease):
                self._renewed = time.monotonic()
                return
            log.warning("names: the lease expired; publishing every name again")
            self._new_lease()
            self._flush()
        except StoreError as e:
            self._renewed = time.monotonic()  # try again in ttl/3; etcd keeps leases alive across its restart
            log.warning("names: cannot renew the lease (%s); retrying", e)

    # -- networks --------------------------------------------------------------

    def _vni(self, network_id: str) -> Optional[int]:
        if network_id not in self._vnis:
            network = self.state.network(network_id)
            # A miss is kept too: the driver writes a network's record before the
            # engine has it, so no container can connect to a network unknown here.
            self._vnis[network_id] = network.vni if network is not None and network.host == self.host else None
        return self._vnis[network_id]
