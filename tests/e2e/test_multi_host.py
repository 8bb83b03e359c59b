"""pyoverlay across three hosts, through three real engines (issue 3's
end-to-end list).

One etcd runs in the underlay namespace (10.99.0.254, reachable from every
host); each host runs its own dockerd and its own pyoverlay with
`--store etcd://10.99.0.254:<port>`. The cluster is made once for the module;
each test uses networks of its own (own subnet, own VNI) and everything it
made is removed after it. Checks are made from outside the plugin: what the
containers reach (busybox ping by IP), what each host's kernel holds (the
overlay namespace pyo-<vni> under the host's /run/netns: vxlan0's permanent
neighbour entries and its FDB), and which keys etcd holds.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, HostFactory, clear_hosts
from tests.etcdserver import EtcdServer
from tests.hosts_ssh import HOSTS_ENV, RemoteEtcd
from tests.hosts import IMAGE, UNDERLAY_ADDR, NamespaceHost, wait_for

#: Also run on VMs over SSH (PYOVERLAY_E2E_HOSTS), but for the tests marked namespace_only.
pytestmark = pytest.mark.vm

STORE_PREFIX = "/pyoverlay/"
#: Key families of networks, endpoints and addresses (driver/state.py's layout).
OVERLAY_KEYS = ("overlays/", "subnets/", "networks/", "endpoints/", "peers/", "pools/", "addresses/")
#: The driver's own multi-host contract is tested here: each host runs the
#: same `docker network create`, and `docker network rm` on one host leaves
#: the others' networks alone. So the catalog, which shares networks between
#: hosts (tests/e2e/test_cluster_networks.py), is off.
PLUGIN_ENV = {"PYOVERLAY_CATALOG": "0"}
#: Bound for what the watch must make happen on other hosts (the goal is ms).
CONVERGE = 5.0

# Pings each argument once (-c1 -W1), all at once, and prints "ok IP" or "no IP".
REACH = r'for ip in "$@"; do (if ping -c1 -W1 "$ip" >/dev/null 2>&1; then echo "ok $ip"; else echo "no $ip"; fi) & done; wait'


@dataclass
class Cluster:
    etcd: EtcdServer
    factory: HostFactory
    hosts: list[NamespaceHost]


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    workdir = Path(e2e_workdir) / "etcd"
    workdir.mkdir(exist_ok=True)
    factory = HostFactory(underlay, e2e_workdir, image_tar)
    vms = bool(os.environ.get(HOSTS_ENV))
    etcd = None if vms else EtcdServer(UNDERLAY_ADDR, netns=underlay.netns, workdir=str(workdir))
    try:
        t0 = time.monotonic()
        if etcd is not None:
            etcd.start()
        # Nothing makes docker_gwbridge beforehand: each engine makes its own on first use.
        hosts = factory(3, engine_gwbridge=True)
        if etcd is None:  # the VMs share the etcd the Vagrantfile runs on the first one
            etcd = RemoteEtcd(hosts[0].configured_env()["PYOVERLAY_STORE"], via=hosts[0])
        for h in hosts:
            h.start_plugin(etcd.url, env=PLUGIN_ENV)
        print(f"\ncluster up in {time.monotonic() - t0:.1f}s (etcd {etcd.url})")
        yield Cluster(etcd, factory, hosts)
    finally:
        try:
            factory.close()
        finally:
            if isinstance(etcd, EtcdServer):
                etcd.close()


@pytest.fixture
def hosts(request, cluster):
    """The three hosts; after the test, every container and pyoverlay network
    is removed and every plugin is running again."""
    request.node.stash[FACTORY] = cluster.factory  # plugin and engine logs in a failure report
    yield cluster.hosts
    for h in cluster.hosts:
        if not h.plugin_running:
            h.start_plugin(cluster.etcd.url, env=PLUGIN_ENV)
    clear_hosts(cluster.hosts)


# -- helpers ------------------------------------------------------------------

def create_network(host: NamespaceHost, name: str, subnet: str, *opts: str) -> str:
    return host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                       "--subnet", subnet, *opts, name)


def create_everywhere(hosts, name: str, subnet: str, vni: int) -> None:
    for h in hosts:
        create_network(h, name, subnet, "-o", f"vni={vni}")


def run(host: NamespaceHost, name: str, network: str, *opts: str) -> None:
    host.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sleep", "3600")


def ip_of(host: NamespaceHost, container: str, network: str) -> str:
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                       container)


def mac_of(host: NamespaceHost, container: str, network: str) -> str:
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").MacAddress}}}}',
                       container)


def reach(host: NamespaceHost, container: str, ips) -> dict[str, bool]:
    """One ping (-c1 -W1) from container to each ip, in parallel: ip -> answered."""
    ips = list(ips)
    out = host.docker("exec", container, "sh", "-c", REACH, "sh", *ips, timeout=30)
    result = {}
    for line in out.splitlines():
        verdict, ip = line.split()
        result[ip] = verdict == "ok"
    assert set(result) == set(ips), f"ping script printed {out!r}"
    return result


def ping_once(host: NamespaceHost, container: str, ip: str):
    return host.docker_proc("exec", container, "ping", "-c1", "-W1", ip, check=False)


def overlay_ns(vni: int) -> str:
    return f"pyo-{vni}"


def peers_on(host: NamespaceHost, vni: int) -> dict[str, tuple[str, set[str]]]:
    """vxlan0 of the host's overlay namespace for vni, as the kernel holds it:
    ip -> (mac of its permanent neighbour entry, VTEPs the FDB gives that MAC).
    Empty if the host has no such namespace."""
    ns = overlay_ns(vni)
    if ns not in host.netns_names():
        return {}
    neigh = json.loads(host.run(["ip", "-n", ns, "-j", "neigh", "show", "dev", "vxlan0"]).stdout or "[]")
    fdb = json.loads(host.run(["bridge", "-n", ns, "-j", "fdb", "show", "dev", "vxlan0"]).stdout or "[]")
    vteps: dict[str, set[str]] = {}
    for entry in fdb:
        if entry.get("dst"):
            vteps.setdefault(entry["mac"].lower(), set()).add(entry["dst"])
    return {entry["dst"]: (entry["lladdr"].lower(), vteps.get(entry["lladdr"].lower(), set()))
            for entry in neigh if "PERMANENT" in entry.get("state", []) and entry.get("lladdr")}


def kernel_dump(host: NamespaceHost, vni: int) -> str:
    ns = overlay_ns(vni)
    if ns not in host.netns_names():
        return f"{host.name}: no namespace {ns} (has {host.netns_names()})"
    neigh = host.run(["ip", "-n", ns, "neigh", "show", "dev", "vxlan0"], check=False).stdout
    fdb = host.run(["bridge", "-n", ns, "fdb", "show", "dev", "vxlan0"], check=False).stdout
    learned = "".join(line + "\n" for line in
                      host.run(["bridge", "-n", ns, "fdb", "show", "br", "br0"], check=False).stdout.splitlines()
                      if "permanent" not in line)
    return f"{host.name} {ns}:\nvxlan0 neigh:\n{neigh}vxlan0 fdb:\n{fdb}br0 learned:\n{learned}"


def wait_peers(host: NamespaceHost, vni: int, expected: dict[str, tuple[str, str]], what: str,
               timeout: float = CONVERGE) -> float:
    """Wait until the host's vxlan0 holds exactly expected (ip -> (mac, vtep)); returns the wait."""
    want = {ip: (mac.lower(), {vtep}) for ip, (mac, vtep) in expected.items()}
    t0 = time.monotonic()
    wait_for(lambda: peers_on(host, vni) == want, timeout,
             lambda: f"{what}: want {want}\n{kernel_dump(host, vni)}")
    return time.monotonic() - t0


