"""pyoverlay on one host, through the real engine (issue 2's end-to-end list).

Each test gets a fresh host whose underlay link has MTU 1400 and a running
plugin with the embedded sqlite store. Checks are made from outside the
plugin: what the containers can reach, what the kernel holds, which keys
the store keeps.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

import pytest

from tests.hosts import IMAGE, Host, wait_for
from tests.hosts_ssh import HOSTS_ENV

#: Also run on VMs over SSH (PYOVERLAY_E2E_HOSTS), but for the tests marked namespace_only.
pytestmark = pytest.mark.vm

UNDERLAY_MTU = 1400
VXLAN_OVERHEAD = 50
SUBNET = "10.20.0.0/24"
# Store keys that belong to networks, endpoints and their addresses; host
# records (hosts/, seen/) stay after the last network is gone.
NETWORK_STATE = ("networks/", "endpoints/", "peers/", "addresses/", "pools/", "overlays/", "subnets/")

# Reads every key of the store read-only. Only the `kv` table's `key` column
# is assumed, so the test does not depend on the rest of the layout.
STORE_KEYS = r"""
import json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(json.dumps([row[0] for row in db.execute("SELECT key FROM kv ORDER BY key")]))
"""


def store_db(host: Host) -> str:
    return f"{host.state_dir}/state.db"


@pytest.fixture
def host(make_hosts):
    # As on a fresh machine: nothing made docker_gwbridge, the engine does on first use.
    # A VM's underlay MTU is its own (the MTU test is namespace_only).
    (h,) = make_hosts(1, mtu=None if os.environ.get(HOSTS_ENV) else UNDERLAY_MTU, engine_gwbridge=True)
    h.start_plugin(f"sqlite://{store_db(h)}")
    return h


@pytest.fixture
def baseline(host):
    """The host's links and namespaces before the test made anything."""
    return kernel_state(host)


def kernel_state(host: Host) -> tuple[list[str], list[str]]:
    # docker_gwbridge is the engine's: made on first use, it stays, as on any Docker host.
    return sorted(set(host.links()) - {"docker_gwbridge"}), host.netns_names()


def store_keys(host: Host) -> list[str]:
    return json.loads(host.run([host.python, "-c", STORE_KEYS, store_db(host)]).stdout)


def assert_clean(host: Host, baseline) -> None:
    """Nothing of pyoverlay's is left: no link, no namespace, no network state in the store."""
    links, netns = kernel_state(host)
    assert links == baseline[0], (
        f"links left in the host namespace: {sorted(set(links) - set(baseline[0]))}; "
        f"gone: {sorted(set(baseline[0]) - set(links))}")
    assert netns == baseline[1], f"namespaces left: {sorted(set(netns) - set(baseline[1]))}"
    keys = store_keys(host)
    leftover = [k for k in keys if k.startswith(NETWORK_STATE)]
    assert leftover == [], f"store keys left after everything was removed: {leftover} (all keys: {keys})"


def create_network(host: Host, name: str, subnet: str, *opts: str) -> str:
    return host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                       "--subnet", subnet, *opts, name)


def run(host: Host, name: str, *opts: str, cmd=("sleep", "3600")) -> None:
    host.docker("run", "-d", "--name", name, *opts, IMAGE, *cmd)


def ip_on(host: Host, container: str, network: str) -> str:
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
                       container)


def interfaces(host: Host, container: str) -> dict[str, str]:
    """IPv4 address -> interface name inside the container."""
    out = host.docker("exec", container, "ip", "-o", "-4", "addr", "show")
    return {m.group(2): m.group(1) for m in re.finditer(r"^\d+: (\S+)\s+inet ([\d.]+)/", out, re.M)}


def mtu_of(host: Host, container: str, ifname: str) -> int:
    return int(host.docker("exec", container, "cat", f"/sys/class/net/{ifname}/mtu"))


def underlay_mtu(host: Host) -> int:
    """The MTU of the interface holding the host's underlay address (a VM's is its own)."""
    for link in json.loads(host.run(["ip", "-j", "addr", "show"]).stdout):
        if any(a.get("local") == host.addr for a in link.get("addr_info", [])):
            return link["mtu"]
    raise AssertionError(f"{host.name}: no interface holds {host.addr}")


