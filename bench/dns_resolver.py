"""Microbenchmark of the cluster resolver (driver/dns) on loopback, in one run:

- latency, p50/p99, of a cluster name, of a forwarded name, and of the same
  upstream asked directly, interleaved query by query so machine load hits
  all three alike; forwarding's cost is forwarded minus direct;
- queries per second one resolver sustains over UDP with several clients
  keeping queries in flight, for cluster names and for forwarded ones.

The resolver runs in a process of its own (as in `pyoverlay serve`, with the
Prometheus metrics hook), the upstream in another (a small dnspython server,
one thread) and the clients here, so none shares an interpreter lock with the
resolver. No Docker, no namespaces, no root needed. `--busy` adds a
CPU-bound thread beside the resolver, as the plugin's request threads are in
a burst of `docker run`: the resolver then waits for the interpreter lock.

    .venv/bin/python -m bench.dns_resolver [--quick] [--busy] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import threading
import time

from bench.stats import fmt, summary

NAMES = 1000           # cluster names in the table
HOST = "127.0.0.1"


# -- the processes ---------------------------------------------------------------

def _upstream(ready) -> None:
    """A recursive server's stand-in: answers every A query with one address."""
    import dns.message
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    ready.send(sock.getsockname()[1])
    while True:
        data, addr = sock.recvfrom(65535)
        try:
            q = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001
            continue
        r = dns.message.make_response(q, recursion_available=True)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.1"))
        sock.sendto(r.to_wire(), addr)


def _busy() -> None:
    """Pure-Python work in another thread of the resolver's process, as the
    plugin's request threads do during a burst of `docker run`: it holds the
    interpreter lock, which the resolver's thread waits for (up to
    sys.getswitchinterval(), 5 ms, per wake-up)."""
    x = 0
    while True:
        for i in range(1000):
            x = (x + i) % 7919


def _resolver(ready, upstream_port: int, busy: bool = False) -> None:
    import dns.rcode
    import dns.rdatatype

    from driver.dns.server import Answer, Resolver
    from plugin.metrics import Metrics

    table = {f"c{i}": Answer(dns.rcode.NOERROR, (f"10.20.{i // 250}.{i % 250 + 1}",)) for i in range(NAMES)}
    nodata = Answer(dns.rcode.NOERROR)

    def lookup(tag, source, qname, qtype):
        found = table.get(qname)
        if found is None:
            return None
        return found if qtype == dns.rdatatype.A else nodata

    resolver = Resolver(lookup, [(HOST, upstream_port)], metrics=Metrics(), timeout=2.0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind((HOST, udp.getsockname()[1]))
    tcp.listen(64)
    resolver.start()
    resolver.add_listener(4096, udp, tcp)
    if busy:
        threading.Thread(target=_busy, daemon=True).start()
    ready.send(udp.getsockname()[1])
    threading.Event().wait()


def _spawn(ctx, target, *args) -> tuple[multiprocessing.Process, int]:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args), daemon=True)
    p.start()
    if not parent.poll(30):
        p.kill()
        raise RuntimeError(f"{target.__name__} did not start")
    return p, parent.recv()


# -- the clients -------------------------------------------------------------

def _query(name: str, qid: int) -> bytes:
    import dns.message

    q = dns.message.make_query(name, "A", use_edns=0, payload=1232)
    q.id = qid
    return q.to_wire()


def _ask(sock: socket.socket, addr, wire: bytes) -> float:
    """Seconds from send to the matching reply (same ID)."""
    start = time.perf_counter()
    sock.sendto(wire, addr)
    while True:
        reply = sock.recv(65535)
        if reply[:2] == wire[:2]:
            return time.perf_counter() - start


