"""Faults, through real engines, a real etcd and the real kernel (issue 6).

- crash safety: SIGKILL the plugin at random moments of the calls that make
  and unmake a container, many rounds; after each restart nothing leaks and
  nothing is lost;
- etcd outage and partition: traffic keeps flowing, new containers fail fast
  naming the store, everything recovers by itself;
- a three-member etcd cluster losing a member: invisible to Docker;
- engine restart with containers running (and the plugin restarting while
  the engine starts);
- concurrent `docker run` on three hosts.

etcd runs in the underlay namespace (10.99.0.254) as in test_multi_host.py.
Figures go to tests/reliability.py for docs/reliability.md.
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, HostFactory
from tests.etcdserver import EtcdServer
from tests.hosts import IMAGE, UNDERLAY_ADDR, NamespaceHost, wait_for
from tests.reliability import record

pytestmark = pytest.mark.slow

PREFIX = "/pyoverlay/"
KILL_ROUNDS = int(os.environ.get("PYO_KILL_ROUNDS", "60"))
CONCURRENT = int(os.environ.get("PYO_CONCURRENT_RUNS", "30"))


# -- helpers -------------------------------------------------------------------


def store(etcd: EtcdServer, prefix: str = "") -> dict[str, dict]:
    """pyoverlay's keys in etcd (without PREFIX), read directly."""
    start = (PREFIX + prefix).encode()
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                 "range_end": base64.b64encode(end).decode()})
    return {base64.b64decode(kv["key"]).decode()[len(PREFIX):]: json.loads(base64.b64decode(kv["value"]))
            for kv in data.get("kvs", [])}


def network(hosts, name: str, subnet: str, vni: int) -> None:
    """The network on each host. Tolerates a host where it appeared by itself
    (pyoverlay's catalog shares network names between hosts)."""
    for host in hosts:
        if host.docker_proc("network", "inspect", name, check=False).returncode == 0:
            continue
        made = host.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                                "--subnet", subnet, "-o", f"vni={vni}", name, check=False)
        if made.returncode != 0:
            wait_for(lambda: host.docker_proc("network", "inspect", name, check=False).returncode == 0, 5,
                     f"network {name} on {host.name} (create said: {made.stderr.strip()})")


def run(host: NamespaceHost, name: str, net: str, *opts: str) -> str:
    host.docker("run", "-d", "--name", name, "--network", net, *opts, IMAGE, "sleep", "3600")
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', name)


def pings(host: NamespaceHost, container: str, ip: str) -> bool:
    return host.docker_proc("exec", container, "ping", "-c1", "-W1", ip, check=False).returncode == 0


def call(host: NamespaceHost, method: str, body: dict) -> dict:
    status, answer = host.plugin_request(method, body)
    assert status == 200, (method, status, answer)
    return answer


def plugin_links(host: NamespaceHost, netns: str | None = None) -> set[str]:
    return {name for name in host.links(netns) if name.startswith(("pyo", "pyb"))}


class Cluster:
    def __init__(self, etcd, factory, hosts):
        self.etcd, self.factory, self.hosts = etcd, factory, hosts

    def url(self) -> str:
        return self.etcd.url


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    workdir = Path(e2e_workdir) / "etcd-faults"
    workdir.mkdir(exist_ok=True)
    etcd = EtcdServer(UNDERLAY_ADDR, netns=underlay.netns, workdir=str(workdir))
    factory = HostFactory(underlay, e2e_workdir, image_tar)
    try:
        etcd.start()
        hosts = factory(3)
        for h in hosts:
            h.start_plugin(etcd.url)
        yield Cluster(etcd, factory, hosts)
    finally:
        try:
            factory.close()
        finally:
            etcd.close()


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory
    if cluster.etcd.proc is None:
        cluster.etcd.start()
    yield cluster.hosts
    if cluster.etcd.proc is None:
        cluster.etcd.start()
    for h in cluster.hosts:
        if not h.plugin_running:
            h.start_plugin(cluster.url())
    for h in cluster.hosts:
        containers = h.docker("ps", "-aq").split()
        if containers:
            h.docker("rm", "-f", *containers, timeout=120)
    for h in cluster.hosts:
        for net in h.docker("network", "ls", "-q", "--filter", "driver=pyoverlay").split():
            h.docker_proc("network", "rm", net, check=False)  # the catalog may remove it first
    for h in cluster.hosts:
        wait_for(lambda: not h.docker("network", "ls", "-q", "--filter", "driver=pyoverlay"), 10,
                 f"pyoverlay networks on {h.name} to go")


# -- crash safety -----------------------------------------------------------------

# Seconds after sending a call at which the kill lands, drawn uniformly up to
# a little more than the call takes (measured here), so kills fall before,
# inside and after the work of the call.
KILL_WINDOW = {"RequestAddress": 0.012, "CreateEndpoint": 0.012, "Join": 0.010,
               "Leave": 0.040, "DeleteEndpoint": 0.045}
STEPS = list(KILL_WINDOW)