def ping(host: Host, container: str, ip: str, wait: int = 2):
    return host.docker_proc("exec", container, "ping", "-c1", f"-W{wait}", ip, check=False)


def assert_pings(host: Host, container: str, ip: str) -> None:
    proc = ping(host, container, ip)
    assert proc.returncode == 0, f"{container} cannot ping {ip}:\n{proc.stdout}{proc.stderr}"


def assert_no_ping(host: Host, container: str, ip: str) -> None:
    # On one host an answer takes well under a millisecond: 1 s is ample.
    proc = ping(host, container, ip, wait=1)
    assert proc.returncode != 0, f"{container} still reaches {ip}:\n{proc.stdout}"


def remove(host: Host, *containers: str, networks=()) -> None:
    if containers:
        host.docker("rm", "-f", *containers)
    for network in networks:
        host.docker("network", "rm", network)


def test_two_containers_ping_then_nothing_is_left(host, baseline):
    create_network(host, "web", SUBNET)
    assert host.docker("network", "inspect", "-f", "{{.Driver}} {{.IPAM.Driver}}", "web") == "pyoverlay pyoverlay"
    run(host, "c1", "--network", "web")
    run(host, "c2", "--network", "web")
    ip1, ip2 = ip_on(host, "c1", "web"), ip_on(host, "c2", "web")
    assert ip1 != ip2 and ip1.startswith("10.20.0.") and ip2.startswith("10.20.0.")
    assert interfaces(host, "c1")[ip1] == "eth0"
    assert_pings(host, "c1", ip2)
    assert_pings(host, "c2", ip1)

    remove(host, "c1", "c2", networks=["web"])
    assert_clean(host, baseline)


@pytest.mark.namespace_only  # the underlay's MTU, or the underlay as the far end
def test_mtu_derived_from_underlay_and_overridden(host):
    assert host.links()["eth0"]["mtu"] == UNDERLAY_MTU
    create_network(host, "web", SUBNET)
    create_network(host, "small", "10.20.1.0/24", "-o", "com.docker.network.driver.mtu=1300")
    run(host, "c1", "--network", "web")
    run(host, "c2", "--network", "web")
    run(host, "c3", "--network", "small")
    assert mtu_of(host, "c1", "eth0") == UNDERLAY_MTU - VXLAN_OVERHEAD
    assert mtu_of(host, "c3", "eth0") == 1300
    # The host ends of the veths (in the plugin's namespaces) too: libnetwork
    # sets the MTU on neither end, and a mismatch drops full-size frames.
    veth_mtus = sorted(
        sorted({link["mtu"] for link in host.links(ns).values()
                if link.get("linkinfo", {}).get("info_kind") == "veth"})
        for ns in host.netns_names())
    assert veth_mtus == [[1300], [UNDERLAY_MTU - VXLAN_OVERHEAD]], f"veth MTUs per namespace: {veth_mtus}"
    # A full-size packet crosses the overlay (1322 + 8 ICMP + 20 IP = 1350).
    proc = host.docker_proc("exec", "c1", "ping", "-c1", "-W2", "-s", "1322", ip_on(host, "c2", "web"), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.namespace_only  # the underlay's MTU, or the underlay as the far end
def test_published_port_reachable(host, underlay):
    create_network(host, "web", SUBNET)
    run(host, "www", "--network", "web", "-p", "8080:80",
        cmd=("sh", "-c", "mkdir /www && echo published-ok > /www/index.html && exec httpd -f -p 80 -h /www"))
    url = f"http://{host.addr}:8080/"

    def fetched(runner) -> bool:
        return runner.run(["busybox", "wget", "-qO-", url], check=False).stdout == "published-ok\n"

    wait_for(lambda: fetched(host), 10, f"{url} from the host namespace")
    assert fetched(underlay), f"{url} not reachable from the underlay"


def gwbridge(host: Host) -> tuple[str, str]:
    """docker_gwbridge's subnet and gateway, as the engine chose them."""
    return tuple(host.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}} "
                             "{{(index .IPAM.Config 0).Gateway}}", "docker_gwbridge").split())


