"""Side by side with Docker's own overlay (issue 14): pyoverlay and Docker's
swarm overlay on the same two hosts, in one run, the variants interleaved.

Host A runs `docker swarm init` (data path on UDP 4790, pyoverlay's VXLAN
keeps 4789), host B joins as a worker, and A makes an attachable overlay
that B's engine may attach containers to, as users of a standalone
container overlay do. pyoverlay runs on the same engines with etcd.

Printed, from rounds whose order rotates, once per engine installed (Debian
12's 20.10 and the current one), each on fresh hosts:
  * one TCP stream (iperf3, as bench/throughput.py measures it) from a
    container on B to one on A, over pyoverlay (VXLAN and direct mode) and
    over the swarm overlay, each as a ratio to the underlay between the two
    hosts;
  * `docker run -d` on A on the default bridge, a user-defined bridge,
    pyoverlay (each gateway mode the plugin offers) and the swarm overlay, as
    ratios to the default bridge and to the user-defined bridge.
"""

from __future__ import annotations

import os
import time

from bench.stats import fmt, median, ratio, summary
from bench.throughput import IPERF_IMAGE, PORT, Pair, build_iperf_tar, ensure_network, make_pair
from tests.engines import ENGINE_ENV, engine_root
from tests.hosts import IMAGE

NAME = "swarm"
TITLE = "Side by side with Docker's swarm overlay"
DOCKERRUN_GOAL, THROUGHPUT_GOAL, DIRECT_GOAL = 1.10, 0.92, 0.97  # issue 14's goals
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
    """pyoverlay networks for docker run, one per mode: the default (egress
    through docker_gwbridge), --internal (no way out, so no second
    endpoint), -o gateway=pyoverlay (its own way out, no second endpoint)
    and direct mode (-o encap=never, routed between hosts)."""
    variants = {"pyoverlay": ["--network", PYO_NET]}
    for label, net, subnet, opts in (("pyoverlay --internal", "pyint", "10.65.0.0/24", ["--internal"]),
                                     ("pyoverlay -o gateway=pyoverlay", "pygw", "10.67.0.0/24",
                                      ["-o", "gateway=pyoverlay"]),
                                     ("pyoverlay -o encap=never", "pydir", "10.68.0.0/24",
                                      ["-o", "encap=never"])):
        args = ["-d", "pyoverlay", "--ipam-driver", "pyoverlay", *opts, "--subnet", subnet]
        for h in (a, b):
            ensure_network(h, net, args)
        variants[label] = ["--network", net]
    return variants


def engines() -> list[tuple[str, str]]:
    """(PYOVERLAY_ENGINE value, label) of each engine installed here: Debian
    12's, and the current one where scripts/setup unpacked it."""
    found = [("debian", "engine 20.10 (Debian 12)")]
    try:
        engine_root("current")
        found.append(("current", "current engine"))
    except RuntimeError:
        pass
    return found


def one_engine(ctx, first: int, n_tp: int, seconds: int, n_run: int, warm: int) -> dict:
    """The whole comparison on two fresh hosts (indices first, first + 1) of
    the engine PYOVERLAY_ENGINE names, with their own etcd; the hosts and
    etcd are gone when it returns."""
    etcd = ctx.etcd()
    a, b = ctx.docker_host(first), ctx.docker_host(first + 1)
    try:
        version = a.docker("version", "-f", "{{.Server.Version}}")
        tar = build_iperf_tar(ctx.workdir)
        for h in (a, b):
            h.start_plugin(etcd.url)
            h.docker("import", "-c", 'CMD ["sh"]', str(tar), IPERF_IMAGE)
            h.run(["iperf3", "-s", "-D", "-p", str(PORT)])  # the underlay's server, in the host namespace
        ctx.log(f"swarm ({version}): swarm init on A, join on B, an attachable overlay")
        swarm_up(a, b)
        pairs = {"pyoverlay": make_pair(ctx, PYO_NET, PYO_SUBNET, PYO_VNI, hosts=(a, b)),
                 "pyoverlay -o encap=never": make_pair(ctx, "pyodir", "10.69.0.0/24", PYO_VNI + 1,
                                                       options=("encap=never",), hosts=(a, b)),
                 "swarm overlay": swarm_pair(a, b)}
        ctx.log(f"swarm ({version}): throughput, {n_tp} rounds of underlay, {', '.join(pairs)}")
        gbps = throughput_rounds(pairs, n_tp, seconds)
        for pair in pairs.values():
            pair.a.docker("rm", "-f", f"srv-{pair.network}")
            pair.b.docker("rm", "-f", f"cli-{pair.network}")

        a.docker("network", "create", "-d", "bridge", "--subnet", "10.66.0.0/24", "benchbr")
        variants = {"bridge": [], "bridge, user-defined": ["--network", "benchbr"], **pyoverlay_variants(a, b),
                    "swarm overlay": ["--network", SWARM_NET]}
        ctx.log(f"swarm ({version}): docker run -d, {warm} warm-up + {n_run} rounds of {list(variants)}")
        runs = dockerrun_rounds(a, variants, n_run, warm)
        b.docker_proc("swarm", "leave", "--force", check=False)
        a.docker_proc("swarm", "leave", "--force", check=False)
    finally:
        a.close()
        b.close()
        etcd.close()
    return {"version": version, "gbps": gbps, "runs": runs}


