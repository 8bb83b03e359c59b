"""Encrypted overlays (issue 17): one TCP stream between containers on two
hosts, on a pyoverlay network with -o encrypted=true, beside the same on an
unencrypted pyoverlay network and on the underlay, in interleaved rounds of
one run on the same hosts (the order rotates each round, so machine drift
hits all alike).

    bench/run --only encrypted        (or: .venv/bin/python -m bench.encrypted [--quick], not written)

Docker's encrypted swarm overlay (IPsec ESP) is measured too where the kernel
can do ESP; where it cannot (no CONFIG_INET_ESP: a scratch namespace refuses
an ESP state), that is printed instead of a figure, as its traffic would not
be encrypted at all. Takes the e2e session lock, like bench/run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Optional

from bench.env import run_cmd
from bench.stats import fmt, median, ratio
from bench.throughput import IPERF_IMAGE, PORT, build_iperf_tar, make_pair

NAME = "encrypted"
TITLE = "Encrypted overlay: one TCP stream, encrypted vs unencrypted vs the underlay"
GOAL = 0.6  # encrypted / unencrypted


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


def run(ctx, rounds: Optional[int] = None, seconds: Optional[int] = None) -> dict:
    rounds = rounds or (2 if ctx.quick else 6)
    seconds = seconds or (3 if ctx.quick else 4)
    etcd = ctx.etcd()
    a, b = ctx.docker_host(1), ctx.docker_host(2)
    tar = build_iperf_tar(ctx.workdir)
    for h in (a, b):
        h.start_plugin(etcd.url, extra_args=["--key-dir", f"{h.dir}/keys"])
        # wireguard-go ends with its device (it outlives the plugin by design)
        ctx.stack.callback(h.run, ["ip", "link", "del", "pyw" + bytes(int(x) for x in h.addr.split(".")).hex()],
                           check=False)
        h.docker("import", "-c", 'CMD ["sh"]', str(tar), IPERF_IMAGE)
        h.run(["iperf3", "-s", "-D", "-p", str(PORT)])
    plain = make_pair(ctx, "plain", "10.64.0.0/24", 7100, hosts=(a, b))
    secret = make_pair(ctx, "secret", "10.65.0.0/24", 7101, options=["encrypted=true"], hosts=(a, b))
    kinds = {"underlay": plain.underlay, "pyoverlay": plain.overlay, "pyoverlay encrypted": secret.overlay}
    found: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for i in range(rounds):
        for kind in order[i % len(order):] + order[: i % len(order)]:
            r = kinds[kind](seconds)
            found[kind].append(r["gbps"])
            ctx.log(f"encrypted: round {i + 1} {kind}: {fmt(r['gbps'], 3)} Gbit/s ({r['retransmits']} retransmits)")
    no_esp = kernel_has_esp()
    m = {k: median(v) for k, v in found.items()}
    r = ratio(m["pyoverlay encrypted"], m["pyoverlay"])
    rows = ["| path | one TCP stream p50 | min | max | ratio to unencrypted pyoverlay |", "|---|---:|---:|---:|---:|"]
    for kind, xs in found.items():
        rows.append(f"| {kind} | {fmt(m[kind], 3)} Gbit/s | {fmt(min(xs), 3)} | {fmt(max(xs), 3)} | "
                    f"{fmt(ratio(m[kind], m['pyoverlay']), 3)} |")
    docker = ("Docker's encrypted swarm overlay (`--opt encrypted`, IPsec ESP): not measurable on this kernel, "
              f"which has no ESP (a scratch namespace refuses an ESP state: {no_esp}); its traffic would not be "
              "encrypted at all." if no_esp else
              "Docker's encrypted swarm overlay: this kernel has ESP, but this bench does not bring it up yet.")
    md = (f"Two engines in namespace hosts, pyoverlay on etcd; one network with `-o encrypted=true` (WireGuard "
          f"between the hosts, wireguard-go) and one without. {rounds} rounds of one {seconds} s iperf3 stream "
          "per path (B to A), the order rotating.\n\n" + "\n".join(rows) + "\n\n"
          f"**Encrypted / unencrypted: {fmt(r, 3)}** (goal at least {GOAL}). {docker}\n")
    headline = [("one TCP stream, encrypted / unencrypted pyoverlay",
                 f"{fmt(r, 3)} ({fmt(m['pyoverlay encrypted'], 3)} / {fmt(m['pyoverlay'], 2)} Gbit/s)",
                 f">= {GOAL}", r is not None and r >= GOAL)]
    return {"name": NAME, "title": TITLE, "markdown": md, "headline": headline,
            "data": {"runs": found, "docker_encrypted": no_esp}}


def main(argv: Optional[list[str]] = None) -> int:
    from bench.main import main as bench_main

    parser = argparse.ArgumentParser(prog="python -m bench.encrypted", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    return bench_main(["--only", NAME, "--no-write"] + (["--quick"] if args.quick else []))


if __name__ == "__main__":
    sys.exit(main())