@pytest.mark.namespace_only  # the underlay's MTU, or the underlay as the far end
def test_outbound_through_gwbridge(host, underlay_http):
    url, token = underlay_http
    assert host.docker_proc("network", "inspect", "docker_gwbridge", check=False).returncode != 0, \
        "docker_gwbridge existed before the first container: the engine's own is not what is tested"
    create_network(host, "web", SUBNET)
    run(host, "c1", "--network", "web")
    subnet, gateway = gwbridge(host)  # made by the engine for c1
    print(f"\nthe engine made docker_gwbridge {subnet} (gateway {gateway})")
    net = ipaddress.ip_network(subnet)
    gw_ifname = [name for ip, name in interfaces(host, "c1").items() if ipaddress.ip_address(ip) in net]
    assert gw_ifname == ["eth1"], f"expected eth1 on docker_gwbridge {subnet}, got {interfaces(host, 'c1')}"
    routes = host.docker("exec", "c1", "ip", "route")
    assert re.search(rf"^default via {re.escape(gateway)} dev eth1", routes, re.M), routes
    assert host.docker("exec", "c1", "wget", "-qO-", url) == token


@pytest.mark.namespace_only  # the underlay's MTU, or the underlay as the far end
def test_internal_network_has_no_way_out(host, underlay):
    create_network(host, "inner", "10.20.2.0/24", "--internal")
    run(host, "c1", "--network", "inner")
    run(host, "c2", "--network", "inner")
    assert sorted(interfaces(host, "c1").values()) == ["eth0", "lo"], "an internal network got docker_gwbridge"
    assert "default" not in host.docker("exec", "c1", "ip", "route")
    assert_no_ping(host, "c1", underlay.addr)
    assert_pings(host, "c1", ip_on(host, "c2", "inner"))
    assert_pings(host, "c2", ip_on(host, "c1", "inner"))


def test_connect_and_disconnect_running_container(host, baseline):
    create_network(host, "web", SUBNET)
    run(host, "c1", "--network", "web")
    run(host, "c2", "--network", "bridge")
    ip1 = ip_on(host, "c1", "web")

    for attempt in ("first", "again"):
        host.docker("network", "connect", "web", "c2")
        ip2 = ip_on(host, "c2", "web")
        ifname = interfaces(host, "c2").get(ip2)
        assert ifname, f"{attempt} connect: no interface with {ip2} in c2: {interfaces(host, 'c2')}"
        assert mtu_of(host, "c2", ifname) == underlay_mtu(host) - VXLAN_OVERHEAD
        assert_pings(host, "c2", ip1)
        assert_pings(host, "c1", ip2)

        host.docker("network", "disconnect", "web", "c2")
        assert ip2 not in interfaces(host, "c2")
        assert "c2" not in host.docker("network", "inspect", "-f", "{{range .Containers}}{{.Name}} {{end}}", "web")
        assert_no_ping(host, "c1", ip2)

    remove(host, "c1", "c2", networks=["web"])
    assert_clean(host, baseline)


def test_ipv6_without_an_ipv6_subnet_refused(host, baseline):
    # IPv6 works with its subnet given (tests/e2e/test_ipv6.py); a pool of
    # pyoverlay's choosing is refused, saying what to pass.
    proc = host.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                            "--subnet", "10.20.3.0/24", "--ipv6", "v6", check=False)
    assert proc.returncode != 0, "an IPv6 network without its IPv6 subnet was created"
    assert "IPv6 --subnet" in proc.stderr, proc.stderr
    assert "v6" not in host.docker("network", "ls", "--format", "{{.Name}}").split()
    assert_clean(host, baseline)


