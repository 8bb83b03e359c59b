"""Socket latency (issue 2): the endpoint cycle the engine drives for every
container, timed per call over the plugin's unix socket.

Two plugins side by side on two hosts without Docker, one on the embedded
sqlite store and one on etcd; cycles alternate between them (and which goes
first), so drift in machine load hits both alike.
"""

from __future__ import annotations

from bench import calls
from bench.stats import fmt, summary

NAME = "latency"
TITLE = "Socket latency: the endpoint cycle"
CALLS = ["RequestAddress", "CreateEndpoint", "Join", "Leave", "DeleteEndpoint", "ReleaseAddress"]


def cycle(client, net) -> dict[str, float]:
    t = {}
    address, t["RequestAddress"] = calls.request_address(client, net)
    ep, t["CreateEndpoint"] = calls.create_endpoint(client, net, address)
    t["Join"] = calls.join(client, ep)
    t["Leave"] = calls.leave(client, ep)
    t["DeleteEndpoint"] = calls.delete_endpoint(client, ep)
    t["ReleaseAddress"] = calls.release_address(client, ep)
    t["cycle"] = sum(t.values())
    return t


def run(ctx) -> dict:
    n = 50 if ctx.quick else 300
    warm = 10
    etcd = ctx.etcd()
    stores = {}
    hosts = []
    try:
        sq = ctx.plain_host(1)
        hosts.append(sq)
        sq.start_plugin(f"sqlite://{sq.dir}/state.db")
        stores["sqlite"] = (sq, calls.create_network(sq.client, "10.41.0.0/24", vni=4100))
        et = ctx.plain_host(2)
        hosts.append(et)
        et.start_plugin(etcd.url)
        stores["etcd"] = (et, calls.create_network(et.client, "10.42.0.0/24", vni=4200))
        samples: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CALLS + ["cycle"]} for s in stores}
        order = list(stores)
        ctx.log(f"latency: {warm} warm-up + {n} cycles per store, alternating {order}")
        for i in range(warm + n):
            for store in (order if i % 2 == 0 else order[::-1]):
                host, net = stores[store]
                t = cycle(host.client, net)
                if i >= warm:
                    for call, secs in t.items():
                        samples[store][call].append(secs * 1000)
        for host, net in stores.values():
            calls.delete_network(host.client, net)
    finally:
        for h in hosts:
            h.close()

    table = {s: {c: summary(v) for c, v in per.items()} for s, per in samples.items()}
    rows = ["| call | sqlite p50 | sqlite p99 | etcd p50 | etcd p99 |", "|---|---:|---:|---:|---:|"]
    for call in CALLS + ["cycle"]:
        a, b = table["sqlite"][call], table["etcd"][call]
        label = "**whole cycle**" if call == "cycle" else call
        rows.append(f"| {label} | {fmt(a['p50'], 2)} | {fmt(a['p99'], 2)} | {fmt(b['p50'], 2)} | {fmt(b['p99'], 2)} |")
    md = (
        f"{n} cycles per store after {warm} warm-up cycles, the two stores alternating; "
        "milliseconds from sending the request to reading the whole answer, over one kept-alive "
        "connection as the engine uses. Join makes the veth pair, Leave deletes it (the engine "
        "never moved it here: no container).\n\n" + "\n".join(rows) + "\n"
    )
    headline = []
    for store in ("sqlite", "etcd"):
        c = table[store]["cycle"]
        worst = max(CALLS, key=lambda k: table[store][k]["p99"])
        headline.append((f"endpoint cycle, {store} store (6 calls)",
                         f"p50 {fmt(c['p50'], 1)} ms, p99 {fmt(c['p99'], 1)} ms "
                         f"(slowest p99: {worst} {fmt(table[store][worst]['p99'], 1)} ms)", "", None))
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline, "data": table}
