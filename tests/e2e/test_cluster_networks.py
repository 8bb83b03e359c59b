"""Networks created once appear on every host (issue 4), on three real Docker
engines sharing one etcd in the underlay namespace.

The plugins reach their engine through --docker-host (each host's engine
socket is a file in its own directory). The cluster is made once for the
module; each test cleans up after itself. Checks are made from outside: what
each engine lists, what the containers reach, what the operator commands
print, what the metrics endpoint serves.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driver.catalog import PHANTOM_GRACE
from tests.e2e.conftest import FACTORY, HostFactory, etcd_and_hosts
from tests.etcdserver import EtcdServer
from tests.hosts import IMAGE, PLUGIN_EXE, NamespaceHost, wait_for

#: Bound for a change on one host to show on the others (the goal: about a
#: second; after an engine restart, up to the catalog's PHANTOM_GRACE more).
CONVERGE = 15.0
METRICS = "127.0.0.1:9477"  # in each host's own network namespace


class Cluster:
    def __init__(self, etcd: EtcdServer, factory: HostFactory, hosts: list[NamespaceHost]):
        self.etcd = etcd
        self.factory = factory
        self.hosts = hosts

    def start_plugin(self, host: NamespaceHost) -> None:
        extra = ["--docker-host", f"unix://{host.dir}/docker.sock", "--metrics-addr", METRICS]
        if host is self.hosts[1]:
            extra += ["--log-format", "json"]
        host.start_plugin(self.etcd.url, extra_args=extra)

    def pyoverlay(self, host: NamespaceHost, *args: str, check: bool = False):
        """The operator command, run on host against the cluster's store."""
        return host.run([PLUGIN_EXE, *args, "--store", self.etcd.url], check=check, timeout=60)


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 3) as (etcd, factory, hosts):
        c = Cluster(etcd, factory, hosts)
        # The third host's plugin starts later, in the first test: a host that joins.
        for h in c.hosts[:2]:
            c.start_plugin(h)
        yield c


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory  # logs in a failure report
    yield cluster.hosts
    for h in cluster.hosts:
        if not h.plugin_running:
            cluster.start_plugin(h)
    for h in cluster.hosts:
        containers = h.docker("ps", "-aq").split()
        if containers:
            h.docker("rm", "-f", *containers)
    catalog = json.loads(cluster.pyoverlay(cluster.hosts[0], "status", "--json", check=True).stdout)
    for n in catalog["networks"]:
        if n["in_catalog"]:
            cluster.pyoverlay(cluster.hosts[0], "network", "rm", n["name"], "--wait", "0", check=True)
    wait_for(lambda: not any(pyoverlay_networks(h) for h in cluster.hosts), CONVERGE,
             lambda: f"every pyoverlay network to go: {[pyoverlay_networks(h) for h in cluster.hosts]}")


# -- helpers ------------------------------------------------------------------

def pyoverlay_networks(host: NamespaceHost) -> list[str]:
    return sorted(host.docker("network", "ls", "--filter", "driver=pyoverlay", "--format", "{{.Name}}").split())


def inspect(host: NamespaceHost, name: str):
    proc = host.docker_proc("network", "inspect", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def settings(net: dict) -> dict:
    """What must be the same on every host."""
    config = net["IPAM"]["Config"][0]
    return {
        "Driver": net["Driver"], "IPAM.Driver": net["IPAM"]["Driver"], "Subnet": config["Subnet"],
        "Gateway": config.get("Gateway"), "Internal": net["Internal"],
        "mtu": net["Options"].get("com.docker.network.driver.mtu"),
    }


def run(host: NamespaceHost, name: str, network: str, *opts: str) -> None:
    host.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sleep", "3600")


def ip_of(host: NamespaceHost, container: str, network: str) -> str:
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                       container)


def pings(host: NamespaceHost, container: str, ip: str) -> bool:
    return host.docker_proc("exec", container, "ping", "-c1", "-W2", ip, check=False).returncode == 0


def appears(hosts, name: str, since: float) -> float:
    """Wait until every host's engine has the network; seconds it took."""
    wait_for(lambda: all(inspect(h, name) for h in hosts), CONVERGE,
             lambda: f"network {name} on {[h.name for h in hosts if not inspect(h, name)]}")
    return time.monotonic() - since


def scrape(host: NamespaceHost) -> dict:
    text = host.run(["busybox", "wget", "-qO-", f"http://{METRICS}/metrics"]).stdout
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# -- tests ----------------------------------------------------------------------

