"""A small real DNS server for the tests: the "host's upstream" the cluster
resolver forwards to. UDP and TCP on ADDR:PORT, authoritative for a few names:

    python -P tests/dnsupstream.py ADDR PORT   (-P: tests/dns would hide dnspython) --a ext.test=192.0.2.10 --txt-big big.test=40

--a NAME=IP answers A; --txt-big NAME=N answers N TXT records of 60 bytes
each (too big for 512-byte UDP: the UDP answer has TC set, TCP has them all).
Everything else: NXDOMAIN. One line per query on stdout (the test's log).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

UDP_LIMIT = 512


def answer(wire: bytes, names: dict, big: dict) -> dns.message.Message:
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA
    question = query.question[0]
    qname = question.name.to_text(omit_final_dot=True).lower()
    if qname in names and question.rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", names[qname]))
    elif qname in big and question.rdtype == dns.rdatatype.TXT:
        texts = [f'"record {i:03d} ' + "x" * 48 + '"' for i in range(big[qname])]
        reply.answer.append(dns.rrset.from_text_list(question.name, 5, "IN", "TXT", texts))
    elif qname not in names and qname not in big:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply


def serve_udp(sock: socket.socket, names: dict, big: dict) -> None:
    while True:
        wire, peer = sock.recvfrom(4096)
        try:
            reply = answer(wire, names, big)
            print(f"udp {peer[0]} {reply.question[0].name} {dns.rdatatype.to_text(reply.question[0].rdtype)}",
                  flush=True)
            # Too big: sent truncated (TC set, the answer left out), as servers do.
            sock.sendto(reply.to_wire(max_size=UDP_LIMIT, prefer_truncation=True), peer)
        except Exception as e:  # a test server: say it and go on
            print(f"udp {peer}: {e!r}", flush=True)


def serve_tcp(sock: socket.socket, names: dict, big: dict) -> None:
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=_tcp_client, args=(conn, peer, names, big), daemon=True).start()


def _tcp_client(conn: socket.socket, peer, names: dict, big: dict) -> None:
    with conn:
        while True:
            head = conn.recv(2)
            if len(head) < 2:
                return
            size = int.from_bytes(head, "big")
            wire = b""
            while len(wire) < size:
                chunk = conn.recv(size - len(wire))
                if not chunk:
                    return
                wire += chunk
            reply = answer(wire, names, big)
            print(f"tcp {peer[0]} {reply.question[0].name} {dns.rdatatype.to_text(reply.question[0].rdtype)}",
                  flush=True)
            out = reply.to_wire()
            conn.sendall(len(out).to_bytes(2, "big") + out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("port", type=int)
    parser.add_argument("--a", action="append", default=[])
    parser.add_argument("--txt-big", action="append", default=[])
    args = parser.parse_args(argv)
    names = dict(item.lower().split("=", 1) for item in args.a)
    big = {k.lower(): int(v) for k, v in (item.split("=", 1) for item in args.txt_big)}
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.addr, args.port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((args.addr, args.port))
    tcp.listen(16)
    threading.Thread(target=serve_tcp, args=(tcp, names, big), daemon=True).start()
    print(f"serving {args.addr}:{args.port}", flush=True)
    serve_udp(udp, names, big)
    return 0


if __name__ == "__main__":
    sys.exit(main())
