"""DNS messages in and out, all through dnspython: read a query (or say why it
is not one), build cluster answers and error answers, check an upstream reply.

Nothing here touches a socket; every function takes and returns bytes, so the
server and the forwarder share one reading of the wire and the fuzz tests can
aim at it through the real sockets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdata
import dns.rrset

HEADER = 12
# What we advertise in EDNS and the most a UDP answer of ours may carry
# (the size DNS Flag Day 2020 settled on: no IP fragmentation).
OUR_PAYLOAD = 1232
CLASSIC_UDP = 512
TCP_MAX = 65535
# Zone transfers span several messages; forwarding relays exactly one.
REFUSED_QTYPES = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.MAILA,
                            dns.rdatatype.MAILB})


_RCODE_OUTCOME = {dns.rcode.FORMERR: "formerr", dns.rcode.REFUSED: "refused"}


@dataclass
class Query:
    message: dns.message.Message
    wire: bytes          # as received, relayed unchanged to an upstream
    qname: str           # lower-case, no trailing dot ("" for the root)
    qtype: int
    qclass: int


@dataclass
class Rejected:
    """Not a query to answer normally: send `response` (None: drop silently)."""
    response: Optional[bytes]
    outcome: str         # the metrics outcome; "" when dropped (not a query)
    reason: str


def _header(wire: bytes) -> Optional[dns.message.Message]:
    """The 12-byte header alone, read by dnspython with the section counts
    zeroed, so the ID and flags of a message whose body is garbage are known."""
    if len(wire) < HEADER:
        return None
    try:
        return dns.message.from_wire(wire[:4] + bytes(8))
    except Exception:  # noqa: BLE001 - cannot happen with zero counts; never crash on input
        return None


def _header_error(header: dns.message.Message, rcode: int) -> bytes:
    """An error answer to a query whose body could not be read: same ID and
    opcode, RD echoed, no sections."""
    r = dns.message.Message(id=header.id)
    r.flags = dns.flags.QR | (header.flags & dns.flags.RD) | dns.opcode.to_flags(header.opcode())
    r.set_rcode(rcode)
    return r.to_wire()


def read_query(wire: bytes) -> Query | Rejected:
    try:
        message = dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        # Signed with a key we cannot know: refused, not malformed.
        return _unreadable(wire, "TSIG-signed", dns.rcode.REFUSED)
    except Exception as e:  # noqa: BLE001 - dnspython raises many kinds on bad input
        # Only now read the header alone: most queries parse, and reading twice costs.
        return _unreadable(wire, f"unreadable: {type(e).__name__}")
    not_a_query = _not_a_query(message)
    if not_a_query is not None:
        return not_a_query
    if len(message.question) != 1:
        return Rejected(_header_error(message, dns.rcode.FORMERR), "formerr",
                        f"{len(message.question)} questions")
    if message.edns > 0:
        return Rejected(error(message, dns.rcode.BADVERS), "formerr", f"EDNS version {message.edns}")
    q = message.question[0]
    if q.rdtype in REFUSED_QTYPES:
        return Rejected(error(message, dns.rcode.REFUSED), "refused",
                        f"qtype {dns.rdatatype.to_text(q.rdtype)}")
    if dns.rdatatype.is_metatype(q.rdtype) and q.rdtype != dns.rdatatype.ANY:
        return Rejected(error(message, dns.rcode.FORMERR), "formerr",
                        f"qtype {dns.rdatatype.to_text(q.rdtype)} in a question")
    qname = "" if q.name == dns.name.root else q.name.to_text(omit_final_dot=True).lower()
    return Query(message, wire, qname, q.rdtype, q.rdclass)


def _unreadable(wire: bytes, reason: str, rcode: int = dns.rcode.FORMERR) -> Rejected:
    header = _header(wire)
    if header is None:
        return Rejected(None, "", "shorter than a DNS header")
    return _not_a_query(header) or Rejected(_header_error(header, rcode), _RCODE_OUTCOME[rcode], reason)


def _not_a_query(header) -> Optional[Rejected]:
    """A response, or an opcode other than QUERY: judged on the header alone."""
    if header.flags & dns.flags.QR:
        # Never answer an answer: two servers would bounce errors forever.
        return Rejected(None, "", "a response (QR set), not a query")
    opcode = header.opcode()
    if opcode != dns.opcode.QUERY:
        return Rejected(_header_error(header, dns.rcode.NOTIMP), "refused",
                        f"opcode {dns.opcode.to_text(opcode)}")
    return None


def max_udp_size(query: dns.message.Message) -> int:
    if query.edns < 0:
        return CLASSIC_UDP
    return max(CLASSIC_UDP, min(query.payload, OUR_PAYLOAD))


def _response(query: dns.message.Message, rcode: int) -> dns.message.Message:
    r = dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)
    r.set_rcode(rcode)
    return r


def _to_wire(r: dns.message.Message, max_size: int) -> bytes:
    try:
        return r.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        # What fits, with TC: the client asks again over TCP.
        return r.to_wire(max_size=max_size, prefer_truncation=True)


def error(query: dns.message.Message, rcode: int) -> bytes:
    """An error answer that keeps the question (and EDNS, if the query had it)."""
    return _to_wire(_response(query, rcode), CLASSIC_UDP)


def answer(query: Query, rcode: int, records: Sequence[str], ttl: int, max_size: int) -> bytes:
    """The cluster's authoritative answer: the question, AA and RA, `records`
    as rdata of the question's type (A: dotted IPv4, PTR: names) with `ttl`.
    Raises ValueError for records that are not valid rdata of that type."""
    r = _response(query.message, rcode)
    r.flags |= dns.flags.AA
    if records:
        q = query.message.question[0]
        rrset = dns.rrset.RRset(q.name, q.rdclass, q.rdtype)
        rrset.update_ttl(ttl)
        for text in records:
            rrset.add(_rdata(q.rdclass, q.rdtype, text))
        r.answer.append(rrset)
    return _to_wire(r, max_size)


@functools.lru_cache(maxsize=8192)
def _rdata(rdclass: int, rdtype: int, text: str) -> dns.rdata.Rdata:
    """Record text as rdata of the question's type (immutable, so shared):
    parsing text is most of what building an answer costs, and the same
    addresses are asked for again and again."""
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME) and not text.endswith("."):
        text += "."  # the lookup gives names without the trailing dot
    try:
        return dns.rdata.from_text(rdclass, rdtype, text, origin=dns.name.root, relativize=False)
    except Exception as e:  # noqa: BLE001 - dnspython's syntax errors have several types
        raise ValueError(f"{text!r} is not {dns.rdatatype.to_text(rdtype)} data: {e}") from e


def reply_rcode(query: dns.message.Message, wire: bytes) -> Optional[int]:
    """The rcode of an upstream's reply if it answers `query` (same ID, QR set,
    same question), else None: a late, spoofed or garbled datagram."""
    try:
        reply = dns.message.from_wire(wire, question_only=True)
    except Exception:  # noqa: BLE001 - whatever an upstream sends must not hurt us
        return None
    if not query.is_response(reply):
        return None
    return reply.rcode()


def qclass_is_internet(query: Query) -> bool:
    return query.qclass == dns.rdataclass.IN