def test_default_ipam_refused_naming_the_command(host, baseline):
    proc = host.docker_proc("network", "create", "-d", "pyoverlay", "--subnet", "10.20.4.0/24", "noipam",
                            check=False)
    assert proc.returncode != 0, "a network with the engine's IPAM was created"
    assert "--ipam-driver pyoverlay" in proc.stderr, proc.stderr
    assert "noipam" not in host.docker("network", "ls", "--format", "{{.Name}}").split()
    assert_clean(host, baseline)


def test_static_ip_honoured(host):
    create_network(host, "web", SUBNET)
    run(host, "fixed", "--network", "web", "--ip", "10.20.0.50")
    assert ip_on(host, "fixed", "web") == "10.20.0.50"
    assert interfaces(host, "fixed").get("10.20.0.50") == "eth0"
    run(host, "c2", "--network", "web")
    assert ip_on(host, "c2", "web") != "10.20.0.50"
    assert_pings(host, "c2", "10.20.0.50")

    proc = host.docker_proc("run", "-d", "--name", "dup", "--network", "web", "--ip", "10.20.0.50", IMAGE,
                            "sleep", "3600", check=False)
    assert proc.returncode != 0, "a second container got 10.20.0.50"
    host.docker("rm", "-f", "dup")
    assert_pings(host, "c2", "10.20.0.50")


def test_plugin_killed_and_restarted(host, baseline):
    create_network(host, "web", SUBNET)
    run(host, "c1", "--network", "web")
    run(host, "c2", "--network", "web")
    ip1, ip2 = ip_on(host, "c1", "web"), ip_on(host, "c2", "web")

    host.kill_plugin()
    assert not host.plugin_running
    # The data plane is the kernel's: it does not need the plugin process.
    assert_pings(host, "c1", ip2)

    host.start_plugin(f"sqlite://{store_db(host)}")
    assert_pings(host, "c1", ip2)
    assert_pings(host, "c2", ip1)
    run(host, "c3", "--network", "web")
    ip3 = ip_on(host, "c3", "web")
    for src, dst in (("c3", ip1), ("c3", ip2), ("c1", ip3)):
        assert_pings(host, src, dst)

    remove(host, "c1")
    assert "c1" not in host.docker("ps", "-a", "--format", "{{.Names}}").split()
    assert_pings(host, "c3", ip2)
    remove(host, "c2", "c3", networks=["web"])
    assert_clean(host, baseline)


# Needs its calls faster than a veth deletion: over SSH (VMs) each call is a
# round trip of its own, the deletions keep up and none is pending at the kill.
@pytest.mark.namespace_only
def test_veth_deletions_pending_at_a_kill_are_finished_by_the_restart(host, baseline):
    """Leave answers before its veth is gone (the plugin deletes it in the
    background): a plugin killed with deletions pending must not leave them."""
    create_network(host, "burst", SUBNET)
    network_id = host.docker("network", "inspect", "-f", "{{.Id}}", "burst")
    overlay = next(n for n in host.netns_names() if n.startswith("pyo-"))

    def call(method: str, body: dict) -> dict:
        status, answer = host.plugin_request(method, body)
        assert status == 200, (method, answer)
        return answer

    # Containers as the engine makes and removes them, without the engine:
    # Join makes the pair, Leave and DeleteEndpoint answer and forget it.
    endpoints = []
    for _ in range(30):
        address = call("IpamDriver.RequestAddress", {"PoolID": SUBNET, "Address": "", "Options": None})["Address"]
        ep = {"NetworkID": network_id, "EndpointID": os.urandom(32).hex()}
        call("NetworkDriver.CreateEndpoint", {**ep, "Interface": {"Address": address}})
        call("NetworkDriver.Join", {**ep, "SandboxKey": "/var/run/docker/netns/burst"})
        endpoints.append((ep, address))
    for ep, _ in endpoints:  # the two calls take a fifth of what deleting the veth does
        call("NetworkDriver.Leave", ep)
        call("NetworkDriver.DeleteEndpoint", ep)
    host.kill_plugin()
    stray = {n for n in host.links(overlay) if n.startswith("pyb")}
    assert stray, "every deletion was done before the kill: this test then checks nothing (make more endpoints)"

    host.start_plugin(f"sqlite://{store_db(host)}")
    for _, address in endpoints:  # the engine's next call (restore may have released them already)
        call("IpamDriver.ReleaseAddress", {"PoolID": SUBNET, "Address": address.split("/")[0]})
    wait_for(lambda: not {n for n in host.links(overlay) if n.startswith("pyb")}
             and not [n for n in host.links() if n.startswith("pyo")], 10,
             lambda: f"the restarted plugin to delete the {len(stray)} veths the kill left")
    remove(host, networks=["burst"])
    assert_clean(host, baseline)


