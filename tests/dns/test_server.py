"""Cluster answers, listeners and TCP handling of the resolver, over real
sockets (loopback, and a throw-away network namespace)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from pyroute2 import netns as pr_netns

from driver.dns.server import Answer, Resolver
from tests.dns.conftest import CountingMetrics, TableLookup, bind_pair, loopback_address
from tests.hosts import wait_for


def addresses(response: dns.message.Message) -> set[str]:
    return {rr.address for rrset in response.answer for rr in rrset if rrset.rdtype == dns.rdatatype.A}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_cluster_name_answers_every_address_authoritatively_with_ttl_0(serve, transport):
    s = serve()
    r = getattr(s, transport)("DB.")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.RA and r.flags & dns.flags.QR
    assert addresses(r) == {"10.20.0.5", "10.20.0.6"}
    assert [rrset.ttl for rrset in r.answer] == [0]
    assert r.question[0].name.to_text() == "DB."  # the question as asked
    # The lookup saw the listener's tag, the querier's address, the name in lower case, the type.
    assert s.lookup.calls[-1] == (7, "127.0.0.1", "db", dns.rdatatype.A)


def test_name_dot_network_and_edns_query(serve):
    s = serve()
    r = s.udp("db.net1", use_edns=0, payload=4096)
    assert addresses(r) == {"10.20.0.5", "10.20.0.6"}
    assert r.edns == 0  # an EDNS query gets an EDNS answer


def test_name_of_another_overlay_is_nxdomain(serve, upstream):
    s = serve(upstreams=[upstream.address])
    r = s.udp("secret")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.flags & dns.flags.AA and not r.answer
    assert upstream.count() == 0  # never asked upstream: the cluster owns the name


@pytest.mark.parametrize("rdtype", ["AAAA", "MX", "TXT", "TYPE65280", "ANY"])
def test_other_types_for_a_cluster_name_are_nodata(serve, upstream, rdtype):
    s = serve(upstreams=[upstream.address])
    r = s.udp("web", rdtype)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.flags & dns.flags.AA
    assert s.lookup.calls[-1][3] == dns.rdatatype.from_text(rdtype)  # the type was passed through
    assert upstream.count() == 0


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_ptr(serve, transport):
    s = serve()
    r = getattr(s, transport)(dns.reversename.from_address("10.20.0.5"), "PTR")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.target.to_text() for rrset in r.answer for rr in rrset] == ["db.net1."]


def test_many_addresses_over_udp_are_truncated_then_whole_over_tcp(serve):
    many = tuple(f"10.21.{i // 250}.{i % 250 + 1}" for i in range(300))
    s = serve(lookup=lambda tag, src, name, qtype: Answer(0, many) if qtype == dns.rdatatype.A else None)
    r = s.udp("crowd")
    assert r.flags & dns.flags.TC
    assert len(addresses(r)) < 300
    assert addresses(s.tcp("crowd")) == set(many)


def test_lookup_that_raises_is_servfail_counted_and_logged_once(serve, caplog):
    metrics = CountingMetrics()
    lookup = TableLookup()
    s = serve(lookup=lookup, metrics=metrics)
    lookup.fail = KeyError("table half built")
    for _ in range(3):
        assert s.udp("db").rcode() == dns.rcode.SERVFAIL
    assert s.tcp("db").rcode() == dns.rcode.SERVFAIL
    wait_for(lambda: len(metrics.calls) == 4, 3, "four queries counted")  # counted after the answer is sent
    assert metrics.outcomes() == ["servfail"] * 4
    assert len([r for r in caplog.records if "raised KeyError" in r.getMessage()]) == 1
    lookup.fail = None
    assert addresses(s.udp("db")) == {"10.20.0.5", "10.20.0.6"}  # and it goes on serving


def test_records_that_are_not_addresses_are_servfail(serve):
    s = serve(lookup=lambda tag, src, name, qtype: Answer(0, ("not-an-address",)))
    assert s.udp("db").rcode() == dns.rcode.SERVFAIL


def test_metrics_once_per_query_by_outcome(serve, upstream):
    metrics = CountingMetrics()
    s = serve(upstreams=[upstream.address], metrics=metrics)
    s.udp("db")
    s.tcp("web")
    s.udp("secret")
    s.udp("example.org")
    s.tcp("example.org")
    s.raw_udp(b"\x12\x34" + bytes(10) + b"\xff")  # a header, then garbage: FORMERR
    wait_for(lambda: len(metrics.calls) == 6, 3, "six queries counted")
    assert sorted(metrics.outcomes()) == sorted(
        ["answered", "answered", "nxdomain", "forwarded", "forwarded", "formerr"])
    assert all(0 <= seconds < 1 for _, seconds in metrics.calls)


def test_several_queries_on_one_tcp_connection_pipelined(serve, upstream):
    s = serve(upstreams=[upstream.address])
    queries = [dns.message.make_query(name, "A") for name in ("db", "example.org", "web", "secret")]
    with socket.create_connection(s.address, timeout=3) as c:
        # All four at once, before reading any answer (RFC 7766 pipelining).
        c.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries)))
        answers = {}
        for _ in queries:
            r, _ = dns.query.receive_tcp(c, expiration=time.time() + 3)
            answers[r.id] = r
    by_query = [answers[q.id] for q in queries]
    assert all(q.is_response(r) for q, r in zip(queries, by_query))
    assert addresses(by_query[0]) == {"10.20.0.5", "10.20.0.6"}
    assert addresses(by_query[1]) == {upstream.marker}
    assert addresses(by_query[2]) == {"10.20.0.7"}
    assert by_query[3].rcode() == dns.rcode.NXDOMAIN


def test_idle_tcp_connection_is_closed(serve):
    s = serve()
    s.resolver.tcp_idle_timeout = 0.3
    with socket.create_connection(s.address, timeout=3) as c:
        start = time.monotonic()
        assert c.recv(1) == b""  # the server closed it
        assert 0.2 < time.monotonic() - start < 2.5


def test_tcp_connections_are_bounded_and_the_rest_still_served(serve):
    s = serve()
    s.resolver.max_tcp_connections = 4
    held = [socket.create_connection(s.address, timeout=3) for _ in range(4)]
    try:
        wait_for(lambda: len(next(iter(s.resolver._listeners.values())).connections) == 4, 3,
                 "four connections held")
        with socket.create_connection(s.address, timeout=3) as extra:
            assert extra.recv(1) == b""  # closed at once, not left hanging
        assert addresses(s.udp("db"))  # UDP is not held up
    finally:
        for c in held:
            c.close()
    wait_for(lambda: _tcp_answers(s), 3, "TCP served again once the connections went")


def _tcp_answers(s) -> bool:
    try:
        return bool(addresses(s.tcp("db", timeout=1)))
    except (OSError, EOFError, dns.exception.Timeout):
        return False


def test_client_that_half_closes_still_gets_its_answer(serve, upstream):
    s = serve(upstreams=[upstream.address])
    q = dns.message.make_query("example.org", "A")
    with socket.create_connection(s.address, timeout=3) as c:
        w = q.to_wire()
        c.sendall(len(w).to_bytes(2, "big") + w)
        c.shutdown(socket.SHUT_WR)
        r, _ = dns.query.receive_tcp(c, expiration=time.time() + 3)
    assert addresses(r) == {upstream.marker}


def test_listeners_added_and_removed_while_running(serve):
    s = serve()
    host = loopback_address()
    udp, tcp = bind_pair(host)
    port = udp.getsockname()[1]
    s.resolver.add_listener(None, udp, tcp)  # the host's own listener: everything forwarded
    assert sorted(s.resolver.tags(), key=str) == [7, None]
    r = dns.query.udp(dns.message.make_query("db", "A"), host, port=port, timeout=3)
    assert r.rcode() == dns.rcode.SERVFAIL  # tag None -> forward; no upstream -> SERVFAIL
    assert s.lookup.calls[-1][0] is None
    s.resolver.remove_listener(None)
    assert udp.fileno() == -1 and tcp.fileno() == -1  # closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=3)
    assert addresses(s.udp("db"))  # the other listener is untouched
    s.resolver.remove_listener("never added")  # harmless


def test_listener_replaced_by_the_same_tag(serve):
    s = serve()
    udp, tcp = bind_pair(loopback_address())
    old = next(iter(s.resolver._listeners.values()))
    s.resolver.add_listener(7, udp, tcp)
    assert old.udp.is_closing()
    assert s.resolver.tags() == [7]
    r = dns.query.udp(dns.message.make_query("db", "A"), udp.getsockname()[0], port=udp.getsockname()[1],
                      timeout=3)
    assert addresses(r)


def test_listeners_handed_over_before_start_are_served_at_start():
    resolver = Resolver(TableLookup(), [])
    host = loopback_address()
    udp, tcp = bind_pair(host)
    resolver.add_listener(3, udp, tcp)
    resolver.start()
    try:
        r = dns.query.tcp(dns.message.make_query("web", "A"), host, port=udp.getsockname()[1], timeout=3)
        assert addresses(r) == {"10.20.0.7"}
    finally:
        resolver.stop()
    assert udp.fileno() == -1 and tcp.fileno() == -1
    with pytest.raises(RuntimeError):
        resolver.add_listener(3, *bind_pair(host))


@pytest.fixture
def netns():
    name = f"pyo-t-dns{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", name, "addr", "add", "169.254.53.53/32", "dev", "lo"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, fn):
    """Run fn in a thread that entered network namespace `name` (setns
    changes only the calling thread), and return what it returned."""
    result = {}

    def run():
        try:
            pr_netns.setns(name, flags=0)
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_listener_in_another_network_namespace(serve, netns):
    s = serve()

    def make():
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("169.254.53.53", 53))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("169.254.53.53", 53))
        tcp.listen(64)
        return udp, tcp

    udp, tcp = in_netns(netns, make)
    s.resolver.add_listener(4096, udp, tcp)

    def ask():
        return (dns.query.udp(dns.message.make_query("db", "A"), "169.254.53.53", timeout=3),
                dns.query.tcp(dns.message.make_query("web", "A"), "169.254.53.53", timeout=3))

    by_udp, by_tcp = in_netns(netns, ask)
    assert addresses(by_udp) == {"10.20.0.5", "10.20.0.6"}
    assert addresses(by_tcp) == {"10.20.0.7"}
    assert (4096, "169.254.53.53", "db", dns.rdatatype.A) in s.lookup.calls
    held = in_netns(netns, lambda: socket.create_connection(("169.254.53.53", 53), timeout=3))
    wait_for(lambda: s.resolver._listeners[4096].connections, 3, "the TCP client accepted")
    s.resolver.remove_listener(4096)
    # On return every socket of the pair is closed, the client's connection too:
    # nothing keeps the namespace alive.
    assert udp.fileno() == -1 and tcp.fileno() == -1
    assert 4096 not in s.resolver._listeners
    with held:
        try:
            assert held.recv(1) == b""
        except ConnectionResetError:
            pass

    def refused():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("169.254.53.53", 53), timeout=3)
        return True

    assert in_netns(netns, refused)


def test_prometheus_series_follow_queries(serve, upstream):
    from plugin.metrics import Metrics

    metrics = Metrics()
    s = serve(upstreams=[upstream.address], metrics=metrics)
    s.udp("db")
    s.tcp("secret")
    s.udp("example.org")

    def sample(name, outcome):
        return metrics.registry.get_sample_value(name, {"outcome": outcome}) or 0

    wait_for(lambda: sample("pyoverlay_dns_queries_total", "forwarded") == 1, 3, "the forward counted")
    assert sample("pyoverlay_dns_queries_total", "answered") == 1
    assert sample("pyoverlay_dns_queries_total", "nxdomain") == 1
    assert sample("pyoverlay_dns_query_duration_seconds_count", "answered") == 1


def test_stop_with_queries_in_flight_closes_everything(upstream_factory, caplog):
    slow = upstream_factory(mode="slow", delay=2.0)
    resolver = Resolver(TableLookup(), [slow.address], timeout=3.0)
    host = loopback_address()
    udp, tcp = bind_pair(host)
    port = udp.getsockname()[1]
    resolver.start()
    resolver.add_listener(9, udp, tcp)
    clients = []
    for _ in range(3):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.sendto(dns.message.make_query("example.org", "A").to_wire(), (host, port))
        clients.append(c)
        t = socket.create_connection((host, port), timeout=3)
        dns.query.send_tcp(t, dns.message.make_query("example.org", "A"))
        clients.append(t)
    idle = socket.create_connection((host, port), timeout=3)  # a TCP client with nothing asked
    clients.append(idle)
    wait_for(lambda: slow.count() == 6, 3, "six forwards in flight")
    start = time.monotonic()
    resolver.stop()
    assert time.monotonic() - start < 2
    assert not resolver._thread.is_alive() and resolver._loop.is_closed()
    assert udp.fileno() == -1 and tcp.fileno() == -1
    assert idle.recv(1) == b""  # its connection was closed
    for c in clients:
        c.close()
    assert not [r for r in caplog.records if "destroyed" in r.getMessage() or r.levelname == "ERROR"]
    assert not resolver._logged, resolver._logged  # no failure in the loop, the clients or the forwards
    resolver.stop()  # twice is harmless


def test_tsig_signed_query_is_refused(serve):
    import dns.tsigkeyring

    s = serve()
    q = dns.message.make_query("db", "A")
    q.use_tsig(dns.tsigkeyring.from_text({"key.": "aGVsbG8gd29ybGQ="}), keyname="key.")
    r = dns.message.from_wire(s.raw_udp(q.to_wire()))
    assert r.id == q.id and r.rcode() == dns.rcode.REFUSED


def test_listeners_churn_from_several_threads_while_queries_flow(serve):
    s = serve()
    errors: list[BaseException] = []
    stop = threading.Event()
    answered = [0]

    def query_loop():
        while not stop.is_set():
            try:
                assert addresses(s.udp("db", timeout=2)) == {"10.20.0.5", "10.20.0.6"}
                answered[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    def churn(k: int):
        try:
            for i in range(15):
                host = loopback_address()
                udp, tcp = bind_pair(host)
                s.resolver.add_listener(("churn", k), udp, tcp)
                r = dns.query.udp(dns.message.make_query("web", "A"), host, port=udp.getsockname()[1], timeout=2)
                assert addresses(r) == {"10.20.0.7"}
                if i % 2:
                    s.resolver.remove_listener(("churn", k))
                    assert udp.fileno() == -1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    querier = threading.Thread(target=query_loop)
    querier.start()
    workers = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    stop.set()
    querier.join(5)
    assert not errors, errors
    assert answered[0] > 0
    # The last round of each worker (i = 14) left its listener in place.
    assert sorted(s.resolver.tags(), key=str) == sorted([7] + [("churn", k) for k in range(4)], key=str)


def test_stop_before_start_closes_the_handed_over_sockets():
    resolver = Resolver(TableLookup(), [("127.0.0.1", 53), ("fe80::1%no-such-if9", 53)])
    assert [(u.host, u.port) for u in resolver.upstreams] == [("127.0.0.1", 53)]  # the unusable one left out
    udp, tcp = bind_pair(loopback_address())
    resolver.add_listener(1, udp, tcp)
    assert resolver.tags() == [1]
    resolver.stop()
    assert udp.fileno() == -1 and tcp.fileno() == -1
    assert resolver._loop.is_closed()
    with pytest.raises(RuntimeError):
        resolver.start()
