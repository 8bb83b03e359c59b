"""Convergence (issue 3): from CreateEndpoint on one host to the FDB entry
for that endpoint's MAC on another host's vxlan0.

Two hosts without Docker (namespaces, the plugin driven over its socket)
on one etcd. Host B's overlay namespace is watched with an rtnetlink
listener (kernel notifications, stamped on arrival), so nothing polls.
Endpoints are made one at a time, alternately on A (seen on B) and on B
(seen on A). Interleaved with them, the same etcd's own floor: a key put by
the bench and seen by the bench's watch (pyoverlay's own store client), the
least any watch-driven design could take.
"""

from __future__ import annotations

import threading
import time

from bench import calls
from bench.env import UNDERLAY_NETNS, BenchError
from bench.nlwatch import FdbWatch, open_in_netns
from bench.dockerrun import plugin_call_times
from bench.stats import fmt, summary
from driver.store import open_store

NAME = "convergence"
TITLE = "Convergence: CreateEndpoint on one host to the FDB entry on another"
GOAL_P99_MS = 50.0
VNI = 5000


class StoreFloor:
    """put -> watch event latency of etcd through pyoverlay's store client."""

    def __init__(self, url: str):
        self.store = open_store(url, prefix="/bench-floor/")
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self.stop = threading.Event()
        _, rev = self.store.list("")
        self.thread = threading.Thread(target=self._watch, args=(rev + 1,), daemon=True)
        self.thread.start()

    def _watch(self, rev: int) -> None:
        try:
            for batch in self.store.watch("", rev, self.stop):
                now = time.monotonic()
                with self.cond:
                    for event in batch:
                        self.seen.setdefault(event.key, now)
                    self.cond.notify_all()
        except Exception:  # reported as missing samples
            pass

    def sample(self, i: int, timeout: float = 5) -> float | None:
        key = f"k{i}"
        t0 = time.monotonic()
        self.store.put(key, "x")
        deadline = t0 + timeout
        with self.cond:
            while key not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.seen[key] - t0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=3)
        self.store.close()


def _measure(ctx, a, b, netnet, n: int, warm: int) -> dict:
    watch = FdbWatch()
    watch.add(a.name, a.netns_path(VNI))
    watch.add(b.name, b.netns_path(VNI))
    watch.start()
    floor = StoreFloor(ctx._etcd_url)
    samples = {"returned": [], "sent": [], "neigh": [], "floor": [], "delete": [], "create_call": []}
    missing = 0
    made = []
    try:
        for i in range(warm + n):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            net = netnet[src.name]
            address, _ = calls.request_address(src.client, net)
            t_send = time.monotonic()
            ep, took = calls.create_endpoint(src.client, net, address)
            t_ret = time.monotonic()
            made.append((src, dst, ep))
            got = watch.wait(ep.mac, {dst.name}, tables=("fdb", "neigh"), timeout=5)
            fdb, neigh = got["fdb"].get(dst.name), got["neigh"].get(dst.name)
            f = floor.sample(i)
            if i < warm:
                continue
            if fdb is None:
                missing += 1
                continue
            samples["returned"].append((fdb - t_ret) * 1000)
            samples["sent"].append((fdb - t_send) * 1000)
            samples["create_call"].append(took * 1000)
            if neigh is not None:
                samples["neigh"].append((max(fdb, neigh) - t_send) * 1000)
            if f is not None:
                samples["floor"].append(f * 1000)
        ctx.log(f"convergence: {len(made)} endpoints made; removing them, timing the FDB removals")
        for i, (src, dst, ep) in enumerate(made):
            t0 = time.monotonic()
            calls.delete_endpoint(src.client, ep)
            got = watch.wait(ep.mac, {dst.name}, kind="del", tables=("fdb",), timeout=5)
            gone = got["fdb"].get(dst.name)
            calls.release_address(src.client, ep)
            if i >= warm and gone is not None:
                samples["delete"].append((gone - t0) * 1000)
        overflows = dict(watch.overflows)
    finally:
        floor.close()
        watch.close()
    if overflows:
        raise BenchError(f"netlink listener overflowed: {overflows}")
    return {"samples": samples, "missing": missing}