def store_keys(etcd: EtcdServer) -> dict[str, dict]:
    """Every pyoverlay key in etcd (prefix stripped), read from etcd itself."""
    start = STORE_PREFIX.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {
        "key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
    return {base64.b64decode(kv["key"]).decode()[len(STORE_PREFIX):]: json.loads(base64.b64decode(kv["value"]))
            for kv in data.get("kvs", [])}


# -- tests --------------------------------------------------------------------

def test_every_container_reaches_every_other_across_hosts(hosts):
    vni, subnet = 4101, "10.40.1.0/24"
    create_everywhere(hosts, "blue", subnet, vni)
    where = {}  # container -> host
    for h in hosts:
        for i in (1, 2):
            name = f"c{h.index}{i}"
            run(h, name, "blue")
            where[name] = h
    ips = {c: ip_of(h, c, "blue") for c, h in where.items()}
    macs = {c: mac_of(h, c, "blue") for c, h in where.items()}

    values = list(ips.values())
    assert len(set(values)) == len(values), f"an address was handed out twice: {ips}"
    net = ipaddress.ip_network(subnet)
    for ip in values:
        assert ipaddress.ip_address(ip) in net, ips
    gateways = {h.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "blue") for h in hosts}
    assert len(gateways) == 1 and not gateways & set(values), f"gateways {gateways}, containers {ips}"

    # Each host's vxlan0 holds exactly the other hosts' containers.
    for h in hosts:
        remote = {ips[c]: (macs[c], where[c].addr) for c in ips if where[c] is not h}
        wait_peers(h, vni, remote, f"{h.name}: peers of the other hosts")

    failures = []
    for c, h in where.items():
        targets = [ips[o] for o in ips if o != c]
        for ip, ok in reach(h, c, targets).items():
            if not ok:
                failures.append(f"{c}@{h.name} -> {ip}")
    assert failures == [], f"not reachable: {failures}"