def engine_api(host: Host, method: str, path: str, body: dict) -> tuple[int, dict]:
    """The engine's HTTP API through the CLI's socket, for what Debian 12's CLI cannot send."""
    out = host.run(["curl", "-sS", "--unix-socket", "/var/run/docker.sock", "-X", method,
                    "-H", "Content-Type: application/json", "--data-binary", "@-", "-w", "\n%{http_code}",
                    f"http://engine{path}"], input=json.dumps(body)).stdout
    raw, _, status = out.rpartition("\n")
    return int(status), json.loads(raw or "{}")


def test_enable_ipv4_option_accepted_when_true_and_no_ip_at_all_refused(host, baseline):
    # -o com.docker.network.enable_ipv4=true is what pyoverlay does anyway.
    create_network(host, "v4", SUBNET, "-o", "com.docker.network.enable_ipv4=true")
    run(host, "c1", "--network", "v4")
    assert ip_on(host, "c1", "v4").startswith("10.20.0.")
    remove(host, "c1", networks=["v4"])
    proc = host.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet",
                            "10.20.5.0/24", "-o", "com.docker.network.enable_ipv4=false", "nov4", check=False)
    assert proc.returncode != 0 and "needs IPv6" in proc.stderr, proc.stderr
    # Docker 28+ (API 1.47): --ipv4=false requests no IPv4 pool at all.
    api = host.docker("version", "-f", "{{.Server.APIVersion}}")
    if tuple(map(int, api.split("."))) >= (1, 47):
        status, answer = engine_api(host, "POST", f"/v{api}/networks/create",
                                    {"Name": "v6only", "Driver": "pyoverlay", "EnableIPv4": False,
                                     "IPAM": {"Driver": "pyoverlay"}})
        assert status >= 400 and "needs IPv6" in answer.get("message", ""), (status, answer)
    else:
        print(f"\nengine API {api}: no EnableIPv4 (Docker 28+), --ipv4=false not tried")
    assert not {"nov4", "v6only"} & set(host.docker("network", "ls", "--format", "{{.Name}}").split())
    assert_clean(host, baseline)


@pytest.mark.parametrize("subnet, opts", [
    ("10.20.5.0/24", ["-o", "vni=4700"]),  # the VNI carries 10.20.6.0/24 already
    ("10.20.7.0/24", ["-o", "com.docker.network.driver.mtu=100"]),
], ids=["vni-conflict", "bad-mtu"])
def test_a_refusal_reads_the_same_from_docker_and_from_pyoverlay(host, subnet, opts):
    """driver/rules.py answers both doors: docker's error carries, word for word, what
    `pyoverlay network create` says against the same store."""
    create_network(host, "web", "10.20.6.0/24", "-o", "vni=4700")
    proc = host.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                            "--subnet", subnet, *opts, "other", check=False)
    assert proc.returncode != 0, "docker created a network the rules refuse"
    cli = host.run([host.python, "-m", "plugin.cli", "network", "create", "other", "--subnet", subnet, *opts,
                    "--wait", "0", "--store", f"sqlite://{store_db(host)}"], check=False)
    assert cli.returncode == 1, (cli.stdout, cli.stderr)
    said = cli.stderr.strip().removeprefix("pyoverlay: ")
    print(f"docker: {proc.stderr.strip()}\npyoverlay: {said}")
    assert said and said in proc.stderr, (said, proc.stderr)
    assert "other" not in host.docker("network", "ls", "--format", "{{.Name}}").split()
    remove(host, networks=["web"])
