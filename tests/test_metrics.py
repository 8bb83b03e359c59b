"""Metrics scraped over HTTP and parsed with Prometheus' own text parser,
from a driver on a real kernel (throw-away host namespace); and the JSON log
format."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driver.dataplane import Dataplane
from driver.ipam import Ipam
from driver.model import Peer
from driver.network import NetworkDriver
from driver.peersync import PeerSync
from driver.state import State, peer_key
from driver.store import open_store
from plugin.app import create_app
from plugin.logs import JsonFormatter
from plugin.metrics import Metrics, parse_addr
from tests.conftest import PluginUnderTest, new_id
from tests.hosts import wait_for
from tests.test_protocol import make_endpoint, make_network

REMOTE = "10.97.200.2"


class MeteredPlugin(PluginUnderTest):
    """PluginUnderTest with metrics wired as serve wires them."""

    def __init__(self, host):
        self.host = host
        self.metrics = Metrics()
        self.raw_store = open_store("memory://")
        self.store = self.metrics.wrap_store(self.raw_store)
        self.dataplane = Dataplane(vtep=host.addr, host_netns=host.name, netns_dir=host.netns_dir)
        self.peers = PeerSync(self.store, self.dataplane, vtep=host.addr, metrics=self.metrics)
        self.metrics.track_peers(self.peers.programmed)
        state = State(self.store)
        self.network = NetworkDriver(state, self.dataplane, self.peers, host=host.addr, vtep=host.addr)
        self.ipam = Ipam(state, host.addr, host_routes=self.dataplane.routes)
        self.client = create_app(self.network, self.ipam, observe=self.metrics.observe).test_client()
        self.peers.start()
        assert self.peers.synced.wait(5)


@pytest.fixture
def metered(host_ns):
    p = MeteredPlugin(host_ns)
    p.metrics.serve("127.0.0.1:0")
    yield p
    p.metrics.close()
    for vni in p.dataplane.networks():
        p.dataplane.delete_network(vni)
    p.close()


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    host, port = metrics._server.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scraped_metrics_follow_requests_peers_and_store(metered):
    network_id, pool_id, _ = make_network(metered)
    make_endpoint(metered, network_id, pool_id)
    status, _ = metered.call("NetworkDriver.CreateNetwork", {"NetworkID": 7})  # refused: not a string
    assert status == 400
    vni = json.loads(metered.store.get(f"networks/{network_id}").value)["vni"]

    peers = {new_id(): Peer(ip=f"10.20.0.{100 + i}", mac=f"02:50:0a:14:00:{100 + i:02x}", vtep=REMOTE)
             for i in range(3)}
    for endpoint_id, peer in peers.items():
        metered.store.put(peer_key(vni, endpoint_id), peer.to_json())
    wait_for(lambda: len(metered.dataplane.peers(vni)) == 3, 5, "three peers programmed")
    metered.store.delete(peer_key(vni, next(iter(peers))))
    wait_for(lambda: len(metered.dataplane.peers(vni)) == 2, 5, "one peer removed")

    # Drift: an entry the store never had, found by the reconcile that a
    # compaction forces (the watch restarts from a fresh list). The peer
    # table's lock holds the watch back while history it has not read yet is
    # compacted away, as etcd does to a host that falls behind.
    stray = Peer(ip="10.20.0.250", mac="02:50:0a:14:00:fa", vtep="10.97.201.2")
    metered.dataplane.add_peer(vni, stray)
    with metered.peers._lock:
        elsewhere = Peer(ip="10.30.0.2", mac="02:50:0a:1e:00:02", vtep=REMOTE)  # an overlay not on this host
        metered.store.put(peer_key(999, new_id()), elsewhere.to_json())
        metered.store.put("unrelated", "x")
        metered.raw_store.compact(metered.raw_store.list("")[1])
    wait_for(lambda: stray not in metered.dataplane.peers(vni), 5, "the reconcile to remove the stray entry")

    # A store that does not answer: the error is counted where it happened.
    dead = metered.metrics.wrap_store(open_store("etcd://127.0.0.1:9"))
    with pytest.raises(Exception):
        dead.get("anything")

    samples = scrape(metered.metrics)
    assert value(samples, "pyoverlay_requests_total", call="NetworkDriver.CreateNetwork", outcome="ok") == 1
    assert value(samples, "pyoverlay_requests_total", call="NetworkDriver.CreateNetwork", outcome="error") == 1
    assert value(samples, "pyoverlay_requests_total", call="IpamDriver.RequestAddress", outcome="ok") == 2
    assert value(samples, "pyoverlay_request_duration_seconds_count", call="NetworkDriver.CreateEndpoint") == 1
    assert value(samples, "pyoverlay_request_duration_seconds_bucket",
                 call="NetworkDriver.CreateEndpoint", le="+Inf") == 1
    assert value(samples, "pyoverlay_peer_updates_total", op="add") == 3
    assert value(samples, "pyoverlay_peer_updates_total", op="remove") == 1
    assert value(samples, "pyoverlay_peers_programmed") == 2
    # One reconcile when the network was added, one after the compaction.
    assert value(samples, "pyoverlay_reconcile_runs_total") == 2
    assert value(samples, "pyoverlay_reconcile_drift_total", kind="removed") == 1
    assert value(samples, "pyoverlay_reconcile_drift_total", kind="added") == 0
    assert value(samples, "pyoverlay_watch_reconnects_total", watch="peers") == 1
    assert value(samples, "pyoverlay_store_errors_total", op="get") == 1
    # A compaction is not a store error.
    assert value(samples, "pyoverlay_store_errors_total", op="watch") == 0


@pytest.mark.parametrize("text, addr", [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    (":9477", ("0.0.0.0", 9477)),
    ("[::1]:9477", ("::1", 9477)),
])
def test_metrics_addr(text, addr):
    assert parse_addr(text) == addr


@pytest.mark.parametrize("text", ["9477", "host:", "host:http", "h:70000"])
def test_bad_metrics_addr(text):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_addr(text)


def test_json_log_lines():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pyoverlay")  # the request logger's parent
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # Exactly as the HTTP face logs a request.
        logging.getLogger("pyoverlay.request").info("%s %s %.1fms %s", "NetworkDriver.Join",
                                                    "NetworkID=0123456789ab EndpointID=ba9876543210", 1.25, "ok")
        logger.warning("store: %s", "etcd at http://x down")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    request, warning = [json.loads(line) for line in out.getvalue().splitlines()]
    assert request["message"] == "NetworkDriver.Join NetworkID=0123456789ab EndpointID=ba9876543210 1.2ms ok"
    assert {k: request[k] for k in ("level", "logger", "call", "ids", "duration_ms", "outcome")} == {
        "level": "info", "logger": "pyoverlay.request", "call": "NetworkDriver.Join",
        "ids": {"NetworkID": "0123456789ab", "EndpointID": "ba9876543210"}, "duration_ms": 1.25, "outcome": "ok"}
    assert request["time"].endswith("Z")
    assert {k: warning[k] for k in ("level", "logger", "message")} == {
        "level": "warning", "logger": "pyoverlay", "message": "store: etcd at http://x down"}
    assert "call" not in warning


def test_dns_query_series():
    metrics = Metrics()
    metrics.serve("127.0.0.1:0")
    try:
        metrics.dns_query("answered", 0.0003)
        metrics.dns_query("answered", 0.0004)
        metrics.dns_query("forwarded", 0.02)
        metrics.dns_query("nxdomain", 0.0002)
        samples = scrape(metrics)
    finally:
        metrics.close()
    assert value(samples, "pyoverlay_dns_queries_total", outcome="answered") == 2
    assert value(samples, "pyoverlay_dns_queries_total", outcome="forwarded") == 1
    assert value(samples, "pyoverlay_dns_queries_total", outcome="nxdomain") == 1
    assert value(samples, "pyoverlay_dns_query_duration_seconds_count", outcome="answered") == 2
    assert value(samples, "pyoverlay_dns_query_duration_seconds_bucket", outcome="answered", le="0.0005") == 2
    assert value(samples, "pyoverlay_dns_query_duration_seconds_bucket", outcome="forwarded", le="0.01") == 0
    assert value(samples, "pyoverlay_dns_query_duration_seconds_bucket", outcome="forwarded", le="0.025") == 1
