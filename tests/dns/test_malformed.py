"""Malformed and unusual input, over UDP and TCP: FORMERR when the header can
be read (the same ID back), dropped when it cannot or when it is a response,
NOTIMP for other opcodes, REFUSED for zone transfers; and the resolver keeps
serving through all of it."""

from __future__ import annotations

import socket
import struct
import time

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.name
import pytest

from tests.dns.conftest import CountingMetrics
from tests.dns.test_server import addresses
from tests.hosts import wait_for

ID = 0xBEEF


def header(qdcount=1, flags=0x0100, an=0, ns=0, ar=0, id=ID) -> bytes:
    return struct.pack("!HHHHHH", id, flags, qdcount, an, ns, ar)


def qname(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


A_IN = struct.pack("!HH", 1, 1)
GOOD = header() + qname(b"db") + A_IN

# (what, bytes, expected rcode or None for "no answer at all")
CASES = [
    ("empty", b"", None),
    ("one byte", b"\x01", None),
    ("eleven bytes", GOOD[:11], None),
    ("header, question missing", header(), dns.rcode.FORMERR),
    ("question cut in the name", GOOD[:15], dns.rcode.FORMERR),
    ("question cut before the class", GOOD[:-2], dns.rcode.FORMERR),
    ("compression pointer to itself", header() + b"\xc0\x0c" + A_IN, dns.rcode.FORMERR),
    ("compression loop of two", header() + b"\x01a\xc0\x0e" + b"\xc0\x0c" + A_IN, dns.rcode.FORMERR),
    ("pointer past the end", header() + b"\xc0\xff" + A_IN, dns.rcode.FORMERR),
    ("name over 255 bytes", header() + qname(*[b"a" * 63] * 5) + A_IN, dns.rcode.FORMERR),
    ("label over 63 bytes", header() + b"\x40" + b"a" * 64 + b"\x00" + A_IN, dns.rcode.FORMERR),
    ("extended label type", header() + b"\x41\x02ab\x00" + A_IN, dns.rcode.FORMERR),
    ("no question", header(qdcount=0), dns.rcode.FORMERR),
    ("two questions", header(qdcount=2) + qname(b"db") + A_IN + qname(b"web") + A_IN, dns.rcode.FORMERR),
    ("65535 questions claimed", header(qdcount=65535) + qname(b"db") + A_IN, dns.rcode.FORMERR),
    ("answer count with no answer", header(an=1) + qname(b"db") + A_IN, dns.rcode.FORMERR),
    ("trailing junk", GOOD + b"\x00junk", dns.rcode.FORMERR),
    ("random garbage", header() + bytes(range(200, 256)) * 3, dns.rcode.FORMERR),
    ("OPT as the question type", header() + qname(b"db") + struct.pack("!HH", 41, 1), dns.rcode.FORMERR),
    ("two OPT records", header(ar=2) + qname(b"db") + A_IN + (b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)) * 2,
     dns.rcode.FORMERR),
    ("EDNS version 1", header(ar=1) + qname(b"db") + A_IN + b"\x00" + struct.pack("!HHIH", 41, 1232, 0x00010000, 0),
     dns.rcode.BADVERS),
    ("AXFR", header() + qname(b"db") + struct.pack("!HH", 252, 1), dns.rcode.REFUSED),
    ("IXFR", header() + qname(b"db") + struct.pack("!HH", 251, 1), dns.rcode.REFUSED),
    ("a response (QR set)", header(flags=0x8180) + qname(b"db") + A_IN, None),
    ("a response with garbage", header(flags=0x8000) + b"\xff" * 40, None),
    ("IQUERY", header(flags=1 << 11) + qname(b"db") + A_IN, dns.rcode.NOTIMP),
    ("STATUS", header(flags=2 << 11) + qname(b"db") + A_IN, dns.rcode.NOTIMP),
    ("NOTIFY", header(flags=4 << 11) + qname(b"db") + A_IN, dns.rcode.NOTIMP),
    ("UPDATE", header(flags=5 << 11, qdcount=1) + qname(b"db") + struct.pack("!HH", 6, 1), dns.rcode.NOTIMP),
    ("unassigned opcode 15 with garbage", header(flags=15 << 11) + b"\xff" * 9, dns.rcode.NOTIMP),
]


