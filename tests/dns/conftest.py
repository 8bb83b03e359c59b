"""The cluster resolver on real sockets: loopback listeners (127.53.x.y, an
ephemeral port shared by UDP and TCP), a real DNS server as its upstream, and
a lookup that stands in for the names table."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Callable, Optional

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from driver.dns.server import Answer, Resolver

_addresses = itertools.count(1)


def loopback_address() -> str:
    """A loopback address no other test of this run uses (127.0.0.0/8 is all
    on lo), so a leftover listener cannot answer for another test."""
    n = next(_addresses) + (os.getpid() % 200) * 256
    return f"127.53.{(n >> 8) % 256}.{n % 254 + 1}"


def bind_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on one port of `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(64)
        return udp, tcp
    raise RuntimeError(f"no port free on {host} for both UDP and TCP")


# -- a real upstream server ----------------------------------------------------

class UpstreamServer:
    """A small DNS server on a loopback address, UDP and TCP, that answers
    like a recursive server would: `<anything>` A -> its own marker address
    (so a test sees which upstream answered); big.test TXT -> about 3 kB
    (truncated with TC over UDP, whole over TCP); nx.test -> NXDOMAIN.
    `mode` makes it misbehave: "servfail", "refused", "silent" (no answer),
    "hangup" (TCP: closes the connection unanswered; UDP: silent),
    "slow" (answers after `delay`), "spoof" (first a forged reply with the
    wrong ID and one from another port, then the real one after `delay`)."""

    def __init__(self, marker: str, mode: str = "answer", delay: float = 0.0, host: Optional[str] = None):
        self.marker = marker
        self.mode = mode
        self.delay = delay
        self.host = host or loopback_address()
        self.udp, self.tcp = bind_pair(self.host)
        self.port = self.udp.getsockname()[1]
        self.queries: list[tuple[str, str, int]] = []  # (transport, qname, id)
        self.sources: list[tuple[str, int]] = []         # where each UDP query came from
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def close(self) -> None:
        self._stop.set()
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def count(self, transport: Optional[str] = None) -> int:
        return sum(1 for q in self.queries if transport in (None, q[0]))

    def respond(self, query: dns.message.Message, tcp: bool) -> Optional[dns.message.Message]:
        if self.mode in ("silent", "hangup"):
            return None
        r = dns.message.make_response(query, recursion_available=True)
        if self.mode == "servfail":
            r.set_rcode(dns.rcode.SERVFAIL)
            return r
        if self.mode == "refused":
            r.set_rcode(dns.rcode.REFUSED)
            return r
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        if name == "nx.test":
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif name == "big.test" and q.rdtype == dns.rdatatype.TXT:
            r.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", "TXT",
                                                     [f'"{i:03d}-' + "x" * 90 + '"' for i in range(30)]))
        elif q.rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", self.marker))
        return r

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(65535)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001
                continue
            self.queries.append(("udp", query.question[0].name.to_text(True).lower(), query.id))
            self.sources.append(addr)
            threading.Thread(target=self._answer_udp, args=(query, addr), daemon=True).start()

    def _answer_udp(self, query: dns.message.Message, addr) -> None:
        response = self.respond(query, tcp=False)
        if response is None:
            return
        if self.mode == "spoof":
            forged = dns.message.make_response(query)
            forged.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "203.0.113.66"))
            forged.id = (query.id + 1) % 65536
            self.udp.sendto(forged.to_wire(), addr)             # right address, wrong ID
            forged.id = query.id
            other_question = dns.message.make_query("evil.test", "A", id=query.id)
            lure = dns.message.make_response(other_question)
            lure.answer.append(dns.rrset.from_text("evil.test.", 60, "IN", "A", "203.0.113.67"))
            self.udp.sendto(lure.to_wire(), addr)               # right address and ID, other question
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind((self.host, 0))
                other.sendto(forged.to_wire(), addr)            # right ID, another port
        if self.delay:
            time.sleep(self.delay)
        size = query.payload if query.edns >= 0 else 512
        try:
            data = response.to_wire(max_size=size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            data = response.to_wire(max_size=size)
        try:
            self.udp.sendto(data, addr)
        except OSError:
            pass

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            while True:
                try:
                    query, _ = dns.query.receive_tcp(conn, expiration=time.time() + 10)
                except Exception:  # noqa: BLE001 - closed or garbage: done
                    return
                self.queries.append(("tcp", query.question[0].name.to_text(True).lower(), query.id))
                if self.mode == "hangup":
                    return  # closes the connection unanswered
                response = self.respond(query, tcp=True)
                if response is None:
                    continue
                if self.delay:
                    time.sleep(self.delay)
                try:
                    dns.query.send_tcp(conn, response)
                except OSError:
                    return


@pytest.fixture
def upstream_factory():
    made: list[UpstreamServer] = []

    def make(marker: str = "192.0.2.1", mode: str = "answer", delay: float = 0.0,
             host: Optional[str] = None) -> UpstreamServer:
        server = UpstreamServer(marker, mode, delay, host)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def upstream(upstream_factory):
    return upstream_factory()


# -- the names a test lookup knows ---------------------------------------------

CLUSTER = {"db": ["10.20.0.5", "10.20.0.6"], "web": ["10.20.0.7"], "db.net1": ["10.20.0.5", "10.20.0.6"]}
PTRS = {"5.0.20.10.in-addr.arpa": "db.net1"}
ELSEWHERE = {"secret"}  # a cluster name on an overlay the querier is not on


class TableLookup:
    """Answers as the names table does: cluster names (A, NODATA for other
    types), PTR for their addresses, NXDOMAIN for names of other overlays,
    None for the rest; records what it was asked. `fail` makes it raise."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail: Optional[Exception] = None

    def __call__(self, tag, source, qname, qtype):
        self.calls.append((tag, source, qname, qtype))
        if self.fail is not None:
            raise self.fail
        if tag is None:
            return None
        if qname in CLUSTER:
            if qtype == dns.rdatatype.A:
                return Answer(dns.rcode.NOERROR, tuple(CLUSTER[qname]))
            return Answer(dns.rcode.NOERROR)
        if qname in PTRS:
            if qtype == dns.rdatatype.PTR:
                return Answer(dns.rcode.NOERROR, (PTRS[qname],))
            return Answer(dns.rcode.NOERROR)
        if qname in ELSEWHERE:
            return Answer(dns.rcode.NXDOMAIN)
        return None