def test_other_network_is_unreachable_both_ways(hosts):
    h1, h2, _ = hosts
    create_everywhere(hosts[:2], "blue", "10.40.2.0/24", 4102)
    before = set(h1.netns_names())
    create_network(h1, "red", "10.40.3.0/24")  # keyed by subnet: the VNI is the plugin's choice
    create_network(h2, "red", "10.40.3.0/24")
    red_ns = set(h1.netns_names()) - before
    assert len(red_ns) == 1, f"new namespaces on {h1.name}: {red_ns}"
    red_vni = int(red_ns.pop().split("-")[1])
    assert overlay_ns(red_vni) in h2.netns_names(), "the two hosts' red networks got different VNIs"

    run(h1, "b1", "blue")
    run(h2, "b2", "blue")
    run(h1, "r1", "red")
    run(h2, "r2", "red")
    b1, b2 = ip_of(h1, "b1", "blue"), ip_of(h2, "b2", "blue")
    r1, r2 = ip_of(h1, "r1", "red"), ip_of(h2, "r2", "red")

    # Each overlay carries only its own peers.
    wait_peers(h1, 4102, {b2: (mac_of(h2, "b2", "blue"), h2.addr)}, "blue peers on h1")
    wait_peers(h1, red_vni, {r2: (mac_of(h2, "r2", "red"), h2.addr)}, "red peers on h1")
    wait_peers(h2, 4102, {b1: (mac_of(h1, "b1", "blue"), h1.addr)}, "blue peers on h2")
    wait_peers(h2, red_vni, {r1: (mac_of(h1, "r1", "red"), h1.addr)}, "red peers on h2")

    seen = {
        "b1": reach(h1, "b1", [b2, r1, r2]),
        "b2": reach(h2, "b2", [b1, r1, r2]),
        "r1": reach(h1, "r1", [r2, b1, b2]),
        "r2": reach(h2, "r2", [r1, b1, b2]),
    }
    expected = {
        "b1": {b2: True, r1: False, r2: False},
        "b2": {b1: True, r1: False, r2: False},
        "r1": {r2: True, b1: False, b2: False},
        "r2": {r1: True, b1: False, b2: False},
    }
    assert seen == expected, f"blue {b1} {b2}, red {r1} {r2}"