def tables(gbps: dict[str, list[float]], runs: dict[str, list[float]]) -> str:
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
    return "\n".join(tp_rows) + "\n\n" + "\n".join(run_rows) + "\n"


def run(ctx) -> dict:
    n_tp, seconds = (2, 3) if ctx.quick else (6, 4)
    n_run, warm = (5, 1) if ctx.quick else (20, 2)
    passes = []
    for index, (engine, label) in enumerate(engines()):
        os.environ[ENGINE_ENV] = engine  # the hosts' dockerd (tests/engines.py), read when each starts
        try:
            passes.append((label, one_engine(ctx, 1 + 2 * index, n_tp, seconds, n_run, warm)))
        finally:
            os.environ.pop(ENGINE_ENV, None)

    md = (
        "Two engines in namespace hosts on one underlay bridge; host A a swarm manager, host B a worker "
        f"(Docker's overlay on UDP {DATA_PATH_PORT}, an attachable network), pyoverlay on etcd on the same "
        f"engines; the whole comparison once per engine installed, each on fresh hosts. Throughput: {n_tp} "
        f"rounds of one {seconds} s iperf3 stream per path (B to A), the order rotating. `docker run -d` on A: "
        f"{n_run} rounds after {warm} warm-up rounds, one run per network in rotating order, each container "
        "removed before the next.\n\n"
    )
    headline = []
    for label, p in passes:
        gbps, runs = p["gbps"], p["runs"]
        under, bridge, user = median(gbps["underlay"]), median(runs["bridge"]), median(runs["bridge, user-defined"])
        tp = {k: ratio(median(v), under) for k, v in gbps.items()}
        run_ratio = {k: ratio(median(v), bridge) for k, v in runs.items()}
        best = min((v for v in runs if v.startswith("pyoverlay")), key=lambda v: median(runs[v]))
        md += (
            f"### {label}: dockerd {p['version']}\n\n" + tables(gbps, runs) + "\n"
            f"**Throughput over the underlay: pyoverlay {fmt(tp['pyoverlay'], 3)} (VXLAN), "
            f"{fmt(tp['pyoverlay -o encap=never'], 3)} (direct mode); Docker's swarm overlay "
            f"{fmt(tp['swarm overlay'], 3)}** (goals: at least {THROUGHPUT_GOAL} with VXLAN, "
            f"{DIRECT_GOAL} in direct mode). **`docker run -d` over the default bridge: pyoverlay's fastest mode "
            f"({best}) {fmt(run_ratio[best], 2)}, Docker's swarm overlay {fmt(run_ratio['swarm overlay'], 2)}; "
            f"the user-defined bridge {fmt(run_ratio['bridge, user-defined'], 2)}** (goal at most "
            f"{DOCKERRUN_GOAL}, and no slower than the user-defined bridge).\n\n"
        )
        tag = "" if label.startswith("engine 20.10") else f" ({p['version']})"
        headline += [
            (f"one TCP stream / underlay, pyoverlay VXLAN vs direct vs swarm overlay{tag}",
             f"{fmt(tp['pyoverlay'], 3)} vs {fmt(tp['pyoverlay -o encap=never'], 3)} vs "
             f"{fmt(tp['swarm overlay'], 3)}", f">= {THROUGHPUT_GOAL} (direct >= {DIRECT_GOAL})",
             tp["pyoverlay"] is not None and tp["pyoverlay"] >= THROUGHPUT_GOAL),
            (f"docker run -d / bridge, pyoverlay's fastest mode vs user-defined bridge vs swarm overlay{tag}",
             f"{fmt(run_ratio[best], 2)} vs {fmt(run_ratio['bridge, user-defined'], 2)} vs "
             f"{fmt(run_ratio['swarm overlay'], 2)} ({fmt(median(runs[best]), 0)} / {fmt(user, 0)} / "
             f"{fmt(median(runs['swarm overlay']), 0)} / {fmt(bridge, 0)} ms)", f"<= {DOCKERRUN_GOAL}",
             run_ratio[best] is not None and run_ratio[best] <= DOCKERRUN_GOAL),
        ]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline,
            "data": {label: p for label, p in passes}}