def test_created_on_one_host_appears_on_all_and_containers_reach_each_other(cluster, hosts):
    h1, h2, h3 = hosts
    t0 = time.monotonic()
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.40.0.0/24",
              "--gateway", "10.40.0.254", "-o", "com.docker.network.driver.mtu=1400", "web")
    took = appears([h2], "web", t0)
    print(f"\nweb on h2 {took:.2f}s after `docker network create` on h1")
    t0 = time.monotonic()
    h2.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.41.0.0/24",
              "--internal", "db")
    appears([h1], "db", t0)

    # A host that joins later gets both.
    t0 = time.monotonic()
    cluster.start_plugin(h3)
    took = appears([h3], "web", t0)
    appears([h3], "db", t0)
    print(f"web and db on h3 {took:.2f}s after its plugin started")

    for name, expected in [
        ("web", {"Driver": "pyoverlay", "IPAM.Driver": "pyoverlay", "Subnet": "10.40.0.0/24",
                 "Gateway": "10.40.0.254", "Internal": False, "mtu": "1400"}),
        # No --gateway given: no engine shows one (the IPAM hands out one shared gateway).
        ("db", {"Driver": "pyoverlay", "IPAM.Driver": "pyoverlay", "Subnet": "10.41.0.0/24",
                "Gateway": None, "Internal": True, "mtu": None}),
    ]:
        assert [settings(inspect(h, name)) for h in hosts] == [expected] * 3, name
    # One overlay per network on every host: the same VNIs everywhere.
    overlays = [sorted(n for n in h.netns_names() if n.startswith("pyo-")) for h in hosts]
    assert len(overlays[0]) == 2 and overlays == [overlays[0]] * 3, overlays

    # Containers across hosts, no per-host command.
    for h, c in zip(hosts, ("c1", "c2", "c3")):
        run(h, c, "web")
    ips = {c: ip_of(h, c, "web") for h, c in zip(hosts, ("c1", "c2", "c3"))}
    assert len(set(ips.values())) == 3, ips
    assert pings(h3, "c3", ips["c1"]) and pings(h1, "c1", ips["c2"]) and pings(h2, "c2", ips["c3"])

    # The operator's view, from any host.
    status = json.loads(cluster.pyoverlay(h3, "status", "--json", check=True).stdout)
    assert [(s["host"], s["alive"]) for s in status["hosts"]] == [(h.addr, True) for h in hosts]
    web = next(n for n in status["networks"] if n["name"] == "web")
    assert (web["hosts"], web["endpoints"], web["mtu"]) == ([h.addr for h in hosts], 3, 1400)
    assert sorted((e["host"], e["container"], e["ip"]) for e in status["endpoints"] if e["network"] == "web") == \
        sorted((h.addr, c, ips[c]) for h, c in zip(hosts, ("c1", "c2", "c3")))
    table = cluster.pyoverlay(h3, "status", check=True).stdout
    assert "web " in table and "c3" in table

    # This host, checked against the store and its engine: clean.
    doctor = cluster.pyoverlay(h2, "doctor", "--json", "--advertise-addr", h2.addr,
                               "--docker-host", f"unix://{h2.dir}/docker.sock")
    report = json.loads(doctor.stdout)
    assert doctor.returncode == 0, json.dumps(report, indent=1)
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        "plugin socket": "ok", "store": "ok", "underlay": "ok", "vxlan port": "ok", "overlays": "ok",
        "peers": "ok", "engine": "ok", "ip forwarding": "ok",
        # The cluster resolver answers; this engine's daemon.json lacks the one-time "dns" setting.
        "dns resolver": "ok", "dns daemon config": "warn"}

    # Metrics of a real plugin, scraped in its host's namespace.
    samples = scrape(h1)
    assert samples[("pyoverlay_requests_total", (("call", "NetworkDriver.CreateNetwork"), ("outcome", "ok")))] == 2
    assert samples[("pyoverlay_catalog_actions_total", (("action", "published"),))] == 1
    assert samples[("pyoverlay_catalog_actions_total", (("action", "created"),))] == 1
    assert samples[("pyoverlay_engine_connected", ())] == 1
    assert samples[("pyoverlay_peers_programmed", ())] == 2
    # h2 logs JSON, one object per line, the request lines with their parts.
    lines = [json.loads(line) for line in h2.plugin_log().splitlines() if line.startswith("{")]
    joins = [entry for entry in lines if entry.get("call") == "NetworkDriver.Join"]
    assert joins and joins[0]["outcome"] == "ok" and "EndpointID" in joins[0]["ids"]

    # `docker network rm` on one host removes the network from every host.
    for h, c in zip(hosts, ("c1", "c2", "c3")):
        h.docker("rm", "-f", c)
    h2.docker("network", "rm", "web")
    wait_for(lambda: not any(inspect(h, "web") for h in hosts), CONVERGE,
             lambda: f"web to go everywhere: {[h.name for h in hosts if inspect(h, 'web')]}")
    assert [pyoverlay_networks(h) for h in hosts] == [["db"]] * 3


