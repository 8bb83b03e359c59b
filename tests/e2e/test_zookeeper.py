"""pyoverlay on ZooKeeper (issue 18): three hosts with real Docker engines
sharing one ZooKeeper server in the underlay namespace (10.99.0.254), as
test_cluster_networks.py and test_faults.py do on etcd.

- a network created on one host appears on all; containers on different
  hosts ping each other; `pyoverlay status` and `pyoverlay doctor` work on
  the zk:// store;
- ZooKeeper stopped: traffic keeps flowing, docker run fails fast naming
  ZooKeeper; ZooKeeper back: a new container starts and is reached, with no
  plugin restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, HostFactory, clear_hosts
from tests.e2e.test_faults import PING_INTERVAL, Pinger, pings, run, run_until_it_works, try_run
from tests.hosts import PLUGIN_EXE, UNDERLAY_ADDR, NamespaceHost, wait_for
from tests.zkserver import ZkServer

# The engine only calls the plugin here: CI runs this once, on the current engine.
pytestmark = pytest.mark.engine_neutral

#: Seconds ZooKeeper stays down in the outage test.
OUTAGE = 8.0


class Cluster:
    def __init__(self, zk: ZkServer, factory: HostFactory, hosts: list[NamespaceHost]):
        self.zk, self.factory, self.hosts = zk, factory, hosts

    def start_plugin(self, host: NamespaceHost) -> None:
        host.start_plugin(self.zk.url, extra_args=["--docker-host", f"unix://{host.dir}/docker.sock"])

    def pyoverlay(self, host: NamespaceHost, *args: str, check: bool = False):
        return host.run([PLUGIN_EXE, *args, "--store", self.zk.url], check=check, timeout=60)


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    workdir = Path(e2e_workdir) / "zookeeper"
    workdir.mkdir(exist_ok=True)
    zk = ZkServer(UNDERLAY_ADDR, netns=underlay.netns, workdir=str(workdir))
    factory = HostFactory(underlay, e2e_workdir, image_tar)
    try:
        zk.start()
        c = Cluster(zk, factory, factory(3))
        for h in c.hosts:
            c.start_plugin(h)
        yield c
    finally:
        try:
            factory.close()
        finally:
            zk.close()


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory  # logs in a failure report
    if cluster.zk.proc is None:
        cluster.zk.start()
    yield cluster.hosts
    if cluster.zk.proc is None:
        cluster.zk.start()
    clear_hosts(cluster.hosts, timeout=90)


def test_hosts_share_networks_and_reach_each_other_on_zookeeper(cluster, hosts):
    h1, h2, h3 = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.63.0.0/24",
              "zkweb")
    # The catalog, through ZooKeeper, brings it to the other engines.
    wait_for(lambda: all(h.docker_proc("network", "inspect", "zkweb", check=False).returncode == 0
                         for h in (h2, h3)), 15, "zkweb on h2 and h3")
    ips = {c: run(h, c, "zkweb") for h, c in zip(hosts, ("z1", "z2", "z3"))}
    assert len(set(ips.values())) == 3, ips
    for h, c, other in ((h1, "z1", "z2"), (h2, "z2", "z3"), (h3, "z3", "z1")):
        wait_for(lambda: pings(h, c, ips[other]), 10, f"{c} on {h.name} to reach {other}")

    status = json.loads(cluster.pyoverlay(h3, "status", "--json", check=True).stdout)
    assert [(s["host"], s["alive"]) for s in status["hosts"]] == [(h.addr, True) for h in hosts]
    web = next(n for n in status["networks"] if n["name"] == "zkweb")
    assert (web["hosts"], web["endpoints"]) == ([h.addr for h in hosts], 3)
    assert sorted((e["host"], e["container"], e["ip"]) for e in status["endpoints"] if e["network"] == "zkweb") == \
        sorted((h.addr, c, ips[c]) for h, c in zip(hosts, ("z1", "z2", "z3")))

    doctor = cluster.pyoverlay(h2, "doctor", "--json", "--advertise-addr", h2.addr,
                               "--docker-host", f"unix://{h2.dir}/docker.sock")
    report = json.loads(doctor.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["store"]["status"] == "ok" and "ZooKeeper at" in checks["store"]["summary"], checks["store"]
    for name in ("underlay", "overlays", "peers", "engine"):
        assert checks[name]["status"] == "ok", json.dumps(report, indent=1)


def test_zookeeper_outage_traffic_flows_then_recovers_without_restart(cluster, hosts):
    h1, h2, _ = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.64.0.0/24",
              "zkout")
    wait_for(lambda: h2.docker_proc("network", "inspect", "zkout", check=False).returncode == 0, 15, "zkout on h2")
    run(h1, "oa", "zkout")
    b = run(h2, "ob", "zkout")
    wait_for(lambda: pings(h1, "oa", b), 10, "oa -> ob before the outage")
    pids = (h1._plugin.pid, h2._plugin.pid)

    pinger = Pinger(h1, "oa", b, OUTAGE + 4)
    time.sleep(1)  # traffic flowing before the outage begins
    cluster.zk.stop()
    down_at = time.monotonic()
    refused, took = try_run(h1, "during", "zkout")
    assert refused.returncode != 0, "docker run worked with ZooKeeper down?"
    assert took < 15, f"docker run took {took:.1f}s to fail with ZooKeeper down"
    assert "ZooKeeper" in refused.stderr and cluster.zk.address in refused.stderr, refused.stderr
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))  # the outage lasts OUTAGE seconds
    cluster.zk.start()
    up_at = time.monotonic()
    sent, got = pinger.result()
    assert sent - got == 0, f"{sent - got} of {sent} pings (every {PING_INTERVAL} s) lost across the outage"

    # Back: a new container on h2 starts, and h1 (whose watch saw ZooKeeper go) reaches it.
    c, recovered = run_until_it_works(h2, "zkout", 30)
    wait_for(lambda: pings(h1, "oa", c), 10, "oa to reach a container started after the outage")
    print(f"\nZooKeeper down {OUTAGE:.0f} s: docker run refused in {took:.2f} s; {got}/{sent} pings answered; "
          f"a new container ran {recovered:.1f} s and was reachable {time.monotonic() - up_at:.1f} s after "
          "ZooKeeper was back")
    assert (h1._plugin.pid, h2._plugin.pid) == pids and h1.plugin_running and h2.plugin_running
