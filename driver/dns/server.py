"""The cluster resolver: one thread running an asyncio loop serves every
listener pair (a UDP socket and a listening TCP socket, each tagged with the
overlay's VNI, or None for the host's own), answers cluster names from a
lookup function and forwards everything else upstream.

The sockets are made elsewhere (the kernel layer creates them inside each
overlay namespace) and handed over at any time from any thread; the resolver
only reads and writes them. A cluster answer is built and sent within the
datagram callback, never behind a forwarded query; forwarding runs as its own
task. Whatever arrives, the loop keeps serving: bad input is answered FORMERR
(or dropped when not even the header can be read), a lookup that raises is
answered SERVFAIL, and each kind of failure is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import dns.rcode

from driver.dns import forward as fwd
from driver.dns import wire
from driver.dns.upstreams import parse_upstreams, upstreams_from_resolv_conf  # noqa: F401 (the interface)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    rcode: int                      # dns.rcode.NOERROR or dns.rcode.NXDOMAIN
    records: tuple[str, ...] = ()   # A: dotted IPv4 strings; AAAA: IPv6 ones; PTR: names without trailing dot
    ttl: int = 0


# lookup(tag, source_ip, qname, qtype); qname lower-case without the trailing
# dot, qtype an int (dns.rdatatype.A ...). None: not a cluster name, forward it.
Lookup = Callable[[Optional[int], str, str, int], Optional[Answer]]

OUTCOMES = ("answered", "forwarded", "nxdomain", "refused", "formerr", "servfail")
_RCODE_OUTCOME = {dns.rcode.NXDOMAIN: "nxdomain", dns.rcode.REFUSED: "refused",
                  dns.rcode.SERVFAIL: "servfail", dns.rcode.FORMERR: "formerr"}


@dataclass
class _Listener:
    tag: Optional[int]
    udp: Optional[asyncio.DatagramTransport] = None
    tcp: Optional[asyncio.Server] = None
    connections: set = field(default_factory=set)  # StreamWriters of open TCP clients
    closed: bool = False


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: "Resolver", listener: _Listener):
        self.resolver = resolver
        self.listener = listener
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr) -> None:
        self.resolver._udp_query(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.resolver._once(("udp-error", type(exc).__name__), "dns: listener %r: %s", self.listener.tag, exc)

    @staticmethod
    def closed_of(transport: asyncio.DatagramTransport):
        protocol = transport.get_protocol()
        return protocol.closed if isinstance(protocol, _UdpProtocol) else None

    def send(self, data: bytes, addr) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


class Resolver:
    # Per listener: TCP clients at once (more are closed at accept), queries
    # in flight on one connection, seconds a connection may sit idle.
    max_tcp_connections = 64
    tcp_pipeline = 16
    tcp_idle_timeout = 10.0
    # Forwarded queries in flight over the whole resolver; beyond: SERVFAIL.
    max_forwards = 1024

    def __init__(self, lookup: Lookup, upstreams: Sequence[tuple[str, int]],
                 metrics=None, timeout: float = 2.0):
        self._lookup = lookup
        self.upstreams = []
        for host, port in upstreams:
            try:
                self.upstreams.append(fwd.Upstream.resolve(host, port))
            except (OSError, ValueError) as e:  # e.g. fe80::1%eth9, no such interface
                log.warning("dns: leaving out upstream %s port %s: %s", host, port, e)
        self._metrics = metrics
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._state = "new"                  # new -> running -> stopped
        self._pending: dict = {}             # listeners handed over before start()
        self._listeners: dict[Optional[int], _Listener] = {}
        self._tasks: set[asyncio.Task] = set()    # forwards in flight
        self._clients: set[asyncio.Task] = set()  # TCP connections being served
        self._forwards = 0
        self._closing = False
        self._logged: set = set()

    # -- the interface ---------------------------------------------------------

    # Listener changes hold self._lock until the loop has made them, so a
    # stop() from another thread cannot strand one half done.

    def start(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"resolver already {self._state}")
            self._state = "running"
            pending, self._pending = self._pending, {}
            self._thread = threading.Thread(target=self._run, name="pyoverlay-dns", daemon=True)
            self._thread.start()
            for tag, (udp, tcp) in pending.items():
                self._call(self._attach(tag, udp, tcp))

    def stop(self) -> None:
        with self._lock:
            state, self._state = self._state, "stopped"
            pending, self._pending = self._pending, {}
            for udp, tcp in pending.values():
                udp.close()
                tcp.close()
            if state != "running":
                if state == "new":
                    self._loop.close()
                return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def add_listener(self, tag, udp: socket.socket, tcp: socket.socket) -> None:
        """Serve an already-bound UDP socket and a bound, listening TCP socket
        from now on (when this returns, once started). A tag that is already
        served is replaced. The resolver owns the sockets from here on."""
        if udp.type != socket.SOCK_DGRAM or tcp.type != socket.SOCK_STREAM:
            raise ValueError("add_listener wants a UDP socket and a TCP socket, in that order")
        with self._lock:
            if self._state == "stopped":
                raise RuntimeError("resolver stopped")
            if self._state == "new":
                old = self._pending.pop(tag, None)
                if old:
                    old[0].close()
                    old[1].close()
                self._pending[tag] = (udp, tcp)
                return
            self._call(self._attach(tag, udp, tcp))

    def remove_listener(self, tag) -> None:
        """Stop serving `tag` and close its sockets and TCP connections."""
        with self._lock:
            if self._state == "new":
                old = self._pending.pop(tag, None)
                if old:
                    old[0].close()
                    old[1].close()
                return
            if self._state == "stopped":
                return
            self._call(self._detach_soon(tag))

    def tags(self) -> list:
        """The tags served (for status and tests)."""
        with self._lock:
            if self._state != "running":
                return list(self._pending)
            return self._call(self._tags())

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro):
        if threading.current_thread() is self._thread:
            raise RuntimeError("called from the resolver's own thread (from lookup?)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _tags(self) -> list:
        return list(self._listeners)

    async def _attach(self, tag, udp: socket.socket, tcp: socket.socket) -> None:
        await self._detach_soon(tag)
        listener = _Listener(tag)
        try:
            listener.udp, _ = await self._loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self, listener), sock=udp)
            listener.tcp = await asyncio.start_server(
                lambda r, w: self._tcp_client(listener, r, w), sock=tcp)
        except BaseException:
            if listener.udp is not None:
                listener.udp.close()
            else:
                udp.close()
            tcp.close()
            raise
        self._listeners[tag] = listener
        log.info("dns: serving %s on %s", "the host" if tag is None else f"overlay {tag}",
                 _where(tcp))

    async def _detach_soon(self, tag) -> None:
        """Stop serving `tag`; return once its sockets are closed (asyncio
        closes a transport's socket a loop turn later, and an open socket
        would keep a network namespace alive)."""
        closing = self._detach(tag)
        if closing:
            await asyncio.wait(closing, timeout=2)

    def _detach(self, tag) -> list:
        listener = self._listeners.pop(tag, None)
        if listener is None:
            return []
        listener.closed = True  # a connection accepted but not yet served goes too
        listener.tcp.close()  # closes the listening socket at once
        listener.udp.abort()  # drops unsent answers: the pair is going
        closing = [_UdpProtocol.closed_of(listener.udp)]
        for writer in list(listener.connections):
            writer.transport.abort()
            closing.append(self._loop.create_task(_closed(writer)))
        listener.connections.clear()
        return [c for c in closing if c is not None]

    async def _shutdown(self) -> None:
        self._closing = True
        closing = [c for tag in list(self._listeners) for c in self._detach(tag)]
        if closing:
            await asyncio.wait(closing, timeout=2)
        for task in list(self._tasks):
            task.cancel()
        # TCP clients are not cancelled (Python 3.11's start_server then logs
        # an error): their connections were aborted, so they end by themselves.
        waiting = list(self._tasks) + list(self._clients)
        if waiting:
            await asyncio.wait(waiting, timeout=2)

    def _spawn(self, coro) -> asyncio.Task:
        # Held until done (the loop keeps only weak references), cancelled at stop().
        task = self._loop.create_task(coro)
        self._track(task)
        return task

    def _track(self, task: asyncio.Task, into: Optional[set] = None) -> None:
        into = self._tasks if into is None else into
        into.add(task)
        task.add_done_callback(into.discard)

    def _loop_error(self, loop, context) -> None:
        exc = context.get("exception")
        self._once(("loop", type(exc).__name__ if exc else context.get("message")),
                   "dns: %s%s", context.get("message"), f": {exc!r}" if exc else "")

    def _once(self, kind, fmt: str, *args) -> None:
        """Log a kind of failure the first time only: bad input must not be
        able to flood the log."""
        if kind in self._logged:
            return
        if len(self._logged) < 1000:
            self._logged.add(kind)
        log.warning(fmt + " (logged once)", *args)

    def _count(self, outcome: str, start: float) -> None:
        if self._metrics is None or not outcome:
            return
        try:
            self._metrics.dns_query(outcome, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - metrics must never cost an answer
            self._once(("metrics", type(e).__name__), "dns: metrics: %r", e)

    # -- answering -----------------------------------------------------------

    def _decide(self, data: bytes, tag, source: str, tcp: bool):
        """(response or None, outcome) to send at once, or the Query to forward."""
        query = wire.read_query(data)
        if isinstance(query, wire.Rejected):
            log.debug("dns: from %s: %s", source, query.reason)
            return query.response, query.outcome
        if not wire.qclass_is_internet(query):
            return query  # CHAOS and the like: the upstream's business
        try:
            found = self._lookup(tag, source, query.qname, query.qtype)
        except Exception as e:  # noqa: BLE001 - a broken table must not stop the resolver
            self._once(("lookup", type(e).__name__), "dns: lookup(%r, %r, %r, %d) raised %r; "
                       "answering SERVFAIL", tag, source, query.qname, query.qtype, e)
            return wire.error(query.message, dns.rcode.SERVFAIL), "servfail"
        if found is None:
            return query
        try:
            size = wire.TCP_MAX if tcp else wire.max_udp_size(query.message)
            response = wire.answer(query, found.rcode, tuple(found.records), found.ttl, size)
        except Exception as e:  # noqa: BLE001 - e.g. records that are not addresses
            self._once(("answer", type(e).__name__), "dns: cannot answer %r with %r: %s; "
                       "answering SERVFAIL", query.qname, found, e)
            return wire.error(query.message, dns.rcode.SERVFAIL), "servfail"
        return response, _RCODE_OUTCOME.get(found.rcode, "answered")

    def _can_forward(self) -> bool:
        return bool(self.upstreams) and self._forwards < self.max_forwards

    async def _forward(self, query: wire.Query, tcp: bool) -> tuple[bytes, str]:
        self._forwards += 1
        try:
            reply = await fwd.forward(query.message, query.wire, self.upstreams, tcp, self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            self._once(("forward", type(e).__name__), "dns: forwarding %r: %r", query.qname, e)
            reply = None
        finally:
            self._forwards -= 1
        if reply is None:
            return wire.error(query.message, dns.rcode.SERVFAIL), "servfail"
        return reply, "forwarded"

    def _udp_query(self, proto: _UdpProtocol, data: bytes, addr) -> None:
        start = time.perf_counter()
        try:
            result = self._decide(data, proto.listener.tag, addr[0], tcp=False)
            if isinstance(result, wire.Query):
                if self._can_forward():
                    self._spawn(self._udp_forward(proto, result, addr, start))
                    return
                result = wire.error(result.message, dns.rcode.SERVFAIL), "servfail"
            response, outcome = result
            if response is not None:
                proto.send(response, addr)
            self._count(outcome, start)
        except Exception as e:  # noqa: BLE001 - nothing a datagram holds may stop the loop
            self._once(("udp", type(e).__name__), "dns: query from %s: %r", addr, e)

    async def _udp_forward(self, proto: _UdpProtocol, query: wire.Query, addr, start: float) -> None:
        response, outcome = await self._forward(query, tcp=False)
        proto.send(response, addr)
        self._count(outcome, start)

    async def _tcp_client(self, listener: _Listener, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if listener.closed or self._closing:
            writer.transport.abort()
            return
        if len(listener.connections) >= self.max_tcp_connections:
            self._once(("tcp-full", listener.tag), "dns: listener %r: %d TCP clients already, "
                       "closing new ones", listener.tag, self.max_tcp_connections)
            writer.transport.abort()
            return
        listener.connections.add(writer)
        self._track(asyncio.current_task(), self._clients)
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else ""
        slots = asyncio.Semaphore(self.tcp_pipeline)
        pending: set[asyncio.Task] = set()
        try:
            while True:
                await slots.acquire()
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        await writer.drain()  # a client that does not read holds no more answers
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    break
                start = time.perf_counter()
                result = self._decide(data, listener.tag, source, tcp=True)
                if isinstance(result, wire.Query) and self._can_forward():
                    task = self._spawn(self._tcp_forward(writer, result, start))
                    pending.add(task)
                    task.add_done_callback(lambda t: (pending.discard(t), slots.release()))
                    continue
                if isinstance(result, wire.Query):
                    result = wire.error(result.message, dns.rcode.SERVFAIL), "servfail"
                response, outcome = result
                if response is not None:
                    _write(writer, response)
                self._count(outcome, start)
                slots.release()
        except Exception as e:  # noqa: BLE001
            self._once(("tcp", type(e).__name__), "dns: TCP client %s: %r", source, e)
        finally:
            if pending and not self._closing:
                # A client may send its query and close its writing half: answer it.
                await asyncio.wait(list(pending), timeout=self.timeout * (len(self.upstreams) + 1))
            listener.connections.discard(writer)
            writer.close()

    async def _tcp_forward(self, writer: asyncio.StreamWriter, query: wire.Query, start: float) -> None:
        response, outcome = await self._forward(query, tcp=True)
        _write(writer, response)
        self._count(outcome, start)


async def _closed(writer: asyncio.StreamWriter) -> None:
    # An aborted connection the client had reset ends in ConnectionResetError:
    # it is going anyway, and an unread task exception would be logged as a fault.
    try:
        await writer.wait_closed()
    except OSError:
        pass


def _write(writer: asyncio.StreamWriter, message: bytes) -> None:
    if not writer.transport.is_closing():
        writer.write(len(message).to_bytes(2, "big") + message)


def _where(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "a closed socket"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