def test_operator_create_and_rm(cluster, hosts):
    h1, h2, h3 = hosts
    # The name is taken on h2 by a network of another driver: h2 says so, the others create it.
    h2.docker("network", "create", "--subnet", "10.45.0.0/24", "taken")
    created = cluster.pyoverlay(h1, "network", "create", "taken", "--subnet", "10.46.0.0/24", "--json")
    result = json.loads(created.stdout)
    assert created.returncode == 1
    assert [(r["host"], r["result"]) for r in result["hosts"]] == [
        (h1.addr, "created"), (h2.addr, "refused"), (h3.addr, "created")]
    assert "a bridge network named taken already exists" in result["hosts"][1]["detail"]
    assert cluster.pyoverlay(h1, "network", "rm", "taken", check=True).returncode == 0
    h2.docker("network", "rm", "taken")

    created = cluster.pyoverlay(h1, "network", "create", "api", "--subnet", "10.42.0.0/24", "--vni", "5001",
                                "--mtu", "1300")
    assert created.returncode == 0, created.stdout + created.stderr
    lines = created.stdout.splitlines()
    assert lines[0] == ("network api: 10.42.0.0/24, gateway 10.42.0.1, VNI 5001, MTU 1300; "
                        "every host running pyoverlay creates it")
    assert [line.split()[:2] for line in lines[2:]] == [[h.addr, "created"] for h in hosts]
    for h in hosts:
        net = inspect(h, "api")
        assert net["Options"] == {"vni": "5001", "com.docker.network.driver.mtu": "1300"}
        assert "pyo-5001" in h.netns_names()

    run(h3, "busy", "api")
    rm = cluster.pyoverlay(h2, "network", "rm", "api", "--json")
    assert rm.returncode == 1, rm.stdout + rm.stderr
    result = json.loads(rm.stdout)
    assert [(r["host"], r["result"], r["containers"]) for r in result["hosts"]] == [
        (h1.addr, "removed", []), (h2.addr, "removed", []), (h3.addr, "in use", ["busy"])]
    assert [bool(inspect(h, "api")) for h in hosts] == [False, False, True]
    table = cluster.pyoverlay(h1, "status", check=True).stdout
    assert f"api: {h3.addr}: being removed, in use by busy" in table

    # The last container leaves: the network goes from h3 too.
    h3.docker("rm", "-f", "busy")
    wait_for(lambda: inspect(h3, "api") is None, CONVERGE, "api to go from h3 once unused")
    status = json.loads(cluster.pyoverlay(h1, "status", "--json", check=True).stdout)
    assert [n for n in status["networks"] if n["name"] == "api"] == []

    # A host whose plugin stopped shows as down, with when it was last seen.
    h3.stop_plugin()
    status = json.loads(cluster.pyoverlay(h1, "status", "--json", check=True).stdout)
    down = next(s for s in status["hosts"] if s["host"] == h3.addr)
    assert down["alive"] is False and time.time() - 120 < down["last_seen"] <= time.time()


def test_doctor_reports_a_planted_stale_and_a_deleted_peer_entry(cluster, hosts):
    h1, h2, _ = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.47.0.0/24",
              "-o", "vni=4700", "dr")
    appears([h2], "dr", time.monotonic())
    run(h1, "far", "dr")
    run(h2, "near", "dr")
    far_ip = ip_of(h1, "far", "dr")
    far_mac = h1.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "dr").MacAddress}}', "far")

    def fdb(host):
        return host.run(["bridge", "-n", "pyo-4700", "fdb", "show", "dev", "vxlan0"]).stdout

    wait_for(lambda: far_mac in fdb(h2), CONVERGE, "far's FDB entry on h2")

    def doctor():
        proc = cluster.pyoverlay(h2, "doctor", "--json", "--advertise-addr", h2.addr,
                                 "--docker-host", f"unix://{h2.dir}/docker.sock")
        return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)["checks"]}

    # Behind the plugin's back: an entry for a peer nobody has, and a real one gone.
    h2.run(["bridge", "-n", "pyo-4700", "fdb", "append", "02:50:0a:2f:00:fa", "dev", "vxlan0", "dst", "10.99.0.9",
            "self", "permanent"])
    h2.run(["ip", "-n", "pyo-4700", "neigh", "replace", "10.47.0.250", "lladdr", "02:50:0a:2f:00:fa", "dev",
            "vxlan0", "nud", "permanent"])
    h2.run(["bridge", "-n", "pyo-4700", "fdb", "del", far_mac, "dev", "vxlan0", "self"])
    status, checks = doctor()
    assert status == 1
    assert checks["peers"]["status"] == "fail", checks["peers"]
    assert checks["peers"]["details"] == [
        f"VNI 4700: missing {far_ip} {far_mac} via {h1.addr}",
        "VNI 4700: stale 10.47.0.250 02:50:0a:2f:00:fa via 10.99.0.9",
    ]
    assert "restart the plugin" in checks["peers"]["summary"]
    assert [n for n, c in checks.items() if c["status"] == "fail"] == ["peers"]

    # What it says to do: a restarted plugin reconciles the kernel with the store.
    h2.stop_plugin()
    cluster.start_plugin(h2)
    wait_for(lambda: doctor()[0] == 0, CONVERGE, lambda: f"a clean doctor on h2 after the restart: {doctor()[1]}")
    assert pings(h2, "near", far_ip)


