"""Docker Engine 20.10's endpoint miscount, reproduced and counted.

    .venv/bin/python -m tests.engine_miscount [--rounds 6] [--arms catalog,no-catalog,bridge]

Each round, on three namespace hosts with real engines (tests/hosts.py):
one network per host, 30 concurrent `docker run` on each host at once, every
container removed, then `docker network rm` on each host. An engine that
refuses with "has active endpoints" though no container is left is restarted,
and its log's "Fixing inconsistent endpoint_cnt ... Expected=E, Actual=A"
line says what it had counted. For pyoverlay it also counts the plugin's
CreateEndpoint and DeleteEndpoint answers on that host, to show every call
was answered, and the plugin's endpoint calls' durations in the bursts.
Arms:

  catalog     pyoverlay with its default settings (network names shared)
  no-catalog  pyoverlay with --no-catalog (each host creates its own network)
  bridge      Docker's own bridge driver (no plugin at all)

Prints one line per round and host that refused, then a summary per arm.
Takes the e2e lock: it does not run beside the e2e tests.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.conftest import ensure_network
from tests.etcdserver import EtcdServer
from tests.hosts import (IMAGE, PLUGIN_EXE, UNDERLAY_ADDR, NamespaceHost, SessionLock, Underlay, build_image_tar,
                         sweep_leftovers, wait_for)

CONTAINERS = 30
FIXING = re.compile(r"Fixing inconsistent endpoint_cnt for network (\S+)\. Expected=(\d+), Actual=(\d+)")
ANSWER = re.compile(r"NetworkDriver\.(CreateEndpoint|DeleteEndpoint) .* ok$", re.M)
TIMED = re.compile(r"NetworkDriver\.(CreateEndpoint|DeleteEndpoint|Join|Leave) .* ([\d.]+)ms ok$", re.M)
#: Server-side durations (ms) of the endpoint calls in the bursts, per arm.
TIMES: dict[str, dict[str, list[float]]] = {}


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _since(path: Path, offset: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def _catalog_says(host: NamespaceHost, etcd_url: str, net: str) -> str:
    """What `pyoverlay network rm` would print for host: its catalog's reason, if any."""
    status = json.loads(host.run([PLUGIN_EXE, "status", "--json", "--store", etcd_url]).stdout)
    for network in status["networks"]:
        for note in network.get("notes") or []:
            if note.startswith(host.addr + ":") and "restart the engine" in note:
                return note
    return ""


