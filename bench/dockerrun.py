"""docker run ratio (issue 2): wall time of `docker run -d` on a pyoverlay
network against the engine's default bridge network, one engine, the
variants interleaved (the order rotates every round).

Two more variants say where a difference comes from: a user-defined bridge
network (the engine gives every container on a user-defined network its
embedded DNS server, which the default bridge does not have), and a
pyoverlay network made with --internal (no docker_gwbridge attachment: a
pyoverlay container otherwise gets a second endpoint there for outbound
traffic and -p, as with Docker's own overlay). And a pyoverlay network made
with -o gateway=pyoverlay: egress and -p through pyoverlay's own uplink, no
docker_gwbridge endpoint (driver/gateway.py).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

from bench.stats import fmt, median, ratio, summary
from tests.hosts import IMAGE

NAME = "dockerrun"
TITLE = "docker run on a pyoverlay network vs the default bridge"
GOAL = 1.10
SWARM_RATIO = 2.16  # issue 2: Docker's swarm overlay here, 468 ms against 217 ms

_CALL = re.compile(r"((?:NetworkDriver|IpamDriver)\.\w+)\b.*?\s([\d.]+)\s*ms\b")


def plugin_call_times(log_text: str) -> dict[str, list[float]]:
    """Server-side duration of each call, from the plugin's one line per request."""
    found: dict[str, list[float]] = defaultdict(list)
    for line in log_text.splitlines():
        m = _CALL.search(line)
        if m:
            found[m.group(1)].append(float(m.group(2)))
    return found


def run(ctx) -> dict:
    n = 6 if ctx.quick else 30
    warm = 2
    host = ctx.docker_host(1)
    host.start_plugin(f"sqlite://{host.state_dir}/state.db")
    host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                "--subnet", "10.43.0.0/24", "benchov")
    host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--internal",
                "--subnet", "10.44.0.0/24", "benchint")
    host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "-o", "gateway=pyoverlay",
                "--subnet", "10.46.0.0/24", "benchgw")
    host.docker("network", "create", "-d", "bridge", "--subnet", "10.45.0.0/24", "benchbr")
    variants = {
        "bridge": [],
        "bridge, user-defined": ["--network", "benchbr"],
        "pyoverlay": ["--network", "benchov"],
        "pyoverlay --internal": ["--network", "benchint"],
        "pyoverlay -o gateway=pyoverlay": ["--network", "benchgw"],
    }
    runs: dict[str, list[float]] = {v: [] for v in variants}
    removals: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    log_path = host.dir / "plugin.log"
    log_offset = log_path.stat().st_size
    ctx.log(f"dockerrun: {warm} warm-up + {n} rounds of {names}, order rotating")
    for i in range(warm + n):
        order = names[i % len(names):] + names[:i % len(names)]
        for variant in order:
            t0 = time.perf_counter()
            cid = host.docker("run", "-d", *variants[variant], IMAGE, "sleep", "3600")
            took = time.perf_counter() - t0
            t1 = time.perf_counter()
            host.docker("rm", "-f", cid)
            removed = time.perf_counter() - t1
            if i >= warm:
                runs[variant].append(took * 1000)
                removals[variant].append(removed * 1000)
    with open(log_path, errors="replace") as f:
        f.seek(log_offset)
        server = plugin_call_times(f.read())
    host.docker("network", "rm", "benchov", "benchint", "benchgw", "benchbr")

    base = median(runs["bridge"])
    rows = ["| network | `docker run -d` p50 | p90 | ratio to bridge | `docker rm -f` p50 |",
            "|---|---:|---:|---:|---:|"]
    for v in names:
        s = summary(runs[v])
        rows.append(f"| {v} | {fmt(s['p50'], 0)} ms | {fmt(s['p90'], 0)} ms | "
                    f"{fmt(ratio(s['p50'], base), 2)} | {fmt(median(removals[v]), 0)} ms |")
    calls = ["| plugin call (server side, from its log) | count | p50 | max |", "|---|---:|---:|---:|"]
    for call in sorted(server):
        calls.append(f"| {call} | {len(server[call])} | {fmt(median(server[call]), 1)} ms | "
                     f"{fmt(max(server[call]), 1)} ms |")
    r = ratio(median(runs["pyoverlay"]), base)
    r_int = ratio(median(runs["pyoverlay --internal"]), base)
    r_gw = ratio(median(runs["pyoverlay -o gateway=pyoverlay"]), base)
    md = (
        f"One engine in a namespace host, plugin on the sqlite store; {n} rounds after {warm} warm-up "
        f"rounds, each round one `docker run -d {IMAGE} sleep 3600` per network in rotating order, "
        "timed from the CLI's start to its exit; every container removed (`docker rm -f`, timed "
        "apart) before the next run.\n\n" + "\n".join(rows) + "\n\n"
        f"**Ratio pyoverlay / bridge: {fmt(r, 2)}** (goal at most {GOAL}; Docker's swarm overlay "
        f"measured {SWARM_RATIO} here). Without the docker_gwbridge attachment (--internal): {fmt(r_int, 2)}; "
        f"with pyoverlay's own egress and -p (-o gateway=pyoverlay): {fmt(r_gw, 2)}.\n\n"
        + ("\n".join(calls) + "\n" if server else "(no per-call lines found in the plugin log)\n")
    )
    headline = [
        ("docker run -d p50, pyoverlay / bridge",
         f"{fmt(r, 2)} ({fmt(median(runs['pyoverlay']), 0)} ms / {fmt(base, 0)} ms; --internal {fmt(r_int, 2)})",
         f"<= {GOAL}", r is not None and r <= GOAL),
        ("docker run -d p50, pyoverlay -o gateway=pyoverlay / bridge",
         f"{fmt(r_gw, 2)} ({fmt(median(runs['pyoverlay -o gateway=pyoverlay']), 0)} ms / {fmt(base, 0)} ms)",
         f"<= {GOAL}", r_gw is not None and r_gw <= GOAL),
    ]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline,
            "data": {"runs": runs, "removals": removals, "server": server}}