class Served:
    """A started resolver with one loopback listener pair (tag 7) and the
    helpers to ask it."""

    def __init__(self, lookup: Callable, upstreams, metrics=None, timeout: float = 0.5, tag=7):
        self.lookup = lookup
        self.resolver = Resolver(lookup, upstreams, metrics=metrics, timeout=timeout)
        self.host = loopback_address()
        udp, tcp = bind_pair(self.host)
        self.port = udp.getsockname()[1]
        self.resolver.start()
        self.resolver.add_listener(tag, udp, tcp)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def udp(self, name: str, rdtype="A", timeout: float = 3.0, **kw) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        return dns.query.udp(q, self.host, port=self.port, timeout=timeout, ignore_unexpected=False)

    def tcp(self, name: str, rdtype="A", timeout: float = 3.0, **kw) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        return dns.query.tcp(q, self.host, port=self.port, timeout=timeout)

    def raw_udp(self, data: bytes, timeout: float = 1.0) -> Optional[bytes]:
        """Send bytes; the reply's bytes, or None when nothing came back in time."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect(self.address)
            s.send(data)
            try:
                return s.recv(65535)
            except (TimeoutError, socket.timeout):
                return None

    def raw_tcp(self, data: bytes, timeout: float = 1.0) -> Optional[bytes]:
        """One length-framed message over a new connection; the reply or None."""
        with socket.create_connection(self.address, timeout=timeout) as s:
            s.sendall(len(data).to_bytes(2, "big") + data)
            try:
                head = _recv_exactly(s, 2)
                return _recv_exactly(s, int.from_bytes(head, "big")) if head else None
            except (TimeoutError, socket.timeout, ConnectionResetError):
                return None

    def close(self) -> None:
        self.resolver.stop()


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


@pytest.fixture
def serve():
    made: list[Served] = []

    def make(lookup=None, upstreams=(), **kw) -> Served:
        s = Served(lookup if lookup is not None else TableLookup(), list(upstreams), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class CountingMetrics:
    """The duck-typed metrics hook, recording each call."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def dns_query(self, outcome: str, seconds: float) -> None:
        with self._lock:
            self.calls.append((outcome, seconds))

    def outcomes(self) -> list[str]:
        with self._lock:
            return [o for o, _ in self.calls]
