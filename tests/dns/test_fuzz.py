"""Property-based fuzzing of the resolver over its real sockets (hypothesis).

Random bytes and mutated valid queries (bytes flipped, cut, inserted, header
counts and flags rewritten) go to a running resolver with a real upstream,
over UDP and over TCP. Each example is followed by a good query on the same
socket; for every example:

- every reply that comes back parses with dnspython and carries the ID sent;
- the good query is answered (the resolver still serves);
- nothing reached the resolver's last-resort handlers (an exception the
  code did not expect while reading, answering or forwarding).

Inputs follow from the suite's one seed, PYOVERLAY_TEST_SEED (tests/seed.py:
fixed in CI, fresh in a developer's run, printed at the start, replayed by
setting it). PYO_FUZZ_EXAMPLES scales the counts, as for tests/test_fuzz.py
(default 1: about 1,200 inputs in 15 s).
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time

import dns.message
import dns.name
import dns.query
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from tests.seed import SEED, announce
from tests.dns.conftest import CountingMetrics, Served, TableLookup, UpstreamServer

SCALE = float(os.environ.get("PYO_FUZZ_EXAMPLES", "1"))

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(n: int):
    def apply(test):
        test = settings(FUZZ, max_examples=max(10, int(n * SCALE)))(test)
        return seed(SEED)(test)
    return apply


# Internal failures the resolver logs from its catch-alls: none may happen.
BUG_KINDS = {"udp", "tcp", "loop", "forward", "answer", "metrics"}

# -- strategies ----------------------------------------------------------------

labels = st.one_of(
    st.sampled_from([b"db", b"web", b"DB", b"net1", b"in-addr", b"arpa", b"5", b"0", b"20", b"10",
                     b"example", b"org", b"big", b"test", b"secret", b"nx"]),
    st.binary(min_size=1, max_size=63),
)
rdtypes = st.one_of(st.sampled_from(["A", "AAAA", "PTR", "TXT", "ANY", "MX", "SRV", "CNAME", "NS"]),
                    st.integers(1, 65535).filter(lambda t: not dns.rdatatype.is_metatype(t)))
rdclasses = st.one_of(st.just(1), st.integers(0, 65535))


@st.composite
def queries(draw) -> bytes:
    try:
        name = dns.name.Name(draw(st.lists(labels, min_size=0, max_size=6)) + [b""])
    except dns.name.NameTooLong:
        assume(False)
    kw = {}
    if draw(st.booleans()):
        kw = {"use_edns": 0, "payload": draw(st.integers(0, 65535)),
              "want_dnssec": draw(st.booleans())}
    q = dns.message.make_query(name, draw(rdtypes), rdclass=draw(rdclasses), **kw)
    q.flags |= draw(st.integers(0, 0xFFFF)) & 0x07B0  # AA TC RD RA Z AD CD, never QR/opcode
    q.id = draw(st.integers(0, 0xFFFF))
    return q.to_wire()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(queries()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "count", "flags"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "count" and len(data) >= 12:
            field = draw(st.integers(0, 3))
            struct.pack_into("!H", data, 4 + 2 * field, draw(st.sampled_from([0, 1, 2, 255, 65535])))
        elif kind == "flags" and len(data) >= 4:
            struct.pack_into("!H", data, 2, draw(st.integers(0, 0xFFFF)))
    return bytes(data)


inputs = st.one_of(st.binary(max_size=600), mutated(), mutated(), queries())

# -- the resolver under test ---------------------------------------------------


@pytest.fixture(scope="module")
def served():
    announce("tests/dns/test_fuzz.py")
    upstream = UpstreamServer("192.0.2.1")
    metrics = CountingMetrics()
    s = Served(TableLookup(), [upstream.address], metrics=metrics, timeout=0.5)
    yield s
    s.close()
    print("dns fuzz outcomes:", dict(sorted(collections.Counter(metrics.outcomes()).items())))
    upstream.close()
    assert not BUG_KINDS & {kind[0] for kind in s.resolver._logged}, s.resolver._logged


def good_query() -> dns.message.Message:
    return dns.message.make_query("db", "A")


def check_reply(reply: bytes, sent: bytes) -> None:
    r = dns.message.from_wire(reply)  # raises if the reply does not parse
    if len(sent) >= 2:
        assert r.id == struct.unpack("!H", sent[:2])[0]


def check_clean(s: Served) -> None:
    assert not BUG_KINDS & {kind[0] for kind in s.resolver._logged}, s.resolver._logged
    assert s.resolver._thread.is_alive()


@fuzz(700)
@given(data=inputs)
def test_udp(served, data):
    good = good_query()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.connect(served.address)
        c.settimeout(3)
        c.send(data)
        c.send(good.to_wire())
        while True:  # replies to the input (if any) come first or not at all; forwarded ones may trail
            reply = c.recv(65535)
            r = dns.message.from_wire(reply)
            if good.is_response(r):
                break
            check_reply(reply, data)
        c.settimeout(0.02)
        try:
            check_reply(c.recv(65535), data)  # a forwarded input's answer, arriving after
        except (TimeoutError, socket.timeout):
            pass
    check_clean(served)


@fuzz(500)
@given(data=inputs, split=st.booleans())
def test_tcp(served, data, split):
    good = good_query()
    with socket.create_connection(served.address, timeout=3) as c:
        frame = len(data).to_bytes(2, "big") + data
        if split:  # the frame in pieces, as a slow client sends it
            for i in range(0, len(frame), 7):
                c.sendall(frame[i:i + 7])
        else:
            c.sendall(frame)
        dns.query.send_tcp(c, good)
        deadline = time.time() + 3
        while True:
            reply, _ = dns.query.receive_tcp(c, expiration=deadline)
            if good.is_response(reply):
                break
            check_reply(reply.to_wire(), data)
    check_clean(served)
