"""Cluster IPAM and control plane at scale (issue 13), one command:

    .venv/bin/python -m bench.ipamscale --hosts 20,50,100 --endpoints 100

For each host count N: N hosts without Docker (bench.env.PlainHost: a network
namespace each on the underlay, one `pyoverlay serve` each) on one etcd, all on
one overlay on a /16 (bench.scale.Cluster), then:

- RequestAddress alone: one host, one caller, 50 in a row (cluster idle);
- RequestAddress in a burst: every host asks 25 addresses through 4 callers at
  once (N x 25 requests; the callers run in worker processes so the bench's own
  GIL does not queue them); duplicates counted from the answers and from etcd;
- fill: every host makes --endpoints endpoints (RequestAddress + CreateEndpoint,
  all hosts in parallel), then waits until every host has every peer;
- convergence: probe endpoints, one at a time, CreateEndpoint on one host to the
  FDB entry on all others (p50/p99), and CPU per peer event on a receiving host;
- memory: PSS per plugin (gunicorn master + worker, /proc/<pid>/smaps_rollup);
- restart: one plugin SIGKILLed, its vxlan0 FDB and neighbours flushed, started
  again: time until the kernel holds all its peers again;
- etcd: requests per second (gRPC calls handled, from etcd's /metrics) in the
  burst, the fill and idle, and the database size.

Run it under the e2e lock (it uses the harness's fixed namespace names):
flock /tmp/pyo-e2e.lock .venv/bin/python -m bench.ipamscale ...
Prints a markdown report (and --json FILE for the raw figures).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from typing import Optional

from bench import calls
from bench.env import UNDERLAY_ADDR, UNDERLAY_NETNS, BenchError, PluginClient, Underlay, make_workdir, rss_kb, run_cmd
from bench.scale import SUBNET, Cluster
from bench.stats import fmt, median, summary

GOAL_BURST_MS = {20: 50.0, 100: 100.0}
BURST_PER_HOST = 25
BURST_CALLERS = 4


# -- the burst, in worker processes -------------------------------------------------

def _burst_slice(job: tuple[list[tuple[str, str]], int, int, float]) -> tuple[list[float], list[str], list[str]]:
    """Every (socket, pool) of the slice asks `per_host` addresses through
    `callers` threads, all starting at wall-clock `start_at`."""
    hosts, per_host, callers, start_at = job
    lat, got, errors = [], [], []
    lock = threading.Lock()

    def caller(sock: str, pool: str, n: int) -> None:
        client = PluginClient(sock, timeout=60)
        client.call("Plugin.Activate")  # connect before the start
        time.sleep(max(0.0, start_at - time.time()))
        for _ in range(n):
            t0 = time.perf_counter()
            answer, _ = client.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": None})
            took = (time.perf_counter() - t0) * 1000
            with lock:
                if "Error" in answer:
                    errors.append(answer["Error"])
                else:
                    lat.append(took)
                    got.append(answer["Address"])
        client.close()

    threads = []
    for sock, pool in hosts:
        for c in range(callers):
            n = per_host // callers + (1 if c < per_host % callers else 0)
            threads.append(threading.Thread(target=caller, args=(sock, pool, n)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, got, errors


def burst(cluster: Cluster, per_host: int, callers: int, workers: int, only=None) -> dict:
    hosts = [(str(h.socket_path), cluster.nets[h.name].pool_id) for h in (only or cluster.hosts)]
    start_at = time.time() + 3.0  # the workers start and connect first
    jobs = [(hosts[i::workers], per_host, callers, start_at) for i in range(workers) if hosts[i::workers]]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        parts = pool.map(_burst_slice, jobs)
    lat = [x for p in parts for x in p[0]]
    got = [x for p in parts for x in p[1]]
    errors = [x for p in parts for x in p[2]]
    dups = sum(n - 1 for n in Counter(got).values() if n > 1)
    return {"lat": lat, "addresses": got, "errors": errors, "duplicates": dups, "seconds": time.time() - start_at}


# -- the fill, with bounded parallelism ------------------------------------------------

#: Endpoints made at once across the cluster. All hosts at once (bench.scale's
#: fill) starves etcd of CPU from 50 hosts up on 2 cores: every endpoint is a
#: peer event on every host, and etcd stops answering within its 3 s.
FILL_CALLERS = 8


def fill(cluster: Cluster, per_host: int, callers: int) -> tuple[dict[str, list[float]], list[str]]:
    from concurrent.futures import ThreadPoolExecutor

    lat = {"RequestAddress": [], "CreateEndpoint": []}
    errors: list[str] = []
    lock = threading.Lock()

    def work(h) -> None:
        client = PluginClient(str(h.socket_path), timeout=60)
        net = cluster.nets[h.name]
        while len(cluster.endpoints[h.name]) < per_host:
            try:
                ep = calls.new_endpoint(client, net)
            except (KeyError, BenchError) as e:  # a refused call: counted, the fill goes on
                with lock:
                    errors.append(f"{h.name}: {e!r}")
                    if len(errors) > 50:
                        raise BenchError(f"fill: too many refused calls, first: {errors[0]}") from None
                continue
            with lock:
                cluster.endpoints[h.name].append(ep)
                for k in lat:
                    lat[k].append(ep.timings[k] * 1000)
        client.close()

    with ThreadPoolExecutor(min(callers, len(cluster.hosts))) as pool:
        list(pool.map(work, cluster.hosts))
    return lat, errors


# -- etcd's own figures ------------------------------------------------------------

def etcd_metrics(etcd) -> dict[str, float]:
    out = run_cmd(["ip", "netns", "exec", UNDERLAY_NETNS, "curl", "-s", "--max-time", "10",
                   f"http://{UNDERLAY_ADDR}:{etcd.client_port}/metrics"]).stdout
    handled = db = in_use = 0.0
    for line in out.splitlines():
        if line.startswith("grpc_server_handled_total{"):
            handled += float(line.rsplit(" ", 1)[1])
        elif line.startswith("etcd_mvcc_db_total_size_in_bytes "):
            db = float(line.rsplit(" ", 1)[1])
        elif line.startswith("etcd_mvcc_db_total_size_in_use_in_bytes "):
            in_use = float(line.rsplit(" ", 1)[1])
    return {"handled": handled, "db_bytes": db, "db_in_use_bytes": in_use, "at": time.monotonic()}


def rate(m0: dict, m1: dict) -> float:
    return (m1["handled"] - m0["handled"]) / max(1e-6, m1["at"] - m0["at"])


def store_addresses(etcd) -> list[str]:
    import base64
    start = b"/pyoverlay/addresses/"
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                 "range_end": base64.b64encode(end).decode(), "keys_only": True},
                        timeout=30)
    return [base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1] for kv in data.get("kvs", [])]


def store_blocks(etcd) -> Counter:
    import base64
    start = b"/pyoverlay/blocks/"
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                 "range_end": base64.b64encode(end).decode()}, timeout=30)
    return Counter(json.loads(base64.b64decode(kv["value"]))["host"] for kv in data.get("kvs", []))


# -- one size ----------------------------------------------------------------------

def measure(ctx, n_hosts: int, per_host: int, probes: int, workers: int, result: Optional[dict] = None) -> dict:
    """result (given): filled in as figures come, so a late failure keeps the earlier ones."""
    t0 = time.monotonic()
    cluster = Cluster(ctx, n_hosts)
    result = {} if result is None else result
    result.update(hosts=n_hosts, endpoints_per_host=per_host)
    # etcd stands for a cluster's own etcd machines: ahead of the 100 plugins for CPU.
    os.setpriority(os.PRIO_PROCESS, cluster.etcd.pid, -10)
    try:
        result["start_s"] = time.monotonic() - t0
        ctx.log(f"{n_hosts} hosts: plugins up and on the overlay in {result['start_s']:.1f}s")
        time.sleep(2)
        m_idle0 = etcd_metrics(cluster.etcd)
        time.sleep(5)
        m_idle1 = etcd_metrics(cluster.etcd)
        result["etcd_idle_rps"] = rate(m_idle0, m_idle1)

        h0 = cluster.hosts[0]
        alone = []
        for _ in range(50):
            address, took = calls.request_address(h0.client, cluster.nets[h0.name])
            alone.append(took * 1000)
            h0.client.call("IpamDriver.ReleaseAddress", {"PoolID": cluster.nets[h0.name].pool_id,
                                                         "Address": address.split("/")[0]})
        result["alone"] = summary(alone)
        ctx.log(f"{n_hosts} hosts: RequestAddress alone p50 {fmt(result['alone']['p50'])} ms, "
                f"p99 {fmt(result['alone']['p99'])} ms")

        # One host's burst while the others are idle: what a host's own CPU costs
        # (on real machines every host has its own; here all share 2 cores).
        one = burst(cluster, BURST_PER_HOST, BURST_CALLERS, 1, only=cluster.hosts[-1:])
        result["burst_one_host"] = {**summary(one["lat"]), "duplicates": one["duplicates"], "errors": len(one["errors"])}
        ctx.log(f"{n_hosts} hosts: one host's burst of {BURST_PER_HOST}: p50 {fmt(result['burst_one_host']['p50'])} ms, "
                f"p99 {fmt(result['burst_one_host']['p99'])} ms")
        from bench.env import cpu_seconds
        pids = cluster.plugin_pids() + [cluster.etcd.pid]
        cpu0, etcd_cpu0 = cpu_seconds(pids), cpu_seconds([cluster.etcd.pid])
        m0 = etcd_metrics(cluster.etcd)
        b = burst(cluster, BURST_PER_HOST, BURST_CALLERS, workers)
        cpu_per_request = (cpu_seconds(pids) - cpu0) * 1000 / max(1, len(b["addresses"]))
        etcd_cpu_per_request = (cpu_seconds([cluster.etcd.pid]) - etcd_cpu0) * 1000 / max(1, len(b["addresses"]))
        m1 = etcd_metrics(cluster.etcd)
        stored = store_addresses(cluster.etcd)
        blocks = store_blocks(cluster.etcd)
        result["burst"] = {**summary(b["lat"]), "requests": n_hosts * BURST_PER_HOST, "answered": len(b["addresses"]),
                           "errors": len(b["errors"]), "error_sample": b["errors"][:3],
                           "duplicates": b["duplicates"],
                           "stored_duplicates": len(stored) - len(set(stored)),
                           "etcd_rps": (m1["handled"] - m0["handled"]) / max(1e-6, b["seconds"]),
                           "etcd_requests": m1["handled"] - m0["handled"],
                           "blocks": sum(blocks.values()), "hosts_with_blocks": len(blocks),
                           "seconds": b["seconds"], "per_second": len(b["addresses"]) / max(1e-6, b["seconds"]),
                           "cpu_ms_per_request": cpu_per_request, "etcd_cpu_ms_per_request": etcd_cpu_per_request}
        ctx.log(f"{n_hosts} hosts: burst {n_hosts}x{BURST_PER_HOST}: p50 {fmt(result['burst']['p50'])} ms, "
                f"p99 {fmt(result['burst']['p99'])} ms, {b['duplicates']} duplicates, {len(b['errors'])} errors, "
                f"{sum(blocks.values())} blocks")

        result["pss_after_burst_mb"] = median(sum(rss_kb(pid)[1] for pid in h.plugin_pids()) / 1024
                                              for h in cluster.hosts)
        m0 = etcd_metrics(cluster.etcd)
        t_fill = time.monotonic()
        lat, fill_errors = fill(cluster, per_host, FILL_CALLERS)
        result["fill_errors"] = fill_errors
        filled = time.monotonic()
        last = cluster.converged(timeout=600)
        m1 = etcd_metrics(cluster.etcd)
        result["fill"] = {"seconds": filled - t_fill, "converged_after_s": last - filled, "errors": len(fill_errors),
                          "request_address": summary(lat["RequestAddress"]),
                          "create_endpoint": summary(lat["CreateEndpoint"]), "etcd_rps": rate(m0, m1)}
        ctx.log(f"{n_hosts} hosts: {n_hosts * per_host} endpoints in {filled - t_fill:.1f}s, everywhere "
                f"{last - filled:+.1f}s after the last call")

        p = cluster.probe(probes, rotate=0)
        result["convergence"] = {**summary(p["all_hosts"]), "median_host_p50": median(p["median_host"]),
                                 "cpu_ms_per_event": p["cpu_ms_per_event"], "src_cpu_ms": p["src_cpu_ms"],
                                 "idle_cpu_pct": p["idle_cpu_pct"]}
        ctx.log(f"{n_hosts} hosts: convergence p50 {fmt(result['convergence']['p50'])} ms, "
                f"p99 {fmt(result['convergence']['p99'])} ms, {fmt(p['cpu_ms_per_event'], 2)} ms CPU per event")

        pss = []
        for h in cluster.hosts:
            pss.append(sum(rss_kb(pid)[1] for pid in h.plugin_pids()) / 1024)
        result["pss_mb"] = {"median": median(pss), "max": max(pss)}
        m = etcd_metrics(cluster.etcd)
        result["etcd_db_mb"] = m["db_bytes"] / 2**20
        result["etcd_db_in_use_mb"] = m["db_in_use_bytes"] / 2**20

        r = cluster.restart(cluster.hosts[1], "flush")
        result["restart"] = {"peers": r["peers"], "answering_s": r["answering_s"], "restored_s": r["reconciled_s"]}
        ctx.log(f"{n_hosts} hosts: restart (flushed) {r['peers']} peers back in {fmt(r['reconciled_s'], 2)} s; "
                f"PSS median {fmt(median(pss))} MB")
    except Exception:
        # What the plugins said about it (their logs go with the work directory).
        for h in cluster.hosts:
            try:
                lines = [l for l in h.log_path.read_text(errors="replace").splitlines()
                         if " ERROR " in l or " WARNING " in l or "refused" in l or "Error" in l]
            except OSError:
                continue
            if lines:
                ctx.log(f"{h.name} log:\n  " + "\n  ".join(lines[-5:]))
        raise
    finally:
        cluster.close()
    return result


# -- report ------------------------------------------------------------------------

def report(results: list[dict], command: str) -> str:
    rows = ["| hosts | endpoints | RequestAddress alone p50 / p99 | one host's burst (25, 4 callers) p50 / p99 | "
            "burst (hosts x 25, 4 callers each) p50 / p99 | burst rate, CPU per request (plugins + etcd; of it etcd) | "
            "duplicates | burst errors | blocks after burst | convergence p50 / p99 | CPU per peer event | "
            "restart (flushed), all peers back | PSS per plugin median / max | etcd req/s idle / burst / fill | etcd DB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b, c, o = r["burst"], r["convergence"], r["burst_one_host"]
        rows.append(
            f"| {r['hosts']} | {r['hosts'] * r['endpoints_per_host']} | {fmt(r['alone']['p50'])} / {fmt(r['alone']['p99'])} ms | "
            f"{fmt(o['p50'])} / {fmt(o['p99'])} ms | "
            f"{fmt(b['p50'])} / {fmt(b['p99'])} ms | {b['per_second']:.0f}/s, {fmt(b['cpu_ms_per_request'])} ms ({fmt(b.get('etcd_cpu_ms_per_request', 0))} etcd) | {b['duplicates']} (etcd: {b['stored_duplicates']}) | {b['errors']} | "
            f"{b['blocks']} on {b['hosts_with_blocks']} hosts | {fmt(c['p50'])} / {fmt(c['p99'])} ms | "
            f"{fmt(c['cpu_ms_per_event'], 2)} ms | {fmt(r['restart']['restored_s'], 2)} s ({r['restart']['peers']} peers) | "
            f"{fmt(r['pss_mb']['median'])} / {fmt(r['pss_mb']['max'])} MB | "
            f"{r['etcd_idle_rps']:.0f} / {b['etcd_rps']:.0f} / {r['fill']['etcd_rps']:.0f} | {fmt(r['etcd_db_mb'])} MB |")
    fills = [f"| hosts | fill time ({FILL_CALLERS} callers across the cluster) | fill: RequestAddress p50 / p99 | "
             "fill: CreateEndpoint p50 / p99 | refused calls | every host had every peer after the last call |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f = r["fill"]
        fills.append(f"| {r['hosts']} | {f['seconds']:.1f} s | {fmt(f['request_address']['p50'])} / "
                     f"{fmt(f['request_address']['p99'])} ms | {fmt(f['create_endpoint']['p50'])} / "
                     f"{fmt(f['create_endpoint']['p99'])} ms | {f.get('errors', 0)} | {f['converged_after_s'] * 1000:+.0f} ms |")
    return (f"`{command}` (one etcd, one overlay on {SUBNET}, hosts as network namespaces without Docker)\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(fills) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    from bench.main import Context, code_under_test  # noqa: F401  (same harness as bench/run)
    from tests.hosts import sweep_leftovers

    parser = argparse.ArgumentParser(prog="python -m bench.ipamscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="20,50,100", help="host counts, comma-separated (default %(default)s)")
    parser.add_argument("--endpoints", default="100",
                        help="endpoints per host, one count for every size or one per --hosts entry (default %(default)s)")
    parser.add_argument("--probes", type=int, default=20, help="convergence probes per size (default %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="processes that drive the burst (default %(default)s)")
    parser.add_argument("--json", help="write the raw figures to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: hosts are network namespaces")
    sizes = [int(x) for x in args.hosts.split(",") if x]
    per_host = [int(x) for x in args.endpoints.split(",") if x]
    if len(per_host) == 1:
        per_host *= len(sizes)
    if len(per_host) != len(sizes):
        parser.error("--endpoints: one count, or one per --hosts entry")
    if any(not 1 < n <= 200 for n in sizes):
        parser.error("--hosts: each count from 2 to 200 (the underlay is a /24)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = f"python -m bench.ipamscale --hosts {args.hosts} --endpoints {args.endpoints}"
    results = []
    from bench.env import PLUGIN_EXE
    for n, endpoints in zip(sizes, per_host):
        sweep_leftovers()
        workdir = make_workdir()
        underlay = Underlay(workdir / "underlay")
        ctx = Context(False, workdir, underlay, PLUGIN_EXE)
        partial = {}
        try:
            with ctx.stack:
                ctx.stack.callback(shutil.rmtree, workdir, ignore_errors=True)
                ctx.stack.callback(underlay.close)
                underlay.setup()
                partial: dict = {}
                results.append(measure(ctx, n, endpoints, args.probes, args.workers, partial))
        except Exception as e:  # noqa: BLE001 - the next size still runs
            print(f"{n} hosts: FAILED: {e!r}", file=sys.stderr)
            results.append({**partial, "hosts": n, "error": repr(e)})
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    ok = [r for r in results if "error" not in r]
    print(report(ok, command) if ok else "no size finished")
    for r in results:
        if "error" in r:
            print(f"{r['hosts']} hosts: FAILED: {r['error']}")
    for r in ok:
        goal = GOAL_BURST_MS.get(r["hosts"])
        if goal:
            met = r["burst"]["p99"] is not None and r["burst"]["p99"] < goal and r["burst"]["duplicates"] == 0
            print(f"{r['hosts']} hosts: burst p99 {fmt(r['burst']['p99'])} ms (goal < {goal:g} ms, no duplicate): "
                  f"{'met' if met else 'NOT MET'}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
