"""The soak, long form: `python -m bench.soak [--minutes 10] [--json FILE]` (as root).

Three Docker hosts and an etcd on the e2e harness's underlay, then
tests/soak.py: container churn with plugin SIGKILLs and an etcd restart for
the given time, the end-of-run leak and reachability checks, and the
never-killed plugin's memory and file descriptors with their slopes. Holds
the harness's session lock (one e2e run or benchmark at a time); the seed is
printed (PYOVERLAY_TEST_SEED replays it). Prints the figures; --json also
writes them, with every sample, for docs/ or a plot. Exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time

from bench.env import EtcdServer, Underlay, UNDERLAY_ADDR, UNDERLAY_NETNS, make_workdir
from tests.hosts import NamespaceHost, SessionLock, build_image_tar, sweep_leftovers
from tests.seed import rng as seeded
from tests.soak import Soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=25.0, help="seconds between plugin SIGKILLs")
    parser.add_argument("--json", help="also write the figures and samples here")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    lock = SessionLock(timeout=3600)
    lock.acquire()
    try:
        sweep_leftovers()
        workdir = make_workdir()
        (workdir / "etcd").mkdir()
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, workdir, True)
            underlay = Underlay(workdir / "underlay").setup()
            stack.callback(underlay.close)
            etcd = EtcdServer(UNDERLAY_ADDR, netns=UNDERLAY_NETNS, workdir=str(workdir / "etcd"))
            stack.callback(etcd.close)
            etcd.start()
            image = build_image_tar(workdir)
            hosts = []
            for i in (1, 2, 3):
                host = NamespaceHost(i, underlay, workdir, image)
                stack.callback(host.close)
                hosts.append(host.start())
                host.start_plugin(etcd.url)
            log(f"soak: {args.minutes:g} min on {', '.join(h.name for h in hosts)}")
            soak = Soak(hosts, etcd, args.minutes * 60, seeded("bench.soak"), log=log, kill_every=args.kill_every)
            failed = None
            try:
                soak.run()
                soak.check()
            except AssertionError as exc:
                failed = exc
            figures = soak.report.figures()
            for key, value in figures.items():
                print(f"{key:32} {value}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"figures": figures, "samples": soak.report.samples, "failed": str(failed or "")}, f,
                              indent=1)
            if failed is not None:
                print(f"FAILED: {failed}", file=sys.stderr)
                return 1
            return 0
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
