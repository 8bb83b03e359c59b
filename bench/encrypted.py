"""Encrypted overlays (issue 17): one TCP stream between containers on two
hosts, on a pyoverlay network with -o encrypted=true, beside the same on an
unencrypted pyoverlay network and on the underlay, in interleaved rounds of
one run on the same hosts (the order rotates each round, so machine drift
hits all alike).

    .venv/bin/python -m bench.encrypted [--rounds N] [--seconds S]

Docker's encrypted swarm overlay (IPsec ESP) is measured too where the kernel
can do ESP; where it cannot (no CONFIG_INET_ESP: a scratch namespace refuses
an ESP state), that is printed instead of a figure, as its traffic would not
be encrypted at all. Takes the e2e session lock, like bench/run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from typing import Optional

from bench.env import make_workdir, run_cmd, wait_for
from bench.stats import fmt, median, ratio
from bench.throughput import IPERF_IMAGE, PORT, Pair, build_iperf_tar, ensure_network

NAME = "encrypted"
TITLE = "Encrypted overlay: one TCP stream, encrypted vs unencrypted vs the underlay"
GOAL = 0.6  # encrypted / unencrypted


def _pair(ctx, net: str, subnet: str, vni: int, encrypted: bool) -> Pair:
    a, b = ctx._enc_hosts
    args = ["-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", subnet, "-o", f"vni={vni}"]
    if encrypted:
        args += ["-o", "encrypted=true"]
    for h in (a, b):
        ensure_network(h, net, args)
    pair = Pair(a, b, net)
    a.docker("run", "-d", "--name", f"srv-{net}", "--network", net, IPERF_IMAGE, "iperf3", "-s", "-p", str(PORT))
    b.docker("run", "-d", "--name", f"cli-{net}", "--network", net, IPERF_IMAGE, "sleep", "1d")
    pair.server_ip = a.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}',
                              f"srv-{net}")
    wait_for(lambda: b.docker_proc("exec", f"cli-{net}", "ping", "-c", "1", "-W", "1", pair.server_ip,
                                   check=False).returncode == 0, 20, f"the path on {net}")
    return pair


def kernel_has_esp() -> Optional[str]:
    """None if the kernel takes an ESP state, else why not."""
    ns = f"pyo-esp-probe-{int(time.time() * 1000) % 100000}"
    run_cmd(["ip", "netns", "add", ns])
    try:
        done = subprocess.run(["ip", "-n", ns, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
                               "proto", "esp", "spi", "0x100", "mode", "transport", "aead", "rfc4106(gcm(aes))",
                               "0x" + "11" * 20, "128"], capture_output=True, text=True, timeout=10)
        return None if done.returncode == 0 else done.stderr.strip() or "refused"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def run(ctx, rounds: int = 5, seconds: int = 4) -> dict:
    etcd = ctx.etcd()
    a, b = ctx.docker_host(1), ctx.docker_host(2)
    ctx._enc_hosts = (a, b)
    tar = build_iperf_tar(ctx.workdir)
    for h in (a, b):
        h.start_plugin(etcd.url, extra_args=["--key-dir", f"{h.dir}/keys"])
        h.docker("import", "-c", 'CMD ["sh"]', str(tar), IPERF_IMAGE)
        h.run(["iperf3", "-s", "-D", "-p", str(PORT)])
    plain = _pair(ctx, "plain", "10.64.0.0/24", 7100, encrypted=False)
    secret = _pair(ctx, "secret", "10.65.0.0/24", 7101, encrypted=True)
    kinds = {"underlay": plain.underlay, "pyoverlay": plain.overlay, "pyoverlay encrypted": secret.overlay}
    found: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for i in range(rounds):
        for kind in order[i % len(order):] + order[: i % len(order)]:
            r = kinds[kind](seconds)
            found[kind].append(r["gbps"])
            ctx.log(f"encrypted: round {i + 1} {kind}: {fmt(r['gbps'], 3)} Gbit/s ({r['retransmits']} retransmits)")
    docker = kernel_has_esp()
    return {"medians": {k: median(v) for k, v in found.items()}, "runs": found,
            "docker_encrypted": None if docker is None else f"not measurable here: the kernel has no ESP ({docker})",
            "rounds": rounds, "seconds": seconds}


def main(argv: Optional[list[str]] = None) -> int:
    from bench.main import Context, loadavg, machine_notes
    from tests.hosts import PLUGIN_EXE, SessionLock, Underlay, sweep_leftovers

    parser = argparse.ArgumentParser(prog="python -m bench.encrypted", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args(argv)
    lock = SessionLock(timeout=3600)
    print(f"waiting for the e2e session lock {lock.path} ...", file=sys.stderr, flush=True)
    lock.acquire()
    try:
        sweep_leftovers()
        workdir = make_workdir()
        underlay = Underlay(workdir / "underlay")
        ctx = Context(False, workdir, underlay, PLUGIN_EXE)
        load0 = loadavg()
        with ctx.stack:
            ctx.stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            ctx.stack.callback(underlay.close)
            underlay.setup()
            result = run(ctx, args.rounds, args.seconds)
            for h in ctx._enc_hosts:  # wireguard-go ends with its device
                h.run(["ip", "link", "del", "pyw" + bytes(int(x) for x in h.addr.split(".")).hex()], check=False)
    finally:
        lock.release()
    m = result["medians"]
    print(f"\n{machine_notes()}; load {load0} -> {loadavg()}")
    print(f"{result['rounds']} interleaved rounds of {result['seconds']} s, one TCP stream, medians (Gbit/s):")
    for kind, value in m.items():
        print(f"  {kind:22s} {fmt(value, 3)}")
    print(f"  {'Docker encrypted swarm':22s} {result['docker_encrypted'] or 'see above'}")
    r = ratio(m["pyoverlay encrypted"], m["pyoverlay"])
    print(f"encrypted / unencrypted: {fmt(r, 3)} (goal at least {GOAL}: {'met' if r >= GOAL else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
