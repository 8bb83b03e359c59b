"""Forwarding to real upstream servers (tests/dns/conftest.py UpstreamServer):
transports, truncation, failover, timeouts, forged replies."""

from __future__ import annotations

import socket
import threading
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.dns.conftest import CountingMetrics, loopback_address
from tests.dns.test_server import addresses
from tests.hosts import wait_for


def test_forwarded_over_udp_relayed_unchanged(serve, upstream):
    s = serve(upstreams=[upstream.address])
    q = dns.message.make_query("example.org", "A", use_edns=0, payload=1232)
    r = dns.query.udp(q, s.host, port=s.port, timeout=3)
    assert addresses(r) == {upstream.marker}
    assert r.id == q.id and not r.flags & dns.flags.AA
    assert upstream.queries == [("udp", "example.org", q.id)]  # the client's own ID went upstream
    # The upstream's answer bytes are what the client got: ask it directly and compare.
    direct = dns.query.udp(q, upstream.host, port=upstream.port, timeout=3)
    assert r.to_wire() == direct.to_wire()


def test_forwarded_over_tcp_goes_over_tcp(serve, upstream):
    s = serve(upstreams=[upstream.address])
    assert addresses(s.tcp("example.org")) == {upstream.marker}
    assert [t for t, _, _ in upstream.queries] == ["tcp"]


def test_nxdomain_from_upstream_relayed(serve, upstream_factory):
    first = upstream_factory("192.0.2.1")
    second = upstream_factory("192.0.2.2")
    s = serve(upstreams=[first.address, second.address])
    assert s.udp("nx.test").rcode() == dns.rcode.NXDOMAIN
    assert second.count() == 0  # an answer is an answer: no failover on NXDOMAIN


def test_truncated_answer_relayed_then_whole_over_tcp(serve, upstream):
    s = serve(upstreams=[upstream.address])
    r = s.udp("big.test", "TXT")  # no EDNS: at most 512 bytes over UDP
    assert r.flags & dns.flags.TC and r.rcode() == dns.rcode.NOERROR
    whole = s.tcp("big.test", "TXT")
    assert not whole.flags & dns.flags.TC
    assert len(whole.to_wire()) > 3000
    assert sum(len(rrset) for rrset in whole.answer) == 30
    assert [t for t, _, _ in upstream.queries] == ["udp", "tcp"]


