"""Names across hosts (issue 10): what a container waits for a name, side by side.

Two Docker engines with the README's one-time setting (`"dns":
["169.254.53.53", <upstream>]`) on one etcd; the upstream is the tests' small
DNS server in the underlay namespace. From inside a container on host 1
(a dnspython client in its network namespace, nsenter), through the engine's
embedded DNS (127.0.0.11) as an application asks, interleaved:

- a cluster name (a container on host 2): embedded DNS -> pyoverlay's table;
- a forwarded name: embedded DNS -> pyoverlay -> the upstream;
- a local name (a container on host 1, same network): the embedded DNS alone;

and the first two asked of 169.254.53.53 directly, which is pyoverlay's own
part of the path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.env import UNDERLAY_ADDR
from bench.stats import fmt, ratio, summary
from tests.etcdserver import EtcdServer
from tests.hosts import IMAGE, NamespaceHost, UNDERLAY_NETNS, wait_for

NAME = "dns"
TITLE = "Names across hosts: what a container waits for an answer"
ROOT = Path(__file__).resolve().parent.parent
DNS_ADDR = "169.254.53.53"
EXT = "ext.test"

PROBE = r"""
import json, socket, sys, time
import dns.message
names = json.loads(sys.argv[1]); n = int(sys.argv[2]); warm = int(sys.argv[3])
socks = {}
def ask(server, name):
    s = socks.get(server)
    if s is None:
        s = socks[server] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect((server, 53))
    wire = dns.message.make_query(name, "A").to_wire()
    t0 = time.perf_counter()
    s.send(wire)
    reply = dns.message.from_wire(s.recv(4096))
    took = (time.perf_counter() - t0) * 1000
    if not reply.answer:
        raise SystemExit(f"{name} via {server}: no answer ({reply.rcode()})")
    return took
out = {label: [] for label in names}
for i in range(warm + n):
    order = list(names.items()) if i % 2 == 0 else list(names.items())[::-1]
    for label, (server, name) in order:
        took = ask(server, name)
        if i >= warm:
            out[label].append(took)
print(json.dumps(out))
"""


def run(ctx) -> dict:
    n, warm = (200, 20) if ctx.quick else (2000, 100)
    etcd = EtcdServer(UNDERLAY_ADDR, netns=UNDERLAY_NETNS)
    ctx.stack.callback(etcd.close)
    etcd.start()
    ctx.underlay.spawn([sys.executable, "-P", str(ROOT / "tests" / "dnsupstream.py"), UNDERLAY_ADDR, "53",
                        "--a", f"{EXT}=192.0.2.10"], "dnsupstream.log")
    hosts = []
    for index in (1, 2):
        host = NamespaceHost(index, ctx.underlay, ctx.workdir, ctx.image_tar, plugin_exe=ctx.plugin_exe,
                             daemon_config={"dns": [DNS_ADDR, UNDERLAY_ADDR]})
        ctx.stack.callback(host.close)
        hosts.append(host.start())
    for host in hosts:
        host.start_plugin(etcd.url, extra_args=["--docker-host", f"unix://{host.dir}/docker.sock",
                                                "--dns-upstream", UNDERLAY_ADDR])
    h1, h2 = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.70.0.0/24",
              "web")
    wait_for(lambda: h2.docker_proc("network", "inspect", "web", check=False).returncode == 0, 20, "web on host 2")
    for host, name in ((h2, "remote"), (h1, "client"), (h1, "local")):
        host.docker("run", "-d", "--init", "--name", name, "--network", "web", IMAGE, "sleep", "3600")
    pid = h1.docker("inspect", "-f", "{{.State.Pid}}", "client")
    names = {
        "cluster name (other host), via 127.0.0.11": ("127.0.0.11", "remote"),
        "forwarded name, via 127.0.0.11": ("127.0.0.11", EXT),
        "local name (embedded DNS alone)": ("127.0.0.11", "local"),
        "cluster name, asking 169.254.53.53": (DNS_ADDR, "remote"),
        "forwarded name, asking 169.254.53.53": (DNS_ADDR, EXT),
    }

    def answering() -> bool:
        probe = h1.run(["nsenter", "-t", pid, "-n", sys.executable, "-c", PROBE, json.dumps(names), "1", "0"],
                       check=False)
        return probe.returncode == 0

    wait_for(answering, 20, "every name to answer in the client container")
    ctx.log(f"dns: {warm} warm-up + {n} rounds of {len(names)} queries, interleaved")
    out = h1.run(["nsenter", "-t", pid, "-n", sys.executable, "-c", PROBE, json.dumps(names), str(n), str(warm)],
                 timeout=600).stdout
    samples = json.loads(out)
    table = {label: summary(v) for label, v in samples.items()}
    rows = ["| query | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
    for label, s in table.items():
        rows.append(f"| {label} | {fmt(s['p50'], 3)} | {fmt(s['p90'], 3)} | {fmt(s['p99'], 3)} |")
    cluster = table["cluster name (other host), via 127.0.0.11"]
    local = table["local name (embedded DNS alone)"]
    forwarded = table["forwarded name, via 127.0.0.11"]
    direct_fwd, direct_cluster = table["forwarded name, asking 169.254.53.53"], table["cluster name, asking 169.254.53.53"]
    added = (direct_fwd["p50"] - direct_cluster["p50"]) if direct_fwd["p50"] and direct_cluster["p50"] else None
    md = (f"{n} rounds after {warm} warm-up rounds; each round asks every name once over UDP, the order "
          "reversed every other round; milliseconds from sending the query to reading the answer, from "
          "inside a container on host 1 (engine 20.10's embedded DNS at 127.0.0.11). The upstream is a "
          "Python (dnspython) server in the underlay namespace.\n\n" + "\n".join(rows) + "\n\n"
          f"Forwarding's own cost (forwarded minus cluster name, asked of 169.254.53.53 directly, p50): "
          f"{fmt(added, 3)} ms.\n")
    headline = [
        ("cluster name p99 (via 127.0.0.11)", f"{fmt(cluster['p99'], 2)} ms", "< 2 ms",
         cluster["p99"] is not None and cluster["p99"] < 2.0),
        ("cluster name p99 / local name p99", f"{fmt(ratio(cluster['p99'], local['p99']), 2)}x", "< 2x",
         ratio(cluster["p99"], local["p99"]) is not None and ratio(cluster["p99"], local["p99"]) < 2.0),
        ("forwarding adds (p50)", f"{fmt(added, 3)} ms (forwarded p50 {fmt(forwarded['p50'], 2)} ms)", "< 1 ms",
         added is not None and added < 1.0),
    ]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline, "data": table}