def test_removed_container_leaves_no_entries_on_other_hosts(hosts):
    h1, h2, h3 = hosts
    vni = 4103
    create_everywhere(hosts, "blue", "10.40.4.0/24", vni)
    run(h1, "cx", "blue")
    x_ip, x_mac = ip_of(h1, "cx", "blue"), mac_of(h1, "cx", "blue")
    for h in (h2, h3):
        wait_peers(h, vni, {x_ip: (x_mac, h1.addr)}, f"{h.name}: x programmed")

    h1.docker("rm", "-f", "cx")
    t0 = time.monotonic()
    for h in (h2, h3):
        wait_peers(h, vni, {}, f"{h.name}: x's entries removed")
    print(f"\nremoved container's entries gone from two hosts {time.monotonic() - t0:.3f}s after docker rm")
    for h in (h2, h3):
        fdb = h.run(["bridge", "-n", overlay_ns(vni), "fdb", "show", "dev", "vxlan0"]).stdout
        assert x_mac.lower() not in fdb.lower(), f"{h.name} still has an FDB entry for {x_mac}:\n{fdb}"


def test_network_rm_on_one_host_leaves_the_others_working(hosts, cluster):
    h1, h2, h3 = hosts
    vni, subnet = 4105, "10.40.6.0/24"
    create_everywhere(hosts, "blue", subnet, vni)
    for h in hosts:
        run(h, f"c{h.index}", "blue")
    ips = {h.index: ip_of(h, f"c{h.index}", "blue") for h in hosts}
    assert reach(h2, "c2", [ips[1], ips[3]]) == {ips[1]: True, ips[3]: True}

    h1.docker("rm", "-f", "c1")
    h1.docker("network", "rm", "blue")
    assert overlay_ns(vni) not in h1.netns_names(), f"{h1.name} kept {overlay_ns(vni)} after docker network rm"
    wait_peers(h2, vni, {ips[3]: (mac_of(h3, "c3", "blue"), h3.addr)}, "h2 after h1 left")
    assert reach(h2, "c2", [ips[3]]) == {ips[3]: True}
    assert reach(h3, "c3", [ips[2]]) == {ips[2]: True}
    # The pool and overlay live on for the others: new containers, new addresses.
    # (On an address never used here: reuse has a test of its own.)
    run(h2, "d2", "blue", "--ip", "10.40.6.200")
    d2 = ip_of(h2, "d2", "blue")
    assert d2 == "10.40.6.200"
    assert ping_once(h3, "c3", d2).returncode == 0, (
        f"c3 cannot reach the new d2 {d2}\n{kernel_dump(h3, vni)}\n{kernel_dump(h2, vni)}")
    keys = store_keys(cluster.etcd)
    assert sorted(keys[f"overlays/{vni}"]["networks"]) == sorted([h2.addr, h3.addr]), keys[f"overlays/{vni}"]
    assert sorted(keys["pools/10.40.6.0_24"]["hosts"]) == sorted([h2.addr, h3.addr]), keys["pools/10.40.6.0_24"]

    # h1 comes back into the same overlay.
    create_network(h1, "blue", subnet, "-o", f"vni={vni}")
    run(h1, "e1", "blue")
    e1 = ip_of(h1, "e1", "blue")
    assert e1 not in (ips[2], ips[3], d2)
    assert reach(h1, "e1", [ips[2], ips[3], d2]) == {ips[2]: True, ips[3]: True, d2: True}

    # Gone from every host, the overlay leaves nothing in the store (per-host
    # records such as hosts/ are not the overlay's).
    for h in hosts:
        containers = h.docker("ps", "-aq").split()
        if containers:
            h.docker("rm", "-f", *containers)
        h.docker("network", "rm", "blue")
        assert overlay_ns(vni) not in h.netns_names()
    left = sorted(k for k in store_keys(cluster.etcd) if k.startswith(OVERLAY_KEYS))
    assert left == [], f"keys left in etcd after the network was removed everywhere: {left}"


