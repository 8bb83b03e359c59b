"""Prometheus metrics (opt-in: `serve --metrics-addr HOST:PORT`).

The driver modules know nothing of Prometheus: they call a few plain methods
on whatever object they are given (peer_update, reconciled, watch_error,
catalog_action, engine_connected), and the HTTP face reports every call
through create_app's observe hook. Store errors are counted by a thin proxy
around the store, so every caller (requests, watches, membership) is covered
without touching any of them.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from driver.store.base import Compacted, StoreError

log = logging.getLogger(__name__)

# Requests take about a millisecond; CreateNetwork and Join tens; anything
# near a second is the store or the kernel struggling.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Cluster answers take a fraction of a millisecond; forwarded ones the
# upstream's time; a few seconds is an upstream timing out.
DNS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0)


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (all addresses) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {text!r}: expected HOST:PORT, for example 127.0.0.1:9477")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("pyoverlay_requests", "Driver and IPAM calls answered, by outcome",
                                ["call", "outcome"], registry=r)
        self.request_seconds = Histogram("pyoverlay_request_duration_seconds", "Time to answer a call",
                                         ["call"], buckets=BUCKETS, registry=r)
        self.peer_updates = Counter("pyoverlay_peer_updates", "Remote peers programmed into or removed "
                                    "from the kernel as the store changed", ["op"], registry=r)
        self.peers = Gauge("pyoverlay_peers_programmed", "Remote peers this host currently programs",
                           registry=r)
        self.reconcile_runs = Counter("pyoverlay_reconcile_runs", "Reconciliations of the kernel's peer "
                                      "entries against the store", registry=r)
        self.reconcile_drift = Counter("pyoverlay_reconcile_drift", "Peer entries a reconciliation had "
                                       "to add or remove (the kernel differed from the store)",
                                       ["kind"], registry=r)
        self.store_errors = Counter("pyoverlay_store_errors", "Store operations that failed",
                                    ["op"], registry=r)
        self.watch_reconnects = Counter("pyoverlay_watch_reconnects", "Store watches started again after "
                                        "an error or a compaction", ["watch"], registry=r)
        self.catalog_actions = Counter("pyoverlay_catalog_actions", "Cluster-wide network catalog: "
                                       "networks published, created, removed, withdrawn, refused, forgotten, "
                                       "miscounted (the engine counts endpoints it has not)",
                                       ["action"], registry=r)
        self.engine_up = Gauge("pyoverlay_engine_connected", "1 while the catalog follows the local "
                               "engine's events", registry=r)
        # Address blocks (driver/blocks.py): claims, borrows, compare-and-set retries.
        self.ipam_events = Counter("pyoverlay_ipam_events", "Address block events: block_claim, block_adopt, "
                                   "block_release, borrow (an address from another host's block), cas_retry "
                                   "(a claim another host won first)", ["event"], registry=r)
        # The cluster resolver (driver/dns): every query, by how it was answered.
        self.dns_queries = Counter("pyoverlay_dns_queries", "DNS queries answered by the cluster resolver, "
                                   "by outcome (answered, forwarded, nxdomain, refused, formerr, servfail)",
                                   ["outcome"], registry=r)
        self.dns_seconds = Histogram("pyoverlay_dns_query_duration_seconds", "Time from a DNS query's "
                                     "arrival to its answer (forwarded ones include the upstream)",
                                     ["outcome"], buckets=DNS_BUCKETS, registry=r)
        self._server = None
        self.registry.register(BadRecords())

    def ipam_event(self, event: str) -> None:
        self.ipam_events.labels(event).inc()

    # The HTTP face (create_app's observe hook).

    def observe(self, call: str, seconds: float, ok: bool) -> None:
        self.requests.labels(call, "ok" if ok else "error").inc()
        self.request_seconds.labels(call).observe(seconds)

    # What the driver modules call.

    def peer_update(self, op: str, n: int = 1) -> None:
        self.peer_updates.labels(op).inc(n)

    def reconciled(self, added: int, removed: int) -> None:
        self.reconcile_runs.inc()
        self.reconcile_drift.labels("added").inc(added)
        self.reconcile_drift.labels("removed").inc(removed)

    def watch_error(self, watch: str, exc: Exception) -> None:
        # follow() restarts the watch (or re-lists) after every error it reports.
        self.watch_reconnects.labels(watch).inc()

    def catalog_action(self, action: str) -> None:
        self.catalog_actions.labels(action).inc()

    def engine_connected(self, up: bool) -> None:
        self.engine_up.set(1 if up else 0)

    def dns_query(self, outcome: str, seconds: float) -> None:
        self.dns_queries.labels(outcome).inc()
        self.dns_seconds.labels(outcome).observe(seconds)

    def track_peers(self, count: Callable[[], int]) -> None:
        """Read the programmed peer count at scrape time."""
        self.peers.set_function(count)

    def wrap_store(self, store):
        return CountingStore(store, lambda op: self.store_errors.labels(op).inc())

    # The endpoint.

    def serve(self, addr: str) -> tuple[str, int]:
        """Start the HTTP endpoint in a thread; returns the address bound."""
        host, port = parse_addr(addr)
        self._server, _ = start_http_server(port, host, registry=self.registry)
        bound = self._server.server_address
        log.info("metrics on http://%s:%d/metrics", host, bound[1])
        return host, bound[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class CountingStore:
    """The store, with every StoreError counted by operation (a compaction is
    not an error: it is how a watch learns history is gone)."""

    def __init__(self, store, count: Callable[[str], None]):
        self._store = store
        self._count = count

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr
        if name == "watch":
            return self._watch

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Compacted:
                raise
            except StoreError:
                self._count(name)
                raise

        return call

    def _watch(self, *args, **kwargs):
        try:
            yield from self._store.watch(*args, **kwargs)
        except Compacted:
            raise
        except StoreError:
            self._count("watch")
            raise


class BadRecords:
    """pyoverlay_store_bad_records: store records skipped because they did not
    decode, by kind (driver/state.py counts them, each key once; read at scrape time)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        from driver.state import bad_records

        family = CounterMetricFamily("pyoverlay_store_bad_records", "Store records skipped because they "
                                     "did not decode (bad JSON, missing or mistyped fields, malformed key), "
                                     "each key counted once, by kind", labels=["record"])
        for kind, count in sorted(bad_records().items()):
            family.add_metric([kind], count)
        yield family