def run(ctx) -> dict:
    n = 40 if ctx.quick else 300
    warm = 5
    etcd = ctx.etcd()
    ctx._etcd_url = etcd.url
    a, b = ctx.plain_host(1), ctx.plain_host(2)
    for h in (a, b):
        h.start_plugin(etcd.url)
    nets = {h.name: calls.create_network(h.client, "10.50.0.0/16", vni=VNI) for h in (a, b)}
    ctx.log(f"convergence: {warm} warm-up + {n} endpoints, alternating A->B and B->A")
    # The bench reaches etcd (10.99.0.254) from the underlay's namespace; the
    # plugin sockets are files, reachable from anywhere.
    out = open_in_netns(f"/run/netns/{UNDERLAY_NETNS}", lambda: _measure(ctx, a, b, nets, n, warm))
    for h in (a, b):
        calls.delete_network(h.client, nets[h.name])
    server = []
    for h in (a, b):
        with open(h.log_path, errors="replace") as f:
            server += plugin_call_times(f.read()).get("NetworkDriver.CreateEndpoint", [])
    out["samples"]["create_server"] = server
    s = {k: summary(v) for k, v in out["samples"].items()}
    p99 = s["returned"]["p99"]
    rows = ["| measured | n | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|"]
    labels = [
        ("returned", "CreateEndpoint returned -> FDB entry on the other host"),
        ("sent", "CreateEndpoint sent -> FDB entry on the other host"),
        ("neigh", "CreateEndpoint sent -> FDB and neighbour entry both there"),
        ("create_call", "CreateEndpoint call itself (etcd store), at the bench"),
        ("create_server", "CreateEndpoint in the plugin (its log; warm-up and all)"),
        ("delete", "DeleteEndpoint sent -> FDB entry gone on the other host"),
        ("floor", "etcd floor: put -> watch event, same etcd, pyoverlay's client"),
    ]
    for key, label in labels:
        x = s[key]
        rows.append(f"| {label} | {x['n']} | {fmt(x['p50'], 1)} ms | {fmt(x['p90'], 1)} ms | "
                    f"{fmt(x['p99'], 1)} ms | {fmt(x['max'], 1)} ms |")
    md = (
        f"{n} endpoints after {warm} warm-up ones, made one at a time (RequestAddress, then "
        "CreateEndpoint), alternately on each of two hosts on one etcd; times are from the bench's "
        "clock to the kernel's netlink notification in the other host's overlay namespace. "
        "A negative 'returned' time would mean the entry was there before the answer was read "
        f"(the peer record is written before CreateEndpoint returns). Endpoints never seen: {out['missing']}.\n\n"
        + "\n".join(rows) + "\n\n"
        f"**p99 {fmt(p99, 1)} ms** from CreateEndpoint returning, {fmt(s['sent']['p99'], 1)} ms from its start "
        f"(goal under {GOAL_P99_MS:.0f} ms, judged here on the stricter, from the start; "
        "Docker's swarm overlay: about 300 ms after `docker run` started, a 200 ms gossip grid).\n"
    )
    sent99 = s["sent"]["p99"]
    headline = [(
        "CreateEndpoint -> FDB entry on the other host",
        f"p99 {fmt(p99, 1)} ms from the call's return, {fmt(sent99, 1)} ms from its start "
        f"(p50 {fmt(s['returned']['p50'], 1)} / {fmt(s['sent']['p50'], 1)} ms; etcd floor p50 "
        f"{fmt(s['floor']['p50'], 1)} ms; never seen: {out['missing']})",
        f"p99 < {GOAL_P99_MS:.0f} ms",
        # judged on the stricter of the two: from the start of the call
        sent99 is not None and sent99 < GOAL_P99_MS and out["missing"] == 0,
    )]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline, "data": out}
