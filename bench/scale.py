"""Scale without Docker (issue 3): many hosts, one overlay, up to 1,000 peers.

Hosts are namespaces on the underlay with one `pyoverlay serve` each (its own
mount namespace and /run/netns, see bench.env.PlainHost), all on one etcd,
driven over their sockets. Every host joins one overlay; endpoints are added
in steps (100, 500, 1,000 peers in all) and at each step:

- probes: one new endpoint at a time, on a rotating host; the time until its
  FDB entry is on every other host (netlink notifications from all overlay
  namespaces), then its removal everywhere; and the plugins' CPU time per
  peer event (all plugins' CPU over the probes, less what they spend idle,
  divided by 2 x probes x receiving hosts: each probe is an add and a remove);
- the IPAM and CreateEndpoint call latencies while filling up to that step.

At full size: each plugin's memory (RSS of gunicorn master + worker, and PSS,
which splits pages the two share), and restarts: a plugin SIGKILLed and
started again (a) after its vxlan0 FDB and neighbours were flushed: time from
the start until the kernel holds every remote peer again; (b) after drift (some
entries deleted, stale ones added): time until the kernel matches the store;
(c) with nothing changed: time to answer again, and how many entries it
touched needlessly.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench import calls
from bench.env import BenchError, cpu_seconds, rss_kb
from bench.nlwatch import FdbWatch
from bench.stats import fmt, median, summary

NAME = "scale"
TITLE = "Scale without Docker: 20 hosts, 1,000 peers"
VNI = 8000
SUBNET = "10.70.0.0/16"
GOAL_RSS_MB = 100
GOAL_RESTART_S = 2.0


def _parallel(hosts, fn):
    with ThreadPoolExecutor(len(hosts)) as pool:
        return list(pool.map(fn, hosts))


class Cluster:
    def __init__(self, ctx, n_hosts: int):
        self.ctx = ctx
        self.etcd = ctx.etcd()
        self.hosts = [ctx.plain_host(i + 1) for i in range(n_hosts)]
        for h in self.hosts:
            h.spawn_plugin(self.etcd.url)
        _parallel(self.hosts, lambda h: h.wait_plugin(timeout=60))
        self.nets = {}
        for h in self.hosts:  # one at a time: the first makes the overlay, the others join it
            self.nets[h.name] = calls.create_network(h.client, SUBNET, vni=VNI)
        self.watch = FdbWatch()
        for h in self.hosts:
            self.watch.add(h.name, h.netns_path(VNI))
        self.watch.start()
        self.endpoints: dict[str, list[calls.Ep]] = {h.name: [] for h in self.hosts}

    def remote_macs(self, host) -> set[str]:
        return {ep.mac for name, eps in self.endpoints.items() if name != host.name for ep in eps}

    def fill(self, per_host: int) -> dict[str, list[float]]:
        """Add endpoints on every host (hosts in parallel) up to per_host each."""
        lat = {"RequestAddress": [], "CreateEndpoint": []}
        lock = threading.Lock()

        def work(h):
            while len(self.endpoints[h.name]) < per_host:
                ep = calls.new_endpoint(h.client, self.nets[h.name])
                with lock:
                    self.endpoints[h.name].append(ep)
                    for k in lat:
                        lat[k].append(ep.timings[k] * 1000)

        _parallel(self.hosts, work)
        return lat

    def converged(self, timeout: float) -> float:
        """Wait until every host has every remote peer; returns when the last one got there."""
        last = 0.0
        for h in self.hosts:
            t = self.watch.wait_count(h.name, self.remote_macs(h), timeout=timeout)
            if t is None:
                have = self.watch.count(h.name, self.remote_macs(h))
                raise BenchError(f"{h.name}: only {have} of {len(self.remote_macs(h))} peers after {timeout:g}s")
            last = max(last, t)
        return last

    def plugin_pids(self) -> list[int]:
        return [p for h in self.hosts for p in h.plugin_pids()]

    def probe(self, count: int, rotate: int) -> dict:
        """count endpoints made one at a time; each removed again once seen
        everywhere. CPU is read per host, so the host that makes the endpoint
        (IPAM, CreateEndpoint, DeleteEndpoint, ReleaseAddress) is told apart
        from the hosts that only receive the peer event."""
        spread, slowest, from_ret, call, src_cpu = [], [], [], [], []
        recv_cpu = 0.0
        pids = {h.name: h.plugin_pids() for h in self.hosts}

        def cpu() -> dict[str, float]:
            return {name: cpu_seconds(p) for name, p in pids.items()}

        # What each plugin spends when nothing happens (lease keep-alives,
        # watch progress), subtracted below.
        c0, t0 = cpu(), time.monotonic()
        time.sleep(2)
        c1, t1 = cpu(), time.monotonic()
        idle = {name: (c1[name] - c0[name]) / (t1 - t0) for name in pids}
        for i in range(count):
            src = self.hosts[(rotate + i) % len(self.hosts)]
            others = {h.name for h in self.hosts if h is not src}
            net = self.nets[src.name]
            c0, t0 = cpu(), time.monotonic()
            address, _ = calls.request_address(src.client, net)
            t_send = time.monotonic()
            ep, took = calls.create_endpoint(src.client, net, address)
            t_ret = time.monotonic()
            got = self.watch.wait(ep.mac, others, timeout=20)["fdb"]
            if len(got) != len(others):
                raise BenchError(f"probe {ep.mac} reached {len(got)} of {len(others)} hosts in 20 s")
            times = sorted((t - t_send) * 1000 for t in got.values())
            slowest.append(times[-1])
            spread.append(median(times))
            from_ret.append(times[-1] - (t_ret - t_send) * 1000)
            call.append(took * 1000)
            calls.delete_endpoint(src.client, ep)
            gone = self.watch.wait(ep.mac, others, kind="del", timeout=20)["fdb"]
            if len(gone) != len(others):
                raise BenchError(f"probe {ep.mac} removed from {len(gone)} of {len(others)} hosts in 20 s")
            calls.release_address(src.client, ep)
            # The next probe may get this address again, and with it this MAC.
            self.watch.forget([ep.mac])
            time.sleep(0.05)  # let the last removals' work finish inside this probe's window
            c1, dt = cpu(), time.monotonic() - t0
            spent = {name: c1[name] - c0[name] - idle[name] * dt for name in pids}
            src_cpu.append(spent[src.name] * 1000)
            recv_cpu += sum(spent[name] for name in others)
        events = count * (len(self.hosts) - 1) * 2  # each probe is added and removed on every other host
        return {"all_hosts": slowest, "median_host": spread, "from_return": from_ret, "call": call,
                "cpu_ms_per_event": recv_cpu * 1000 / events, "src_cpu_ms": median(src_cpu),
                "idle_cpu_pct": sum(idle.values()) * 100}

    # -- restarts ---------------------------------------------------------------

    def _fdb(self, h) -> dict[str, str]:
        import json
        out = h.run_in_overlay(VNI, ["bridge", "-j", "fdb", "show", "dev", "vxlan0"]).stdout
        return {e["mac"]: e.get("dst") for e in json.loads(out or "[]") if e.get("dst")}

    def _neigh(self, h) -> set[str]:
        import json
        out = h.run_in_overlay(VNI, ["ip", "-j", "neigh", "show", "dev", "vxlan0", "nud", "permanent"]).stdout
        return {e["lladdr"] for e in json.loads(out or "[]") if e.get("lladdr")}

    def _flush(self, h) -> int:
        fdb = self._fdb(h)
        batch = "".join(f"fdb del {mac} dev vxlan0\n" for mac in fdb)
        if batch:
            h.run_in_overlay(VNI, ["bridge", "-batch", "-"], input=batch)
        h.run_in_overlay(VNI, ["ip", "neigh", "flush", "dev", "vxlan0", "nud", "all"])
        if self._fdb(h):
            raise BenchError(f"{h.name}: vxlan0 FDB not empty after the flush")
        return len(fdb)

    def _drift(self, h, drop: int, stale: int) -> tuple[set[str], set[str]]:
        """Delete drop peers' entries and add stale entries no store record backs."""
        fdb = self._fdb(h)
        dropped = set(sorted(fdb)[:drop])
        batch = "".join(f"fdb del {mac} dev vxlan0\n" for mac in dropped)
        bogus = {f"02:ee:00:00:{i // 256:02x}:{i % 256:02x}" for i in range(stale)}
        batch += "".join(f"fdb add {mac} dev vxlan0 dst 10.99.0.250 self permanent\n" for mac in sorted(bogus))
        h.run_in_overlay(VNI, ["bridge", "-batch", "-"], input=batch)
        neigh = "".join(f"neigh replace {ipaddress.ip_address('10.70.250.1') + i} lladdr {mac} dev vxlan0 nud permanent\n"
                        for i, mac in enumerate(sorted(bogus)))
        h.run_in_overlay(VNI, ["ip", "-batch", "-"], input=neigh)
        return dropped, bogus

    def restart(self, h, mode: str) -> dict:
        """mode: 'flush', 'drift' or 'clean'. Times from spawning the plugin."""
        h.kill_plugin()
        want = self.remote_macs(h)
        dropped, bogus = set(), set()
        if mode == "flush":
            self._flush(h)
            dropped = set(want)
        elif mode == "drift":
            dropped, bogus = self._drift(h, drop=max(1, len(want) // 20), stale=20)
        time.sleep(0.3)  # let the listener take the flush's notifications first
        self.watch.forget(dropped | bogus, label=h.name)
        counts0 = self.watch.counted(h.name)
        t0 = time.monotonic()
        h.spawn_plugin(self.etcd.url)
        h.wait_plugin(timeout=60, interval=0.002)
        answering = time.monotonic() - t0
        done = fdb_done = None
        if dropped:
            fdb_done = self.watch.wait_count(h.name, dropped, timeout=30)
            if fdb_done is None:
                raise BenchError(f"{h.name}: restarted plugin did not restore {len(dropped)} FDB entries in 30 s")
            done = fdb_done
            if mode == "flush":  # the neighbours went too: a peer is whole with both
                neigh_done = self.watch.wait_count(h.name, dropped, table="neigh", timeout=30)
                if neigh_done is None:
                    raise BenchError(f"{h.name}: restarted plugin did not restore {len(dropped)} neighbours in 30 s")
                done = max(done, neigh_done)
        if bogus:
            gone = self.watch.wait_count(h.name, bogus, kind="del", timeout=30)
            if gone is None:
                raise BenchError(f"{h.name}: restarted plugin left stale entries in vxlan0 for 30 s")
            done = max(done or 0, gone)
        if mode == "clean":
            time.sleep(2)  # give it time to (needlessly) touch entries
        fdb, neigh = self._fdb(h), self._neigh(h)
        if set(fdb) != want or neigh != want:
            raise BenchError(f"{h.name} after restart ({mode}): the kernel holds {len(fdb)} FDB entries "
                             f"({len(set(fdb) - want)} not in the store, {len(want - set(fdb))} missing) and "
                             f"{len(neigh)} neighbours ({len(neigh - want)} not in the store, {len(want - neigh)} missing)")
        counts = self.watch.counted(h.name)
        return {"mode": mode, "peers": len(want), "restored": len(dropped), "removed": len(bogus),
                "answering_s": answering, "reconciled_s": (done - t0) if done else None,
                "fdb_s": (fdb_done - t0) if fdb_done else None,
                "events": {f"{k[0]} {k[1]}": v - counts0.get(k, 0) for k, v in counts.items() if v - counts0.get(k, 0)}}

    def close(self) -> None:
        self.watch.close()


def run(ctx) -> dict:
    n_hosts = 5 if ctx.quick else 20
    per_host = 20 if ctx.quick else 50
    steps = [per_host // 10 * 2 or 1, per_host // 2, per_host] if ctx.quick else [5, 25, 50]
    probes = 5 if ctx.quick else 10
    restarts = 1 if ctx.quick else 3
    ctx.log(f"scale: {n_hosts} hosts, steps of {[s * n_hosts for s in steps]} peers")
    t0 = time.monotonic()
    cluster = Cluster(ctx, n_hosts)
    ctx.log(f"scale: {n_hosts} plugins up and on the overlay in {time.monotonic() - t0:.1f}s")
    levels = []
    try:
        for step in steps:
            t_fill = time.monotonic()
            lat = cluster.fill(step)
            filled = time.monotonic()
            last = cluster.converged(timeout=120)
            peers = step * n_hosts
            ctx.log(f"scale: {peers} peers made in {filled - t_fill:.1f}s, on every host "
                    f"{last - filled:+.1f}s after the last call; probing")
            p = cluster.probe(probes, rotate=len(levels))
            levels.append({"peers": peers, "fill_s": filled - t_fill, "converged_after_s": last - filled,
                           "ipam": summary(lat["RequestAddress"]), "create": summary(lat["CreateEndpoint"]),
                           "probe_all": summary(p["all_hosts"]), "probe_median": summary(p["median_host"]),
                           "probe_from_return": summary(p["from_return"]), "probe_call": summary(p["call"]),
                           "cpu_ms_per_event": p["cpu_ms_per_event"], "idle_cpu_pct": p["idle_cpu_pct"],
                           "src_cpu_ms": p["src_cpu_ms"],
                           "worker_rss_mb": median(max(rss_kb(pid)[0] for pid in h.plugin_pids()) / 1024
                                                   for h in cluster.hosts)})
        memory = []
        for h in cluster.hosts:
            pids = h.plugin_pids()
            rss = [rss_kb(p) for p in pids]
            memory.append({"host": h.name, "rss_mb": sum(r for r, _ in rss) / 1024,
                           "pss_mb": sum(p for _, p in rss) / 1024,
                           "worker_rss_mb": max((r for r, _ in rss), default=0) / 1024, "procs": len(pids)})
        ctx.log("scale: memory read; restarting plugins")
        restart_results = []
        for i in range(restarts):
            h = cluster.hosts[1 + i]
            for mode in ("flush", "drift", "clean"):
                r = cluster.restart(h, mode)
                restart_results.append(r)
                ctx.log(f"scale: restart {mode} on {h.name}: answering {r['answering_s']:.2f}s, "
                        f"reconciled {fmt(r['reconciled_s'], 2)}s, netlink {r['events']}")
    finally:
        cluster.close()

    # -- report ---------------------------------------------------------------
    total = n_hosts * per_host
    rows = ["| peers | fill: RequestAddress p50 / p99 | fill: CreateEndpoint p50 / p99 | probe: CreateEndpoint call p50 | "
            "probe: sent -> FDB entry on every host, p50 / p99 | median host, p50 | returned -> on every host, p50 | "
            "CPU per peer event, receiving host | CPU per probe, creating host (p50) | all plugins' CPU when idle | worker RSS (median host) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        rows.append(
            f"| {lv['peers']} | {fmt(lv['ipam']['p50'], 1)} / {fmt(lv['ipam']['p99'], 1)} ms | "
            f"{fmt(lv['create']['p50'], 1)} / {fmt(lv['create']['p99'], 1)} ms | {fmt(lv['probe_call']['p50'], 1)} ms | "
            f"{fmt(lv['probe_all']['p50'], 1)} / {fmt(lv['probe_all']['p99'], 1)} ms | "
            f"{fmt(lv['probe_median']['p50'], 1)} ms | {fmt(lv['probe_from_return']['p50'], 1)} ms | "
            f"{fmt(lv['cpu_ms_per_event'], 2)} ms | {fmt(lv['src_cpu_ms'], 1)} ms | {fmt(lv['idle_cpu_pct'], 1)} % of a core | "
            f"{fmt(lv['worker_rss_mb'], 1)} MB |")
    fills = ["| step | endpoints made (all hosts in parallel) | every host had every peer, after the last call |", "|---:|---:|---:|"]
    prev = 0
    for lv in levels:
        fills.append(f"| {prev} -> {lv['peers']} | {lv['fill_s']:.1f} s | {lv['converged_after_s'] * 1000:+.0f} ms |")
        prev = lv["peers"]
    rss = [m["rss_mb"] for m in memory]
    pss = [m["pss_mb"] for m in memory]
    worker = [m["worker_rss_mb"] for m in memory]
    mem_md = (f"Plugin memory at {total} peers, over {len(memory)} hosts (gunicorn master + worker): "
              f"PSS median {fmt(median(pss), 1)} MB, max {fmt(max(pss), 1)} MB (what the host spends: pages the "
              f"two processes share since the fork counted once); RSS of the two summed median {fmt(median(rss), 1)} MB, "
              f"max {fmt(max(rss), 1)} MB (shared pages counted twice); the worker alone RSS median "
              f"{fmt(median(worker), 1)} MB.")
    rrows = ["| restart | host | remote peers | peers restored | stale entries removed | answering again | every FDB entry back | kernel matches the store (FDB and neighbours) | netlink notifications on that host |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(restart_results):
        rrows.append(f"| {r['mode']} | {i // 3 + 2} | {r['peers']} | {r['restored']} | {r['removed']} | "
                     f"{r['answering_s']:.2f} s | {fmt(r['fdb_s'], 2, ' s')} | "
                     f"{fmt(r['reconciled_s'], 2, ' s') if r['reconciled_s'] else '(unchanged)'} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(r['events'].items())) or 'none'} |")
    flush_times = [r["reconciled_s"] for r in restart_results if r["mode"] == "flush"]
    rec = median(flush_times)
    first, lastlv = levels[0], levels[-1]
    growth = (lastlv["probe_all"]["p50"] / first["probe_all"]["p50"]) if first["probe_all"]["p50"] else None
    cpu_growth = (lastlv["cpu_ms_per_event"] / first["cpu_ms_per_event"]) if first["cpu_ms_per_event"] else None
    md = (
        f"{n_hosts} hosts without Docker on one etcd, one overlay (VNI {VNI}, {SUBNET}), endpoints made "
        f"over the sockets (RequestAddress + CreateEndpoint, all hosts in parallel) in steps to {total} peers; "
        f"{probes} probe endpoints per step. Fill: latency of the calls while all hosts add endpoints at "
        "once. Probe: one endpoint at a time; times from the bench's clock to the netlink notification "
        "in the last (and the median) other host's overlay namespace; CPU from each plugin's threads' "
        "schedstat, less its idle rate: per peer event (an add or a remove) on a host that only receives "
        "it, and per probe (RequestAddress .. ReleaseAddress) on the host that makes it.\n\n"
        + "\n".join(rows) + "\n\n" + "\n".join(fills) + "\n\n" + mem_md + "\n\n"
        + "Restarts at full size (SIGKILL of the whole plugin, then `pyoverlay serve` again; times from "
        "the new process's start):\n\n" + "\n".join(rrows) + "\n"
    )
    headline = [
        ("plugin memory per host at %d peers (master + worker)" % total,
         f"PSS median {fmt(median(pss), 0)} MB, max {fmt(max(pss), 0)} MB; RSS summed {fmt(median(rss), 0)} MB "
         f"(worker alone {fmt(median(worker), 0)} MB)",
         f"< {GOAL_RSS_MB} MB", max(pss) < GOAL_RSS_MB),
        (f"restarted host restores {total - per_host} peers (flushed FDB)",
         f"median {fmt(rec, 2)} s, max {fmt(max(flush_times), 2)} s", f"< {GOAL_RESTART_S:g} s",
         rec is not None and max(flush_times) < GOAL_RESTART_S),
        (f"CreateEndpoint sent -> FDB entry on all {n_hosts - 1} other hosts, p50 at "
         + ", ".join(str(lv["peers"]) for lv in levels) + " peers",
         ", ".join(f"{fmt(lv['probe_all']['p50'], 1)}" for lv in levels) + " ms; CPU/event "
         + ", ".join(f"{fmt(lv['cpu_ms_per_event'], 2)}" for lv in levels) + " ms per receiving host",
         "flat", growth is not None and growth < 1.5 and cpu_growth is not None and cpu_growth < 1.5),
    ]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline,
            "data": {"levels": levels, "memory": memory, "restarts": restart_results}}