@pytest.mark.parametrize("mode", ["silent", "servfail", "refused"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_next_upstream_on_timeout_servfail_refused(serve, upstream_factory, mode, transport):
    bad = upstream_factory("192.0.2.1", mode=mode)
    good = upstream_factory("192.0.2.2")
    s = serve(upstreams=[bad.address, good.address], timeout=0.3)
    start = time.monotonic()
    r = getattr(s, transport)("example.org")
    assert addresses(r) == {"192.0.2.2"}
    assert bad.count(transport) == 1 and good.count(transport) == 1
    if mode != "silent":
        assert time.monotonic() - start < 0.3  # an error answer moves on at once


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_all_upstreams_down_is_servfail_quickly(serve, transport):
    # Nothing listens on these: UDP gets ICMP port unreachable, TCP a refusal.
    dead = [(loopback_address(), 9), (loopback_address(), 9)]
    metrics = CountingMetrics()
    s = serve(upstreams=dead, timeout=2.0, metrics=metrics)
    start = time.monotonic()
    r = getattr(s, transport)("example.org")
    assert r.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - start < 0.5
    wait_for(lambda: metrics.outcomes() == ["servfail"], 2, "a servfail counted")


def test_all_upstreams_silent_is_servfail_after_their_timeouts(serve, upstream_factory):
    silent = [upstream_factory(mode="silent"), upstream_factory(mode="silent")]
    s = serve(upstreams=[u.address for u in silent], timeout=0.3)
    start = time.monotonic()
    assert s.udp("example.org").rcode() == dns.rcode.SERVFAIL
    assert 0.55 < time.monotonic() - start < 1.5


def test_no_upstream_is_servfail(serve):
    s = serve(upstreams=[])
    assert s.udp("example.org").rcode() == dns.rcode.SERVFAIL
    assert s.tcp("example.org").rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_slow_upstream_does_not_delay_cluster_answers(serve, upstream_factory, transport):
    slow = upstream_factory("192.0.2.9", mode="slow", delay=1.0)
    s = serve(upstreams=[slow.address], timeout=3.0)
    forwarded = {}

    def ask_slow():
        forwarded["r"] = getattr(s, transport)("slow.example", timeout=5)

    threads = [threading.Thread(target=ask_slow) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: slow.count() == 5, 3, "five queries at the slow upstream")
    start = time.monotonic()
    for _ in range(20):
        assert addresses(getattr(s, transport)("db")) == {"10.20.0.5", "10.20.0.6"}
    assert time.monotonic() - start < 0.5  # 20 answers while five forwards wait a second each
    for t in threads:
        t.join(5)
    assert addresses(forwarded["r"]) == {"192.0.2.9"}


def test_forged_replies_are_ignored(serve, upstream_factory):
    # The upstream first sends a reply with the wrong ID, one for another
    # question, and one with the right ID from another port; then the real one.
    upstream = upstream_factory("192.0.2.7", mode="spoof", delay=0.2)
    s = serve(upstreams=[upstream.address], timeout=2.0)
    r = s.udp("example.org")
    assert addresses(r) == {"192.0.2.7"}


def test_late_reply_of_a_timed_out_upstream_is_not_relayed(serve, upstream_factory):
    late = upstream_factory("203.0.113.5", mode="slow", delay=0.5)
    good = upstream_factory("192.0.2.2", mode="slow", delay=0.1)
    s = serve(upstreams=[late.address, good.address], timeout=0.3)
    # late answers at 0.5 s, after the resolver moved on at 0.3 s to good (0.4 s).
    q = dns.message.make_query("example.org", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(3)
        c.sendto(q.to_wire(), s.address)
        r = dns.message.from_wire(c.recv(65535))
        c.settimeout(0.5)
        with pytest.raises((TimeoutError, socket.timeout)):
            c.recv(65535)  # exactly one answer
    assert addresses(r) == {"192.0.2.2"}


def test_forwarded_queries_beyond_the_bound_are_servfail_at_once(serve, upstream_factory):
    slow = upstream_factory(mode="slow", delay=1.0)
    s = serve(upstreams=[slow.address], timeout=3.0)
    s.resolver.max_forwards = 2
    results = []
    threads = [threading.Thread(target=lambda: results.append(s.udp("example.org", timeout=5)))
               for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: slow.count() == 2, 3, "two forwards in flight")
    start = time.monotonic()
    assert s.udp("example.org").rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - start < 0.5
    assert addresses(s.udp("db"))  # cluster names are not bounded
    for t in threads:
        t.join(5)
    assert [addresses(r) for r in results] == [{slow.marker}] * 2


def test_each_forward_has_its_own_source_port(serve, upstream):
    s = serve(upstreams=[upstream.address])
    for i in range(20):
        assert addresses(s.udp(f"n{i}.example.org")) == {upstream.marker}
    ports = {port for _, port in upstream.sources}
    assert len(ports) >= 18  # random ephemeral ports: a forger must guess port and ID


def test_ipv6_listener_and_upstream(upstream_factory):
    from driver.dns.server import Resolver
    from tests.dns.conftest import TableLookup, bind_pair

    upstream = upstream_factory("192.0.2.6", host="::1")
    resolver = Resolver(TableLookup(), [("::1", upstream.port)], timeout=1.0)
    udp, tcp = bind_pair("::1")
    port = udp.getsockname()[1]
    resolver.start()
    try:
        resolver.add_listener(5, udp, tcp)
        for ask in (dns.query.udp, dns.query.tcp):
            assert addresses(ask(dns.message.make_query("example.org", "A"), "::1", port=port, timeout=3)) == {
                "192.0.2.6"}
            assert addresses(ask(dns.message.make_query("db", "A"), "::1", port=port, timeout=3)) == {
                "10.20.0.5", "10.20.0.6"}
        assert resolver._lookup.calls[-1][1] == "::1"
    finally:
        resolver.stop()


def test_next_upstream_when_one_hangs_up_on_tcp(serve, upstream_factory):
    rude = upstream_factory("192.0.2.1", mode="hangup")
    good = upstream_factory("192.0.2.2")
    s = serve(upstreams=[rude.address, good.address], timeout=2.0)
    start = time.monotonic()
    assert addresses(s.tcp("example.org")) == {"192.0.2.2"}
    assert time.monotonic() - start < 1  # at once, not after the timeout
    assert rude.count("tcp") == 1