def test_new_container_answers_first_ping_from_another_host(hosts):
    vni = 4106
    create_everywhere(hosts, "blue", "10.40.7.0/24", vni)
    for h in hosts:
        run(h, f"l{h.index}", "blue")
    pairs = [(a, b) for a in hosts for b in hosts if a is not b]
    failures, lags = [], []
    for n, (a, b) in enumerate(pairs * 2):
        name = f"n{n}"
        explicit = n < len(pairs)  # first round --ip (no lookup between run and ping), then IPAM's choice
        if explicit:
            ip = f"10.40.7.{100 + n}"
            a.docker("run", "-d", "--name", name, "--network", "blue", "--ip", ip, IMAGE, "sleep", "3600")
        else:
            run(a, name, "blue")
            ip = ip_of(a, name, "blue")
        returned = time.monotonic()
        proc = ping_once(b, f"l{b.index}", ip)
        lags.append(time.monotonic() - returned)
        if proc.returncode != 0:
            failures.append(f"{name} {ip} on {a.name} from l{b.index} on {b.name}: {proc.stdout.strip()} "
                            f"{proc.stderr.strip()}\n{kernel_dump(b, vni)}")
    print(f"\n{len(lags)} first pings, docker run -d returned -> reply in "
          f"{min(lags) * 1000:.0f}..{max(lags) * 1000:.0f} ms (including docker exec)")
    assert failures == [], "no answer to the first ping:\n" + "\n".join(failures)


def test_restarted_plugin_reconciles_peers(hosts, cluster):
    h1, h2, h3 = hosts
    vni = 4107
    create_everywhere(hosts, "blue", "10.40.8.0/24", vni)
    run(h3, "cy", "blue")
    run(h1, "gone", "blue")
    run(h1, "stays", "blue")
    peer = {c: (ip_of(h1, c, "blue"), mac_of(h1, c, "blue")) for c in ("gone", "stays")}
    before = {ip: (mac, h1.addr) for ip, mac in peer.values()}
    wait_peers(h3, vni, before, "h3 before the restart")

    h3.kill_plugin()
    h1.docker("rm", "-f", "gone")
    run(h2, "came", "blue", "--ip", "10.40.8.100")  # not gone's address: its entry must simply go
    came = (ip_of(h2, "came", "blue"), mac_of(h2, "came", "blue"))
    # Nothing on h3 can have noticed: its kernel still says what it said.
    assert peers_on(h3, vni) == {ip: (mac, {vtep}) for ip, (mac, vtep) in before.items()}

    t0 = time.monotonic()
    h3.start_plugin(cluster.etcd.url, env=PLUGIN_ENV)
    started = time.monotonic() - t0
    after = {peer["stays"][0]: (peer["stays"][1], h1.addr), came[0]: (came[1], h2.addr)}
    waited = wait_peers(h3, vni, after, "h3 reconciled after the restart", timeout=10)
    print(f"\nplugin restart: answering in {started:.2f}s, peers reconciled {waited:.3f}s later")
    # The container that ran through the restart reaches the survivors and the newcomer.
    assert reach(h3, "cy", [peer["stays"][0], came[0]]) == {peer["stays"][0]: True, came[0]: True}
    assert ping_once(h3, "cy", peer["gone"][0]).returncode != 0
    # And the restarted plugin serves new containers.
    run(h3, "cz", "blue")
    assert ping_once(h2, "came", ip_of(h3, "cz", "blue")).returncode == 0


def assert_first_ping(host: NamespaceHost, container: str, ip: str, where: str, vni: int, *dump_hosts) -> None:
    proc = ping_once(host, container, ip)
    assert proc.returncode == 0, (
        f"{container} on {host.name} got no answer from {ip} ({where}) on the first try:\n"
        f"{proc.stdout}{proc.stderr}\n" + "\n".join(kernel_dump(h, vni) for h in dump_hosts))


