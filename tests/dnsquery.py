"""A DNS client for the tests, run inside a container's network namespace
(nsenter -t <pid> -n python -P tests/dnsquery.py ...; -P: tests/dns would hide dnspython). Prints one JSON object:

    {"rcode": "NOERROR", "answers": ["10.1.0.2"], "tc": false, "at": <epoch seconds>}

--until answer|nxdomain: query every 20 ms until that holds (or --timeout),
and print the result with the time it first held (to time convergence
against a `docker run` or `docker rm` made elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


def ask(server: str, qname: str, qtype: str, tcp: bool, timeout: float) -> dict:
    query = dns.message.make_query(qname, qtype)
    try:
        if tcp:
            reply = dns.query.tcp(query, server, timeout=timeout)
        else:
            reply = dns.query.udp(query, server, timeout=timeout, ignore_trailing=True)
    except (dns.exception.Timeout, OSError) as e:
        return {"rcode": "TIMEOUT", "answers": [], "tc": False, "error": str(e), "at": time.time()}
    answers = [item.to_text().strip('"') for rrset in reply.answer for item in rrset]
    return {"rcode": dns.rcode.to_text(reply.rcode()), "answers": answers,
            "tc": bool(reply.flags & dns.flags.TC), "at": time.time()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("qname")
    parser.add_argument("qtype", nargs="?", default="A")
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--until", choices=["answer", "nxdomain"])
    parser.add_argument("--ready", help="a file to create once the first query is answered (any answer)")
    args = parser.parse_args(argv)
    if args.until is None:
        print(json.dumps(ask(args.server, args.qname, args.qtype, args.tcp, args.timeout)))
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        result = ask(args.server, args.qname, args.qtype, args.tcp, 1.0)
        if args.ready:
            open(args.ready, "a").close()
            args.ready = None
        held = result["answers"] if args.until == "answer" else result["rcode"] == "NXDOMAIN"
        if held or time.monotonic() > deadline:
            print(json.dumps({**result, "held": bool(held)}))
            return 0
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
