"""Forwarding a query that is not a cluster name to the host's upstream
servers, on the resolver's event loop (a slow upstream holds only its own
query).

UDP queries go over UDP and TCP ones over TCP, the client's bytes unchanged
(its ID, flags and EDNS), and the upstream's answer comes back unchanged too,
a truncated one with its TC bit, so the client retries over TCP as it would
talking to that server. Each attempt uses a fresh socket connected to the
upstream: the kernel picks a random source port, drops datagrams from any
other address, and a reply is taken only if its ID and question match (a late
answer to an earlier attempt, or a forged one, is ignored and the wait goes
on). The next upstream is tried on timeout, SERVFAIL, REFUSED or a connection
error; None when all have failed (the caller answers SERVFAIL).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

import dns.message
import dns.rcode

from driver.dns import wire

log = logging.getLogger(__name__)

RETRY_RCODES = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED})


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    family: int
    sockaddr: tuple

    @classmethod
    def resolve(cls, host: str, port: int) -> "Upstream":
        """A numeric address only (no name lookups on the query path)."""
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                                       flags=socket.AI_NUMERICHOST)[0]
        return cls(host, port, family, sockaddr)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


async def forward(query: dns.message.Message, data: bytes, upstreams: Sequence[Upstream],
                  tcp: bool, timeout: float) -> Optional[bytes]:
    """The first usable answer of `upstreams`, tried in order, or None."""
    exchange = _tcp_exchange if tcp else _udp_exchange
    for upstream in upstreams:
        try:
            async with asyncio.timeout(timeout):
                reply, rcode = await exchange(upstream, query, data)
        except TimeoutError:
            log.debug("dns: upstream %s: no answer in %.1fs", upstream, timeout)
            continue
        except (OSError, EOFError, asyncio.IncompleteReadError) as e:
            log.debug("dns: upstream %s: %s", upstream, e)
            continue
        if rcode in RETRY_RCODES:
            log.debug("dns: upstream %s answered %s", upstream, dns.rcode.to_text(rcode))
            continue
        return reply
    return None


async def _udp_exchange(upstream: Upstream, query: dns.message.Message, data: bytes) -> tuple[bytes, int]:
    loop = asyncio.get_running_loop()
    with socket.socket(upstream.family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(upstream.sockaddr)  # binds a random ephemeral port
        await loop.sock_sendall(sock, data)
        while True:
            # A refused port shows here as ConnectionRefusedError (ICMP), at once.
            reply = await loop.sock_recv(sock, wire.TCP_MAX)
            rcode = wire.reply_rcode(query, reply)
            if rcode is not None:
                return reply, rcode


async def _tcp_exchange(upstream: Upstream, query: dns.message.Message, data: bytes) -> tuple[bytes, int]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(upstream.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, upstream.sockaddr)  # the address as resolved once, no lookup
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        await writer.drain()
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = await reader.readexactly(size)
            rcode = wire.reply_rcode(query, reply)
            if rcode is not None:
                return reply, rcode
    finally:
        writer.transport.abort()
