"""Socket latency (issue 2): the endpoint cycle the engine drives for every
container, timed per call over the plugin's unix socket.

Three plugins side by side on three hosts without Docker, one on the
embedded sqlite store, one on etcd and one on ZooKeeper (both servers on the
underlay); cycles rotate between them (and which goes first), so drift in
machine load hits all alike.
"""

from __future__ import annotations

from bench import calls
from bench.env import UNDERLAY_ADDR
from bench.stats import fmt, summary
from tests.hosts import UNDERLAY_NETNS
from tests.zkserver import ZkServer

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
    # forceSync on, as etcd fsyncs every write (the tests' servers skip it).
    zk = ZkServer(UNDERLAY_ADDR, netns=UNDERLAY_NETNS, extra_config={"forceSync": "yes"})
    ctx.stack.callback(zk.close)
    zk.start()
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
        zh = ctx.plain_host(3)
        hosts.append(zh)
        zh.start_plugin(zk.url)
        stores["zk"] = (zh, calls.create_network(zh.client, "10.43.0.0/24", vni=4300))
        samples: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CALLS + ["cycle"]} for s in stores}
        order = list(stores)
        ctx.log(f"latency: {warm} warm-up + {n} cycles per store, rotating {order}")
        for i in range(warm + n):
            first = i % len(order)
            for store in order[first:] + order[:first]:
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
    rows = ["| call | " + " | ".join(f"{s} p50 | {s} p99" for s in order) + " |",
            "|---|" + "---:|---:|" * len(order)]
    for call in CALLS + ["cycle"]:
        label = "**whole cycle**" if call == "cycle" else call
        cells = [f"{fmt(table[s][call]['p50'], 2)} | {fmt(table[s][call]['p99'], 2)}" for s in order]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    md = (
        f"{n} cycles per store after {warm} warm-up cycles, the stores taking turns; "
        "milliseconds from sending the request to reading the whole answer, over one kept-alive "
        "connection as the engine uses. Join makes the veth pair, Leave deletes it (the engine "
        "never moved it here: no container).\n\n" + "\n".join(rows) + "\n"
    )
    headline = []
    for store in order:
        c = table[store]["cycle"]
        worst = max(CALLS, key=lambda k: table[store][k]["p99"])
        headline.append((f"endpoint cycle, {store} store (6 calls)",
                         f"p50 {fmt(c['p50'], 1)} ms, p99 {fmt(c['p99'], 1)} ms "
                         f"(slowest p99: {worst} {fmt(table[store][worst]['p99'], 1)} ms)", "", None))
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline, "data": table}