def one_round(hosts: list[NamespaceHost], arm: str, index: int, etcd_url: str) -> list[dict]:
    net = f"busy{index}"
    if arm == "bridge":
        for i, h in enumerate(hosts):
            h.docker("network", "create", "-d", "bridge", "--subnet", f"10.{100 + index}.{i}.0/24", net)
    else:
        ensure_network(hosts, net, f"10.{100 + index}.0.0/24", 7000 + index)
    marks = {h.name: (_size(h.dir / "plugin.log"), _size(h.dir / "dockerd.log")) for h in hosts}
    jobs = [(h, f"c{i}") for h in hosts for i in range(CONTAINERS)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = list(pool.map(lambda job: job[0].docker_proc(
            "run", "-d", "--name", job[1], "--network", net, IMAGE, "sleep", "3600", check=False, timeout=300),
            jobs))
    failed = sum(1 for r in runs if r.returncode)
    for h in hosts:
        containers = h.docker("ps", "-aq").split()
        if containers:
            h.docker("rm", "-f", *containers, timeout=120)
    if arm != "bridge":
        for h in hosts:
            for call, ms in TIMED.findall(_since(h.dir / "plugin.log", marks[h.name][0])):
                TIMES.setdefault(arm, {}).setdefault(call, []).append(float(ms))
    miscounted = []
    for h in hosts:
        rm = h.docker_proc("network", "rm", net, check=False)
        if rm.returncode == 0 or "No such network" in rm.stderr:
            continue  # removed here, or by the catalog after another host's rm
        if "has active endpoints" not in rm.stderr:
            raise RuntimeError(f"{h.name}: docker network rm {net}: {rm.stderr.strip()}")
        miscounted.append(h)
    refused = []
    for h in miscounted:
        answers = ANSWER.findall(_since(h.dir / "plugin.log", marks[h.name][0])) if arm != "bridge" else []
        said = ""
        if arm == "catalog":
            # The other hosts' removals took the network out of the catalog:
            # this host's catalog tries to remove it too and must say why it cannot.
            said = wait_for(lambda: _catalog_says(h, etcd_url, net), 15,
                            f"{h.name}'s catalog to record why {net} stays", interval=0.5)
        log_mark = _size(h.dir / "dockerd.log")
        h.restart_engine()
        fixed = FIXING.findall(_since(h.dir / "dockerd.log", log_mark))
        refused.append({"round": index, "host": h.name, "failed_runs": failed,
                        "create_ok": answers.count("CreateEndpoint"), "delete_ok": answers.count("DeleteEndpoint"),
                        "engine": [f"Expected={e}, Actual={a}" for n, e, a in fixed if n == net],
                        "pyoverlay": said})
        again = h.docker_proc("network", "rm", net, check=False)  # the catalog may have removed it already
        if again.returncode and "No such network" not in again.stderr:
            raise RuntimeError(f"{h.name}: docker network rm {net} after the restart: {again.stderr.strip()}")
    for h in hosts:
        wait_for(lambda: h.docker_proc("network", "inspect", net, check=False).returncode != 0, 30,
                 f"{net} to go from {h.name}")
    return refused


def run_arm(arm: str, rounds: int, underlay: Underlay, workdir: Path, image: Path, plugin_exe: str) -> list[dict]:
    etcd = EtcdServer(UNDERLAY_ADDR, netns=underlay.netns, workdir=str(workdir / f"etcd-{arm}"))
    (workdir / f"etcd-{arm}").mkdir()
    hosts: list[NamespaceHost] = []
    try:
        etcd.start()
        for i in (1, 2, 3):
            hosts.append(NamespaceHost(i, underlay, workdir / arm, image, plugin_exe=plugin_exe).start())
        if arm != "bridge":
            for h in hosts:
                h.start_plugin(etcd.url, extra_args=["--no-catalog"] if arm == "no-catalog" else [])
        results = []
        for index in range(rounds):
            refused = one_round(hosts, arm, index, etcd.url)
            for r in refused:
                print(f"{arm:10} round {r['round']} {r['host']}: has active endpoints, no container; "
                      f"engine at restart: {', '.join(r['engine']) or '?'}; plugin answered "
                      f"{r['create_ok']} CreateEndpoint, {r['delete_ok']} DeleteEndpoint"
                      + (f"; pyoverlay status said: {r['pyoverlay']}" if r["pyoverlay"] else ""), flush=True)
            results.append({"round": index, "refused": refused})
        return results
    finally:
        for h in reversed(hosts):
            h.close()
        etcd.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--arms", default="catalog,no-catalog,bridge")
    parser.add_argument("--plugin-exe", default=PLUGIN_EXE, help="the pyoverlay to run (another checkout's, to compare)")
    args = parser.parse_args(argv)
    lock = SessionLock()
    lock.acquire()
    workdir = Path(tempfile.mkdtemp(prefix="pyo-miscount-"))
    underlay = Underlay(workdir / "underlay")
    summary = []
    try:
        sweep_leftovers()
        underlay.setup()
        image = build_image_tar(workdir)
        for arm in args.arms.split(","):
            (workdir / arm).mkdir()
            results = run_arm(arm, args.rounds, underlay, workdir, image, args.plugin_exe)
            bad = [r for r in results if r["refused"]]
            summary.append(f"{arm:10} {len(bad)} of {len(results)} rounds left an engine miscounting "
                           f"({sum(len(r['refused']) for r in results)} host-rounds of {3 * len(results)})")
            for call, times in sorted(TIMES.get(arm, {}).items()):
                times.sort()
                summary.append(f"{'':10} {call:15} p50 {times[len(times) // 2]:6.1f} ms, "
                               f"p90 {times[int(len(times) * 0.9)]:6.1f} ms ({len(times)} calls)")
    finally:
        underlay.close()
        shutil.rmtree(workdir, ignore_errors=True)
        lock.release()
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
