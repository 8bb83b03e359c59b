"""Direct mode (-o encap=never|cross-subnet) through real engines: two hosts
on one underlay subnet, one etcd, catalog off (each host creates the network),
in both gateway modes (the engine's docker_gwbridge and -o gateway=pyoverlay).

Checked from outside the plugin: containers on two hosts ping and talk TCP
over a direct network; a capture on the underlay bridge sees their inner
addresses and no VXLAN (so the test fails if the traffic still went through
VXLAN); a container of another pyoverlay network, routed at them by hand,
reaches nothing; a killed plugin whose routes and macvlan were taken away
puts them back when it starts; removing the network leaves no macvlan,
route or neighbour entry.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, clear_hosts, etcd_and_hosts
from tests.hosts import IMAGE, wait_for

PLUGIN_ENV = {"PYOVERLAY_CATALOG": "0"}
DIRECT, OTHER = "dnet", "dother"
SUBNET, OTHER_SUBNET = "10.31.0.0/24", "10.31.1.0/24"
VNI, OTHER_VNI = 7301, 7302
DRIVER = ["-d", "pyoverlay", "--ipam-driver", "pyoverlay"]
# A TCP echo for the test's one connection: busybox nc answers with what it read.
TCP_SERVER = ("sh", "-c", "while true; do echo tcp-ok | nc -l -p 7000; done")


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    t0 = time.monotonic()
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 2) as (etcd, factory, hosts):
        for h in hosts:
            h.start_plugin(etcd.url, env=PLUGIN_ENV)
        print(f"\ncluster up in {time.monotonic() - t0:.1f}s")
        yield etcd, factory, hosts


@pytest.fixture
def hosts(request, cluster):
    etcd, factory, hosts = cluster
    request.node.stash[FACTORY] = factory
    yield hosts
    for h in hosts:
        if not h.plugin_running:
            h.start_plugin(etcd.url, env=PLUGIN_ENV)
    clear_hosts(hosts)


def in_ns(host, vni: int, *cmd: str) -> str:
    return host.run(["nsenter", f"--net=/run/netns/pyo-{vni}", *cmd], check=False).stdout


def container_ip(host, name: str, network: str) -> str:
    return host.docker("inspect", "-f", f"{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}", name).strip()


def pings(host, container: str, ip: str) -> bool:
    return host.docker_proc("exec", container, "ping", "-c1", "-W1", ip, check=False).returncode == 0


class Capture:
    """tcpdump on the underlay bridge (every host's frames cross it)."""

    def __init__(self, underlay, workdir: Path):
        self.out = workdir / f"direct-{os.getpid()}-{time.monotonic_ns()}.txt"
        err = self.out.with_suffix(".err")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{underlay.netns}", "tcpdump", "--immediate-mode", "-nli", "br0",
             "icmp or tcp port 7000 or udp port 4789"], stdout=open(self.out, "w"), stderr=open(err, "w"))
        wait_for(lambda: "listening" in err.read_text(), 10, "tcpdump on the underlay to listen")

    def text(self) -> str:
        return self.out.read_text()

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(10)
        return self.text()


@pytest.mark.parametrize("gateway", ["docker_gwbridge", "pyoverlay"])
def test_direct_network_end_to_end(cluster, hosts, underlay, e2e_workdir, underlay_http, gateway):
    etcd, h1, h2 = cluster[0], *hosts
    for h in hosts:
        h.docker("network", "create", *DRIVER, "--subnet", SUBNET, "-o", f"vni={VNI}", "-o", "encap=never",
                 "-o", f"gateway={gateway}", DIRECT)
        h.docker("network", "create", *DRIVER, "--subnet", OTHER_SUBNET, "-o", f"vni={OTHER_VNI}",
                 "-o", "encap=cross-subnet", OTHER)
    h1.docker("run", "-d", "--name", "ca", "--network", DIRECT, IMAGE, *TCP_SERVER)
    h2.docker("run", "-d", "--name", "cb", "--network", DIRECT, IMAGE, "sleep", "1d")
    # Another direct network's container, with a hand-made route to the first network's subnet.
    h2.docker("run", "-d", "--name", "cx", "--cap-add", "NET_ADMIN", "--network", OTHER, IMAGE, "sleep", "1d")
    h2.docker("exec", "cx", "ip", "route", "add", SUBNET, "dev", "eth0")
    a, b = container_ip(h1, "ca", DIRECT), container_ip(h2, "cb", DIRECT)

    # Reachable both ways, routed: the underlay carries the inner addresses and no VXLAN.
    capture = Capture(underlay, Path(e2e_workdir))
    try:
        wait_for(lambda: pings(h2, "cb", a), 10, f"b to ping a ({a}) across hosts")
        assert h2.docker("exec", "cb", "nc", a, "7000").strip() == "tcp-ok"
        assert pings(h1, "ca", b)
        wait_for(lambda: re.search(rf"^\S+ IP {re.escape(a)}\.7000 > {re.escape(b)}\.\d+: ", capture.text(), re.M),
                 5, "the TCP answer on the underlay")
    finally:
        seen = capture.stop()
    assert re.search(rf"^\S+ IP {re.escape(b)} > {re.escape(a)}: ICMP echo request", seen, re.M), seen
    # A VXLAN datagram ("... > 10.99.0.2.4789: VXLAN"); a bare "4789" also matches timestamps.
    assert not re.search(r" > \S+\.4789: ", seen), f"VXLAN on the underlay:\n{seen}"

    # Egress works as on a VXLAN network, through either gateway.
    url, token = underlay_http
    assert h1.docker("exec", "ca", "wget", "-qO-", url).strip() == token

    # Isolation: the other network's container ARPs for a on its own br0 and gets nothing.
    assert not pings(h2, "cx", a)

    # The kernel state: direct0 with the derived MAC, a /32 to a via direct0 on h2.
    routes = in_ns(h2, VNI, "ip", "route", "show", "proto", "112")
    assert re.search(rf"^{re.escape(a)} dev direct0", routes, re.M), routes
    assert re.search(rf"^{re.escape(b)} dev br0", routes, re.M), routes

    # Plugin killed, its routes and macvlan taken away: a restart puts them back.
    h2.kill_plugin()
    h2.run(["nsenter", f"--net=/run/netns/pyo-{VNI}", "ip", "link", "del", "direct0"])
    h2.run(["nsenter", f"--net=/run/netns/pyo-{VNI}", "ip", "route", "flush", "proto", "112"])
    assert not pings(h2, "cb", a)
    h2.start_plugin(etcd.url, env=PLUGIN_ENV)
    wait_for(lambda: pings(h2, "cb", a), 15, "b to reach a after the plugin restarted")

    # Removal: nothing of direct mode is left on either host.
    for h, name in ((h1, "ca"), (h2, "cb")):
        h.docker("rm", "-f", name)
        h.docker("network", "rm", DIRECT)
        assert f"pyo-{VNI}" not in h.run(["ls", "/run/netns"]).stdout
        assert "macvlan" not in h.run(["ip", "-d", "link", "show"]).stdout
        assert "proto 112" not in h.run(["ip", "route", "show", "table", "all"]).stdout
        assert re.search(r"0a:00:1c:8[56]", h.run(["ip", "neigh", "show"]).stdout) is None