def test_sigkill_at_random_points_loses_and_leaks_nothing(hosts, cluster):
    h1, h2, _ = hosts
    subnet, vni = "10.61.0.0/24", 6100
    network((h1, h2), "crash", subnet, vni)
    network_id = h1.docker("network", "inspect", "-f", "{{.Id}}", "crash")
    # Containers that must live through every kill.
    keep1, keep2 = run(h1, "keep1", "crash"), run(h2, "keep2", "crash")
    wait_for(lambda: pings(h2, "keep2", keep1), 10, "keep2 -> keep1 before the kills")
    kept_endpoints = {k for k, v in store(cluster.etcd, "endpoints/").items()}
    kept_addresses = set(store(cluster.etcd, f"addresses/{subnet.replace('/', '_')}/"))
    overlay = f"pyo-{vni}"
    kept_bridge_ports = plugin_links(h1, overlay)

    rng = random.Random(int(os.environ.get("PYO_KILL_SEED", time.time_ns())))
    killed_in: dict[str, int] = {s: 0 for s in STEPS}
    answered_before_kill = 0
    restart_seconds = []
    for round_ in range(KILL_ROUNDS):
        step = STEPS[round_ % len(STEPS)]  # every call gets its share of kills
        delay = rng.uniform(0, KILL_WINDOW[step])
        endpoint_id = os.urandom(32).hex()
        ep = {"NetworkID": network_id, "EndpointID": endpoint_id}
        address = None
        bodies = {
            "RequestAddress": lambda: ("IpamDriver.RequestAddress", {"PoolID": subnet, "Address": "", "Options": None}),
            "CreateEndpoint": lambda: ("NetworkDriver.CreateEndpoint", {**ep, "Interface": {"Address": address}}),
            "Join": lambda: ("NetworkDriver.Join", {**ep, "SandboxKey": "/var/run/docker/netns/crash"}),
            "Leave": lambda: ("NetworkDriver.Leave", ep),
            "DeleteEndpoint": lambda: ("NetworkDriver.DeleteEndpoint", ep),
        }
        for current in STEPS:
            method, body = bodies[current]()
            if current != step:
                answer = call(h1, method, body)
                if current == "RequestAddress":
                    address = answer["Address"]
                continue
            # The call goes out on the socket; the kill lands `delay` later.
            result: dict = {}

            def send():
                try:
                    result["answer"] = h1.plugin_request(method, body)
                except OSError as exc:
                    result["error"] = exc

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(delay)  # the random kill point itself, not a wait for a condition
            h1.kill_plugin()
            sender.join(15)
            killed_in[step] += 1
            if "answer" in result and result["answer"][0] == 200:
                answered_before_kill += 1
                if current == "RequestAddress":
                    address = result["answer"][1]["Address"]
            t0 = time.monotonic()
            h1.start_plugin(cluster.url())
            restart_seconds.append(time.monotonic() - t0)
            break
        # What the engine does next: a container whose start failed is rolled
        # back, one whose removal failed is removed again. Every such call must
        # succeed on the restarted plugin, whatever state the kill left.
        call(h1, "NetworkDriver.Leave", ep)
        call(h1, "NetworkDriver.DeleteEndpoint", ep)
        if address:
            call(h1, "IpamDriver.ReleaseAddress", {"PoolID": subnet, "Address": address.split("/")[0]})

        def clean() -> bool:
            return (set(store(cluster.etcd, "endpoints/")) == kept_endpoints
                    and set(store(cluster.etcd, f"addresses/{subnet.replace('/', '_')}/")) == kept_addresses
                    and not plugin_links(h1)
                    and plugin_links(h1, overlay) == kept_bridge_ports
                    and [n for n in h1.netns_names() if n.startswith("pyo-")] == [overlay])

        wait_for(clean, 10, lambda: f"round {round_} (kill in {step} after {delay * 1000:.1f} ms) to leave "
                 f"nothing behind: endpoints {sorted(set(store(cluster.etcd, 'endpoints/')) - kept_endpoints)}, "
                 f"addresses {sorted(set(store(cluster.etcd, 'addresses/' + subnet.replace('/', '_') + '/')) - kept_addresses)}, "
                 f"host links {plugin_links(h1)}, bridge ports {plugin_links(h1, overlay) ^ kept_bridge_ports}, "
                 f"namespaces {h1.netns_names()}")
        if round_ % 10 == 9:
            assert pings(h2, "keep2", keep1) and pings(h1, "keep1", keep2), f"kept containers cut off at round {round_}"

    # Still whole: the kept containers talk, and Docker starts a new one that reaches them.
    assert pings(h2, "keep2", keep1) and pings(h1, "keep1", keep2)
    fresh = run(h1, "fresh", "crash")
    wait_for(lambda: pings(h2, "keep2", fresh), 5, "a new container after the kills")
    record("crash safety (SIGKILL during calls)",
           did=f"{KILL_ROUNDS} rounds of SIGKILL at a random point of RequestAddress/CreateEndpoint/Join/Leave/"
               f"DeleteEndpoint ({', '.join(f'{k} {v}' for k, v in killed_in.items())}; "
               f"{answered_before_kill} answered before the kill), restart, engine-style roll-back",
           held="no leaked veth, bridge port, namespace, endpoint or address; 2 long-lived containers on two hosts "
                "reachable throughout; a new container works",
           kills=KILL_ROUNDS, leaked=0, lost=0,
           restart_median_s=round(sorted(restart_seconds)[len(restart_seconds) // 2], 2))