@pytest.mark.parametrize("to", ["unrelated_host", "host_that_talked_to_the_old_holder"])
def test_freed_address_reused_on_another_host_is_reachable_at_once(hosts, to):
    """An address freed on h1 and taken at once (--ip) on another host. Every
    host reaches it on the first ping: fresh containers, and one that talked
    to the old holder (its ARP cache and its host's bridge knew the old one).
    The new holder is h3, whose containers never saw the old one, or h2, whose
    container pinged the old holder just before (so h2's bridge had learned
    the address's MAC behind vxlan0)."""
    h1, h2, h3 = hosts
    vni, ip = 4104, "10.40.5.50"
    create_everywhere(hosts, "blue", "10.40.5.0/24", vni)
    run(h2, "watcher", "blue")
    run(h1, "old", "blue", "--ip", ip)
    old_mac = mac_of(h1, "old", "blue")
    wait_peers(h2, vni, {ip: (old_mac, h1.addr)}, "old programmed on h2")
    assert reach(h2, "watcher", [ip]) == {ip: True}, "the old holder of the address was not reachable"

    new_host, others = (h3, (h1, h2)) if to == "unrelated_host" else (h2, (h1, h3))
    h1.docker("rm", "-f", "old")
    run(new_host, "new", "blue", "--ip", ip)
    for h in others:
        run(h, f"fresh{h.index}", "blue")
        assert_first_ping(h, f"fresh{h.index}", ip, f"now on {new_host.name}", vni, h, new_host)
    # The watcher, whose ARP cache knew the old holder, reaches the new one too.
    assert_first_ping(h2, "watcher", ip, f"now on {new_host.name}", vni, h2)

    new_mac = mac_of(new_host, "new", "blue")
    for h in others:
        got = peers_on(h, vni).get(ip)
        assert got == (new_mac.lower(), {new_host.addr}), (
            f"{h.name} maps {ip} to {got}, not ({new_mac}, {new_host.addr})\n{kernel_dump(h, vni)}")
    assert ip not in peers_on(new_host, vni), f"{new_host.name} programs its own container as a peer"


@pytest.mark.namespace_only  # the underlay's web server
def test_egress_and_published_port_on_the_engines_own_gwbridge(hosts, underlay_http):
    """Each engine made docker_gwbridge itself when its first container
    needed a way out. They all pick the same subnet (the first of Docker's
    default pools free on the host); that must not matter: it is NATed per
    host, and across hosts only the overlay and the underlay carry traffic."""
    url, token = underlay_http
    h1, h2 = hosts[:2]
    create_everywhere(hosts[:2], "gw", "10.40.9.0/24", 4109)
    run(h1, "www", "gw", "-p", "8089:80")
    h1.docker("exec", "www", "sh", "-c", "mkdir -p /www && echo published-gw > /www/index.html && "
              "(httpd -p 80 -h /www &)")
    run(h2, "cli", "gw")
    subnets = {h.name: h.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", "docker_gwbridge")
               for h in (h1, h2)}
    print(f"\ndocker_gwbridge as the engines made it: {subnets}")
    for h, c in ((h1, "www"), (h2, "cli")):
        assert h.docker("exec", c, "wget", "-qO-", url) == token, f"{c}@{h.name}: no way out"
    # -p on h1, from a container on h2 (through h2's gwbridge, the underlay, h1's gwbridge).
    published = f"http://{h1.addr}:8089/"
    wait_for(lambda: h2.docker_proc("exec", "cli", "wget", "-qO-", published, check=False).stdout == "published-gw\n",
             10, f"{published} from a container on {h2.name}")
    # And the overlay between them still works beside two gwbridges of one subnet.
    assert reach(h2, "cli", [ip_of(h1, "www", "gw")]) == {ip_of(h1, "www", "gw"): True}