def test_engine_restart_while_networks_are_created_elsewhere(cluster, hosts):
    h1, h2, h3 = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.43.0.0/24",
              "keep")
    appears([h3], "keep", time.monotonic())
    # Comes back with the engine: the engine calls the plugin while it starts.
    run(h3, "survivor", "keep", "--restart", "always", "--init")
    run(h1, "prober", "keep")

    restarted = threading.Event()
    failure: list[BaseException] = []

    def restart():
        try:
            h3.restart_engine()
        except BaseException as e:  # reported by the test thread
            failure.append(e)
        finally:
            restarted.set()

    thread = threading.Thread(target=restart)
    t0 = time.monotonic()
    thread.start()
    made = []
    # Networks keep coming on h1 for the whole restart (at least three, at most ten).
    while len(made) < 3 or (not restarted.is_set() and len(made) < 10):
        name = f"n{len(made)}"
        h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                  "--subnet", f"10.44.{len(made)}.0/24", name)
        made.append(name)
    thread.join(60)
    assert not thread.is_alive() and not failure, failure
    # An engine that stops while creating a network may leave it half made in
    # the plugin; the catalog forgets such leftovers after a grace period.
    took = max(appears([h3, h2], name, t0) for name in made)
    print(f"\nh3's engine restarted in {h3.timings['engine_restart']:.1f}s; {len(made)} networks made meanwhile "
          f"on h1, all on h3 {took:.1f}s after the restart began")

    # No deadlock: the engine, the plugin and the restart-policy container all answer.
    assert h3.plugin_running
    assert h3.plugin_request("Plugin.Activate")[0] == 200
    wait_for(lambda: h3.docker("inspect", "-f", "{{.State.Running}}", "survivor") == "true", CONVERGE,
             "the restart-policy container to run again")
    assert pings(h1, "prober", ip_of(h3, "survivor", "keep"))
    assert "catalog: lost the engine" in h3.plugin_log() or "catalog: the Docker engine" in h3.plugin_log()
    # A network made on h3 after the restart still reaches the others.
    h3.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.44.99.0/24",
              "after")
    appears([h1, h2], "after", time.monotonic())


def test_leftovers_of_an_engine_stopped_mid_create_are_forgotten(cluster, hosts):
    """An engine that stops between the plugin's answers and keeping the
    network leaves a network record and a pool hold (or, stopped during the
    rollback, a bare pool hold) that would block the subnet on that host for
    good. Made here by calling h3's plugin as its engine would, then stopping."""
    h1, h2, h3 = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.47.9.0/24",
              "anchor")
    appears([h3], "anchor", time.monotonic())
    before = scrape(h3).get(("pyoverlay_catalog_actions_total", (("action", "forgotten"),)), 0)

    def request(call, body):
        status, answer = h3.plugin_request(call, body)
        assert status == 200, (call, answer)
        return answer

    made = time.monotonic()
    pool = request("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "10.47.0.0/24",
                                              "Options": {}, "V6": False})["PoolID"]
    gateway = request("IpamDriver.RequestAddress", {
        "PoolID": pool, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})["Address"]
    request("NetworkDriver.CreateNetwork", {
        "NetworkID": "f" * 64, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": pool, "Gateway": gateway}], "IPv6Data": []})
    request("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "10.47.1.0/24", "Options": {}, "V6": False})

    t0 = time.monotonic()
    for i, name in enumerate(("ghost", "ghost2")):
        h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                  "--subnet", f"10.47.{i}.0/24", name)
    took = max(appears([h3], name, t0) for name in ("ghost", "ghost2"))
    print(f"\nleftovers forgotten and both networks on h3 {took:.1f}s after they were made on h1")
    # Never before the grace period: a create in flight looks the same for a moment.
    assert time.monotonic() - made >= PHANTOM_GRACE
    after = scrape(h3)[("pyoverlay_catalog_actions_total", (("action", "forgotten"),))]
    assert after - before == 2
    doctor = cluster.pyoverlay(h3, "doctor", "--json", "--advertise-addr", h3.addr,
                               "--docker-host", f"unix://{h3.dir}/docker.sock")
    assert doctor.returncode == 0, doctor.stdout