def check(reply: bytes | None, expected, sent: bytes):
    if expected is None:
        assert reply is None, f"expected no answer, got {reply!r}"
        return
    assert reply is not None, "no answer"
    r = dns.message.from_wire(reply)  # every reply parses
    assert r.id == ID and r.flags & dns.flags.QR
    assert r.rcode() == expected, dns.rcode.to_text(r.rcode())
    assert r.opcode() == dns.opcode.from_flags(struct.unpack("!H", sent[2:4])[0])
    assert not r.answer


@pytest.mark.parametrize("what, data, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_over_udp(serve, what, data, expected):
    s = serve()
    check(s.raw_udp(data, timeout=0.3 if expected is None else 2.0), expected, data)
    assert addresses(s.udp("db")) == {"10.20.0.5", "10.20.0.6"}  # still serving


@pytest.mark.parametrize("what, data, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_over_tcp_then_a_good_query_on_the_same_connection(serve, what, data, expected):
    s = serve()
    with socket.create_connection(s.address, timeout=2) as c:
        c.sendall(len(data).to_bytes(2, "big") + data)
        if expected is not None:
            r, _ = dns.query.receive_tcp(c, expiration=time.time() + 2)
            check(r.to_wire(), expected, data)
        q = dns.message.make_query("web", "A")
        dns.query.send_tcp(c, q)
        r, _ = dns.query.receive_tcp(c, expiration=time.time() + 2)
        # Dropped input leaves nothing in between: the next thing on the wire is this answer.
        assert q.is_response(r) and addresses(r) == {"10.20.0.7"}


def test_outcomes_of_malformed_input_are_counted(serve):
    metrics = CountingMetrics()
    s = serve(metrics=metrics)
    by_name = {what: (data, expected) for what, data, expected in CASES}
    for what in ("question cut in the name", "AXFR", "NOTIFY", "a response (QR set)", "empty"):
        s.raw_udp(by_name[what][0], timeout=0.3 if by_name[what][1] is None else 2.0)
    wait_for(lambda: len(metrics.calls) >= 3, 2, "three outcomes")
    time.sleep(0.1)  # and no more than three: dropped input is not a query
    assert sorted(metrics.outcomes()) == ["formerr", "refused", "refused"]


@pytest.mark.parametrize("rdclass", ["CH", "HS", "CLASS42", "ANY"])
def test_other_classes_are_forwarded(serve, upstream, rdclass):
    s = serve(upstreams=[upstream.address])
    q = dns.message.make_query("version.bind", "TXT", rdclass=rdclass)
    r = dns.query.udp(q, s.host, port=s.port, timeout=3)
    assert q.is_response(r)
    assert upstream.count() == 1
    assert not any(call[2] == "version.bind" for call in s.lookup.calls)  # not a cluster question


def test_unknown_type_of_an_outside_name_is_forwarded(serve, upstream):
    s = serve(upstreams=[upstream.address])
    r = s.udp("example.org", "TYPE65280")
    assert r.rcode() == dns.rcode.NOERROR
    assert upstream.queries[-1][1] == "example.org"


def test_escaped_and_odd_names_reach_the_lookup_lower_case(serve):
    s = serve()
    s.udp(dns.name.from_text(r"We\.b\032x.DB"))
    assert s.lookup.calls[-1][2] == r"we\.b\032x.db"
    s.udp(".", "NS")
    assert s.lookup.calls[-1][2] == ""


def test_zero_length_and_short_frames_on_tcp(serve):
    s = serve()
    with socket.create_connection(s.address, timeout=2) as c:
        c.sendall(b"\x00\x00")  # an empty message: dropped
        q = dns.message.make_query("db", "A")
        dns.query.send_tcp(c, q)
        r, _ = dns.query.receive_tcp(c, expiration=time.time() + 2)
        assert q.is_response(r)
    with socket.create_connection(s.address, timeout=2) as c:
        c.sendall(b"\xff\xff" + b"x" * 100)  # promises 65535 bytes, then goes
    with socket.create_connection(s.address, timeout=2) as c:
        c.sendall(b"\x00")  # half a length
    assert addresses(s.tcp("db"))
    assert addresses(s.udp("db"))
