"""Side by side with Docker's own overlay (issue 14): pyoverlay and Docker's
swarm overlay on the same two hosts, in one run, the variants interleaved.

Host A runs `docker swarm init` (data path on UDP 4790, pyoverlay's VXLAN
keeps 4789), host B joins as a worker, and A makes an attachable overlay
that B's engine may attach containers to, as users of a standalone
container overlay do. pyoverlay runs on the same engines with etcd.

Printed, from rounds whose order rotates:
  * one TCP stream (iperf3, as bench/throughput.py measures it) from a
    container on B to one on A, over pyoverlay and over the swarm overlay,
    each as a ratio to the underlay between the two hosts;
  * `docker run -d` on A on the default bridge, a user-defined bridge,
    pyoverlay (each gateway mode the plugin offers) and the swarm overlay, as
    ratios to the default bridge and to the user-defined bridge.
"""

from __future__ import annotations

import time

from bench.stats import fmt, median, ratio, summary
from bench.throughput import IPERF_IMAGE, PORT, Pair, build_iperf_tar, ensure_network, make_pair
from tests.hosts import IMAGE

NAME = "swarm"
TITLE = "Side by side with Docker's swarm overlay"
DOCKERRUN_GOAL, THROUGHPUT_GOAL = 1.10, 0.92  # issue 14's goals
DATA_PATH_PORT = 4790  # Docker's overlay's VXLAN port here; pyoverlay's stays 4789
SWARM_NET, SWARM_SUBNET = "swov", "10.64.0.0/24"
PYO_NET, PYO_SUBNET, PYO_VNI = "pyov", "10.63.0.0/24", 7100


def swarm_up(a, b) -> None:
    """A manager on A, B a worker; an attachable overlay made on A."""
    a.docker("swarm", "init", "--advertise-addr", a.addr, "--listen-addr", f"{a.addr}:2377",
             "--data-path-port", str(DATA_PATH_PORT), timeout=120)
    token = a.docker("swarm", "join-token", "-q", "worker")
    b.docker("swarm", "join", "--advertise-addr", b.addr, "--token", token, f"{a.addr}:2377", timeout=120)
    a.docker("network", "create", "-d", "overlay", "--attachable", "--subnet", SWARM_SUBNET, SWARM_NET)


def swarm_pair(a, b) -> Pair:
    """iperf3 server on A and client on B, on the swarm overlay."""
    pair = Pair(a, b, SWARM_NET)
    a.docker("run", "-d", "--name", f"srv-{SWARM_NET}", "--network", SWARM_NET, IPERF_IMAGE,
             "iperf3", "-s", "-p", str(PORT))
    b.docker("run", "-d", "--name", f"cli-{SWARM_NET}", "--network", SWARM_NET, IPERF_IMAGE, "sleep", "1d",
             timeout=120)  # B learns the network from the manager on first use
    pair.server_ip = a.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{SWARM_NET}").IPAddress}}}}',
                              f"srv-{SWARM_NET}")
    b.docker("exec", f"cli-{SWARM_NET}", "ping", "-c", "1", "-W", "5", pair.server_ip)
    return pair


def throughput_rounds(pairs: dict[str, Pair], n: int, seconds: int) -> dict[str, list[float]]:
    """n rounds of one run per kind ("underlay" and each overlay), the order rotating."""
    kinds = ["underlay", *pairs]
    gbps: dict[str, list[float]] = {k: [] for k in kinds}
    first = next(iter(pairs.values()))
    for i in range(n):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            r = first.underlay(seconds) if kind == "underlay" else pairs[kind].overlay(seconds)
            gbps[kind].append(r["gbps"])
    return gbps


def dockerrun_rounds(host, variants: dict[str, list[str]], n: int, warm: int) -> dict[str, list[float]]:
    """`docker run -d` wall time per variant (ms), rounds rotating, each container removed before the next."""
    names = list(variants)
    runs: dict[str, list[float]] = {v: [] for v in names}
    for i in range(warm + n):
        for variant in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            cid = host.docker("run", "-d", *variants[variant], IMAGE, "sleep", "3600", timeout=120)
            took = (time.perf_counter() - t0) * 1000
            host.docker("rm", "-f", cid)
            if i >= warm:
                runs[variant].append(took)
    return runs


def pyoverlay_variants(a, b) -> dict[str, list[str]]:
    """pyoverlay networks for docker run: the default (egress through
    docker_gwbridge) and --internal (no way out, so no second endpoint)."""
    variants = {"pyoverlay": ["--network", PYO_NET]}
    args = ["-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--internal", "--subnet", "10.65.0.0/24"]
    for h in (a, b):
        ensure_network(h, "pyint", args)
    variants["pyoverlay --internal"] = ["--network", "pyint"]
    return variants


