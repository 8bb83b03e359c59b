"""The endpoint sweep: this host's endpoint records reconciled against the engine.

When the plugin is down while a container goes (SIGKILLed during `docker rm -f`,
or between CreateEndpoint and Join of a `docker run`), Docker Engine 28 logs the
failed Leave/DeleteEndpoint/ReleaseAddress and forgets the endpoint; nobody ever
asks pyoverlay again. Its record, peer, DNS name, address and any kernel end
would stay forever. The sweep removes such an endpoint through the very calls the
engine skipped (DeleteEndpoint, then ReleaseAddress).

The rule, safe against a CreateEndpoint in flight (the engine creates the endpoint
before the container runs, and a container lists its endpoint only once it runs):
an endpoint record of this host is removed only when
  * the engine answered, and has the endpoint's network (its NetworkID: a
    pyoverlay network of this engine; an engine that is not ours judges nothing),
  * no container of the engine (running or not) lists the endpoint, and
  * that held in two passes at least `grace` seconds apart, each listing taken
    after the store was read (a record written after a listing is never judged
    by it).
Its address is released only if its claim is older than the endpoint record (an
address released and claimed again since belongs to someone else now).

The same pass releases this host's container addresses that no endpoint record
uses: a ReleaseAddress that failed (the store restarting, the plugin killed
between RequestAddress and CreateEndpoint, on a host whose next restart is far
off) leaves one the engine has forgotten. An address goes only when two passes
at least `grace` seconds apart found it unused with its claim unchanged; the
addresses are listed before the endpoint records, so a claim whose endpoint is
written in between never looks unused.

Only the container list is read on every pass; the network list only when a
record is missing from it (Docker Engine 20.10 miscounts endpoints when network
listings meet container bursts: docs/engine-miscount.md).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Protocol

from .engine import EngineRefused, EngineUnavailable
from .model import Endpoint
from .state import State, address_key, endpoint_key
from .store.base import StoreError

log = logging.getLogger("pyoverlay.sweep")

EVERY = 10.0  # seconds between passes
GRACE = 60.0  # seconds an endpoint must stay unknown to the engine before it goes


class EngineView(Protocol):
    def container_endpoints(self) -> set[str]: ...

    def network_summaries(self) -> list[tuple]: ...


class EndpointSweep:
    def __init__(self, state: State, engine: EngineView, host: str,
                 delete_endpoint: Callable[[str, str], None], release_address: Callable[[str, str], None],
                 release_unused: Callable[[str, str, int], bool],
                 every: float = EVERY, grace: float = GRACE, clock: Callable[[], float] = time.monotonic):
        """delete_endpoint(network_id, endpoint_id) and release_address(pool_id, address):
        the driver's own DeleteEndpoint and ReleaseAddress; release_unused(subnet, ip,
        revision): the IPAM's release of a claim still at revision."""
        self.state, self.engine, self.host = state, engine, host
        self.delete_endpoint, self.release_address = delete_endpoint, release_address
        self.release_unused = release_unused
        self.every, self.grace, self.clock = every, grace, clock
        self._unknown_since: dict[str, float] = {}  # endpoint ID -> first pass that found it unknown
        self._unused_since: dict[tuple[str, str, int], float] = {}  # (subnet, ip, claim revision) -> first pass
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="endpoint-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sweep()
            except (EngineUnavailable, EngineRefused, StoreError) as exc:
                log.debug("endpoint sweep skipped: %s", exc)  # the next pass tries again
            except Exception:  # a bug must not end the thread
                log.exception("endpoint sweep failed")

    def sweep(self) -> list[str]:
        """One pass; returns the endpoint IDs removed."""
        now = self.clock()
        claims = self._claims()  # before the endpoint records: see the module's rule
        every_record = self.state.list("endpoints/", Endpoint)
        self._release_unused(claims, every_record, now)
        records = [e for e in every_record if e.host == self.host]
        known = self.engine.container_endpoints()  # after the store read: see the module's rule
        unknown = [e for e in records if e.endpoint_id not in known]
        if unknown:
            networks = {summary[0] for summary in self.engine.network_summaries()}
            unknown = [e for e in unknown if e.network_id in networks]
        ids = {e.endpoint_id for e in unknown}
        self._unknown_since = {eid: t for eid, t in self._unknown_since.items() if eid in ids}
        removed = []
        for endpoint in unknown:
            since = self._unknown_since.setdefault(endpoint.endpoint_id, now)
            if now - since >= self.grace:
                self._remove(endpoint, now - since)
                del self._unknown_since[endpoint.endpoint_id]
                removed.append(endpoint.endpoint_id)
        return removed

    def _claims(self) -> list[tuple[str, str, int]]:
        """(subnet, ip, claim revision) of this host's container addresses, in
        the pools this host holds."""
        return [(pool.subnet, ip, revision) for pool in self.state.pools() if self.host in pool.hosts
                for ip, address, revision in self.state.addresses(pool.subnet)
                if address.kind == "container" and address.host == self.host]

    def _release_unused(self, claims: list[tuple[str, str, int]], records: list[Endpoint], now: float) -> None:
        used = {address for e in records for address in e.addresses()}  # both of a dual-stack endpoint's
        unused = {claim for claim in claims if claim[:2] not in used}
        self._unused_since = {claim: t for claim, t in self._unused_since.items() if claim in unused}
        for claim in sorted(unused):
            since = self._unused_since.setdefault(claim, now)
            if now - since >= self.grace:
                subnet, ip, revision = claim
                if self.release_unused(subnet, ip, revision):
                    log.warning("address %s of pool %s was claimed by this host but no endpoint has used it for "
                                "%.0f s (a ReleaseAddress that failed, or a claim the engine never learnt of); "
                                "released it", ip, subnet, now - since)
                del self._unused_since[claim]

    def _remove(self, endpoint: Endpoint, unknown_for: float) -> None:
        record = self.state.store.get(endpoint_key(endpoint.endpoint_id))
        # Each family's address (a dual-stack endpoint holds two).
        claims = [(subnet, ip, self.state.store.get(address_key(subnet, ip))) for subnet, ip in endpoint.addresses()]
        if record is None:
            return  # the engine's own DeleteEndpoint came meanwhile
        log.warning("endpoint %s (%s on network %s) is unknown to the engine for %.0f s: no container has it "
                    "(the plugin was down when it went); removing it", endpoint.endpoint_id[:12], endpoint.address,
                    endpoint.network_id[:12], unknown_for)
        self.delete_endpoint(endpoint.network_id, endpoint.endpoint_id)
        for subnet, ip, claim in claims:
            if claim is not None and claim.mod_revision < record.mod_revision:
                self.release_address(subnet, ip)
