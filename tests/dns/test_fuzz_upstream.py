"""Fuzzing the other side: an upstream that answers forwarded queries with
random and mutated replies (hypothesis), over UDP and TCP. Whatever it sends:

- the client gets exactly one answer: the upstream's bytes unchanged when
  they answer its query (same ID and question), else the resolver's SERVFAIL
  once the upstream's time is up;
- the resolver logs no internal failure and answers a cluster name after.

Seeds and counts as in tests/dns/test_fuzz.py (PYOVERLAY_TEST_SEED, CI,
PYO_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from typing import Callable, Optional

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.dns.conftest import CountingMetrics, Served, TableLookup, bind_pair, loopback_address
from tests.dns.test_fuzz import BUG_KINDS, fuzz
from tests.seed import announce
from tests.dns.test_server import addresses

TIMEOUT = 0.1  # the resolver's wait for this upstream


class ScriptedUpstream:
    """Answers each query with script(query bytes) -> reply bytes or None."""

    def __init__(self):
        self.host = loopback_address()
        self.udp, self.tcp = bind_pair(self.host)
        self.port = self.udp.getsockname()[1]
        self.script: Callable[[bytes], Optional[bytes]] = lambda q: None
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def _serve_udp(self) -> None:
        while True:
            try:
                data, addr = self.udp.recvfrom(65535)
            except OSError:
                return
            if not data:
                continue
            reply = self.script(data)
            if reply is not None:
                self.udp.sendto(reply, addr)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    size = int.from_bytes(conn.recv(2), "big")
                    data = conn.recv(size)
                    reply = self.script(data)
                    if reply is not None:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
                        time.sleep(0.01)
                except OSError:
                    pass

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture(scope="module")
def rig():
    announce("tests/dns/test_fuzz_upstream.py")
    upstream = ScriptedUpstream()
    metrics = CountingMetrics()
    served = Served(TableLookup(), [(upstream.host, upstream.port)], metrics=metrics, timeout=TIMEOUT)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(3)
    client.connect(served.address)
    yield served, upstream, client
    client.close()
    served.close()
    print("dns upstream fuzz outcomes:", dict(sorted(collections.Counter(metrics.outcomes()).items())))
    upstream.close()
    assert not BUG_KINDS & {kind[0] for kind in served.resolver._logged}, served.resolver._logged


def proper_reply(query: bytes) -> bytes:
    q = dns.message.from_wire(query)
    r = dns.message.make_response(q, recursion_available=True)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.1"))
    return r.to_wire()


@st.composite
def replies(draw) -> Callable[[bytes], Optional[bytes]]:
    """A way to answer: nothing, garbage, or the proper reply mutated."""
    kind = draw(st.sampled_from(["none", "garbage", "mutated", "mutated", "proper"]))
    if kind == "none":
        return lambda q: None
    if kind == "garbage":
        junk = draw(st.binary(max_size=300))
        keep_id = draw(st.booleans())
        return lambda q: (q[:2] + junk) if keep_id else junk
    edits = draw(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "count"]),
                                    st.integers(2, 200), st.integers(1, 255)), max_size=3))

    def answer(q: bytes) -> bytes:
        data = bytearray(proper_reply(q))
        for kind, at, value in edits:
            at = min(at, len(data) - 1)
            if kind == "flip":
                data[at] ^= value
            elif kind == "cut":
                del data[at:]
            elif kind == "insert":
                data[at:at] = bytes([value]) * (value % 7 + 1)
            elif kind == "count" and len(data) >= 12:
                struct.pack_into("!H", data, 4 + 2 * (value % 4), value)
        return bytes(data)
    return answer


def expect_one_of(reply: bytes, query: dns.message.Message, upstream_said: Optional[bytes]) -> None:
    if reply == upstream_said:
        return  # relayed unchanged
    r = dns.message.from_wire(reply)
    assert query.is_response(r) and r.rcode() == dns.rcode.SERVFAIL, (reply, upstream_said)


def recording(upstream, script) -> list[bytes]:
    """Serve script's replies from upstream; the list fills with what it said."""
    said: list[bytes] = []

    def record(q: bytes):
        reply = script(q)
        if reply is not None:
            said.append(reply)
        return reply

    upstream.script = record
    return said


@fuzz(120)
@given(script=replies(), qid=st.integers(0, 0xFFFF))
def test_upstream_replies_over_udp(rig, script, qid):
    served, upstream, client = rig
    said = recording(upstream, script)
    q = dns.message.make_query("example.org", "A", id=qid)
    # One client socket for every example: a second answer to an earlier
    # query would be read here first, and not match.
    client.send(q.to_wire())
    expect_one_of(client.recv(65535), q, said[0] if said else None)
    assert addresses(served.udp("db")) == {"10.20.0.5", "10.20.0.6"}


@fuzz(80)
@given(script=replies())
def test_upstream_replies_over_tcp(rig, script):
    served, upstream, _ = rig
    said = recording(upstream, script)
    q = dns.message.make_query("example.org", "A")
    with socket.create_connection(served.address, timeout=3) as c:
        w = q.to_wire()
        c.sendall(len(w).to_bytes(2, "big") + w)
        size = int.from_bytes(c.recv(2), "big")
        reply = b""
        while len(reply) < size:
            chunk = c.recv(size - len(reply))
            assert chunk
            reply += chunk
        expect_one_of(reply, q, said[0] if said else None)
    assert addresses(served.tcp("db")) == {"10.20.0.5", "10.20.0.6"}