def run(ctx) -> dict:
    n_tp, seconds = (2, 3) if ctx.quick else (6, 4)
    n_run, warm = (5, 1) if ctx.quick else (20, 2)
    etcd = ctx.etcd()
    a, b = ctx.docker_host(1), ctx.docker_host(2)
    ctx._tp_hosts = (a, b)  # bench.throughput.make_pair's hosts
    tar = build_iperf_tar(ctx.workdir)
    for h in (a, b):
        h.start_plugin(etcd.url)
        h.docker("import", "-c", 'CMD ["sh"]', str(tar), IPERF_IMAGE)
        h.run(["iperf3", "-s", "-D", "-p", str(PORT)])  # the underlay's server, in the host namespace
    ctx.log("swarm: swarm init on A, join on B, an attachable overlay")
    swarm_up(a, b)
    pairs = {"pyoverlay": make_pair(ctx, PYO_NET, PYO_SUBNET, PYO_VNI), "swarm overlay": swarm_pair(a, b)}
    ctx.log(f"swarm: throughput, {n_tp} rounds of underlay, {', '.join(pairs)}")
    gbps = throughput_rounds(pairs, n_tp, seconds)
    for pair in pairs.values():
        pair.a.docker("rm", "-f", f"srv-{pair.network}")
        pair.b.docker("rm", "-f", f"cli-{pair.network}")

    a.docker("network", "create", "-d", "bridge", "--subnet", "10.66.0.0/24", "benchbr")
    variants = {"bridge": [], "bridge, user-defined": ["--network", "benchbr"], **pyoverlay_variants(a, b),
                "swarm overlay": ["--network", SWARM_NET]}
    ctx.log(f"swarm: docker run -d, {warm} warm-up + {n_run} rounds of {list(variants)}")
    runs = dockerrun_rounds(a, variants, n_run, warm)
    b.docker_proc("swarm", "leave", "--force", check=False)
    a.docker_proc("swarm", "leave", "--force", check=False)

    under = median(gbps["underlay"])
    tp_rows = ["| path | one TCP stream p50 | min | max | ratio to underlay |", "|---|---:|---:|---:|---:|"]
    for kind, xs in gbps.items():
        tp_rows.append(f"| {kind} | {fmt(median(xs), 2)} Gbit/s | {fmt(min(xs), 2)} | {fmt(max(xs), 2)} | "
                       f"{fmt(ratio(median(xs), under), 3)} |")
    bridge, user = median(runs["bridge"]), median(runs["bridge, user-defined"])
    run_rows = ["| network | `docker run -d` p50 | p90 | ratio to bridge | ratio to user-defined bridge |",
                "|---|---:|---:|---:|---:|"]
    for v, xs in runs.items():
        s = summary(xs)
        run_rows.append(f"| {v} | {fmt(s['p50'], 0)} ms | {fmt(s['p90'], 0)} ms | {fmt(ratio(s['p50'], bridge), 2)} | "
                        f"{fmt(ratio(s['p50'], user), 2)} |")
    tp_pyo, tp_swarm = ratio(median(gbps["pyoverlay"]), under), ratio(median(gbps["swarm overlay"]), under)
    best = min((v for v in runs if v.startswith("pyoverlay")), key=lambda v: median(runs[v]))
    run_pyo, run_swarm = ratio(median(runs["pyoverlay"]), bridge), ratio(median(runs["swarm overlay"]), bridge)
    md = (
        "Two engines in namespace hosts on one underlay bridge; host A a swarm manager, host B a worker "
        f"(Docker's overlay on UDP {DATA_PATH_PORT}, an attachable network), pyoverlay on etcd on the same "
        f"engines. Throughput: {n_tp} rounds of one {seconds} s iperf3 stream per path (B to A), the order "
        f"rotating. `docker run -d` on A: {n_run} rounds after {warm} warm-up rounds, one run per network in "
        "rotating order, each container removed before the next.\n\n"
        + "\n".join(tp_rows) + "\n\n" + "\n".join(run_rows) + "\n\n"
        f"**Throughput over the underlay: pyoverlay {fmt(tp_pyo, 3)}, Docker's swarm overlay {fmt(tp_swarm, 3)}** "
        f"(goal at least {THROUGHPUT_GOAL}). **`docker run -d` over the default bridge: pyoverlay "
        f"{fmt(run_pyo, 2)}, Docker's swarm overlay {fmt(run_swarm, 2)}** (goal at most {DOCKERRUN_GOAL}; "
        f"pyoverlay's fastest mode here: {best}).\n"
    )
    headline = [
        ("one TCP stream / underlay, pyoverlay vs swarm overlay", f"{fmt(tp_pyo, 3)} vs {fmt(tp_swarm, 3)}",
         f">= {THROUGHPUT_GOAL}", tp_pyo is not None and tp_pyo >= THROUGHPUT_GOAL),
        ("docker run -d / bridge, pyoverlay vs swarm overlay", f"{fmt(run_pyo, 2)} vs {fmt(run_swarm, 2)} "
         f"({fmt(median(runs['pyoverlay']), 0)} / {fmt(median(runs['swarm overlay']), 0)} / {fmt(bridge, 0)} ms)",
         f"<= {DOCKERRUN_GOAL}", run_pyo is not None and run_pyo <= DOCKERRUN_GOAL),
    ]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline,
            "data": {"gbps": gbps, "runs": runs}}