def latency(resolver_port: int, upstream_port: int, n: int, warm: int = 200) -> dict[str, list[float]]:
    kinds = {
        "cluster": lambda i: ((HOST, resolver_port), _query(f"c{i % NAMES}", i % 65536)),
        "forwarded": lambda i: ((HOST, resolver_port), _query(f"w{i}.example.org", i % 65536)),
        "direct": lambda i: ((HOST, upstream_port), _query(f"w{i}.example.org", i % 65536)),
    }
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for i in range(warm + n):
            order = list(kinds) if i % 2 else list(reversed(kinds))  # which goes first alternates
            for kind in order:
                addr, wire = kinds[kind](i)
                seconds = _ask(sock, addr, wire)
                if i >= warm:
                    samples[kind].append(seconds)
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(port: int, names: list[str], clients: int, window: int, seconds: float,
               pid: int) -> tuple[float, float]:
    """Answers per second with `clients` threads keeping `window` queries in
    flight each (a lost query is re-sent after 1 s), and the resolver
    process's CPU time per answer (microseconds)."""
    counts = [0] * clients
    stop = time.monotonic() + seconds
    wires = [_query(name, i % 65536) for i, name in enumerate(names)]

    def client(k: int) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((HOST, port))
            sock.settimeout(1)
            i = k
            for _ in range(window):
                sock.send(wires[i % len(wires)])
                i += clients
            while time.monotonic() < stop:
                try:
                    sock.recv(65535)
                    counts[k] += 1
                except (TimeoutError, socket.timeout):
                    pass
                sock.send(wires[i % len(wires)])
                i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    cpu = cpu_seconds(pid)
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answered = sum(counts)
    return answered / (time.monotonic() - start), (cpu_seconds(pid) - cpu) / max(1, answered) * 1e6


def run(quick: bool = False, busy: bool = False) -> dict:
    ctx = multiprocessing.get_context("spawn")
    upstream, upstream_port = _spawn(ctx, _upstream)
    resolver, resolver_port = _spawn(ctx, _resolver, upstream_port, busy)
    try:
        n = 500 if quick else 3000
        samples = latency(resolver_port, upstream_port, n)
        clients, window, seconds = 4, 8, (1.5 if quick else 4.0)
        qps_cluster, cpu_cluster = throughput(resolver_port, [f"c{i}" for i in range(NAMES)], clients, window,
                                              seconds, resolver.pid)
        qps_forwarded, cpu_forwarded = throughput(resolver_port, [f"t{i}.example.org" for i in range(NAMES)],
                                                  clients, window, seconds, resolver.pid)
    finally:
        resolver.kill()
        upstream.kill()
    ms = {kind: summary([s * 1000 for s in xs]) for kind, xs in samples.items()}
    return {
        "latency_ms": ms,
        "forwarding_adds_ms": {p: ms["forwarded"][p] - ms["direct"][p] for p in ("p50", "p99")},
        "qps": {"cluster": qps_cluster, "forwarded": qps_forwarded},
        "resolver_cpu_us_per_query": {"cluster": cpu_cluster, "forwarded": cpu_forwarded},
        "setup": {"queries_each": n, "clients": clients, "in_flight_each": window, "seconds": seconds,
                  "cpus": os.cpu_count(), "load": os.getloadavg()[0], "busy_thread": busy},
    }


def report(result: dict) -> str:
    ms, adds, qps, setup = result["latency_ms"], result["forwarding_adds_ms"], result["qps"], result["setup"]
    lines = [
        f"DNS resolver on loopback, UDP ({setup['queries_each']} queries of each kind, interleaved; "
        f"{setup['cpus']} CPUs, load {setup['load']:.1f}"
        + (", a busy Python thread beside the resolver" if setup["busy_thread"] else "") + ")",
        f"  {'':28} {'p50':>8} {'p99':>8}",
    ]
    for kind, label in (("cluster", "cluster name"), ("forwarded", "forwarded name"),
                        ("direct", "upstream asked directly")):
        lines.append(f"  {label:28} {fmt(ms[kind]['p50'], 3):>8} {fmt(ms[kind]['p99'], 3):>8}  ms")
    lines.append(f"  {'forwarding adds':28} {fmt(adds['p50'], 3):>8} {fmt(adds['p99'], 3):>8}  ms")
    cpu = result["resolver_cpu_us_per_query"]
    lines.append(f"  queries/s, {setup['clients']} clients x {setup['in_flight_each']} in flight, "
                 f"{setup['seconds']:g} s: cluster {qps['cluster']:.0f}, forwarded {qps['forwarded']:.0f}")
    lines.append(f"  resolver CPU per query: cluster {cpu['cluster']:.0f} us, forwarded {cpu['forwarded']:.0f} us")
    lines.append("  goal (issue 10): cluster p99 < 2 ms; forwarding adds < 1 ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns_resolver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries, shorter runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--busy", action="store_true",
                        help="a CPU-bound thread in the resolver's process (the plugin's other threads, busy)")
    args = parser.parse_args(argv)
    result = run(args.quick, args.busy)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
