"""Direct mode (-o encap=cross-subnet|never) against the real kernel:
dataplane/direct.py programmed by peer sync from one in-memory store.

Namespaces stand in for machines. U holds the underlay bridge; H1 and H2 sit
on one underlay subnet (10.96.0.0/24), H3 on the same wire with an address of
another subnet (10.96.1.3/24, routed on-link), so it is "across subnets".
Each host has its own Dataplane and PeerSync; containers are namespaces with
a veth end from create_endpoint. Observation goes through nsenter and
tcpdump, never the module under test.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

from driver.dataplane import Dataplane
from driver.dataplane.direct import DIRECT, direct_mac
from driver.model import Peer
from driver.network import endpoint_mac
from driver.peersync import PeerSync
from driver.state import peer_key
from driver.store import open_store
from tests.hosts import wait_for
from tests.nslab import NamespaceLab, pings, sh

A, B = 4301, 4302  # A: encap=cross-subnet; B: encap=never, for isolation
HOSTS = {"h1": "10.96.0.1/24", "h2": "10.96.0.2/24", "h3": "10.96.1.3/24"}


class Lab(NamespaceLab):
    def __init__(self):
        super().__init__("pyod")
        self.dp: dict[str, Dataplane] = {}
        self.sync: dict[str, PeerSync] = {}
        self.store = open_store("memory://")

    def container(self, host: str, vni: int, name: str, ip: str) -> str:
        """A container namespace on host, on overlay vni, with ip; its peer record in the store."""
        c = self.ns(name)
        mac = endpoint_mac(__import__("ipaddress").ip_address(ip))
        ifname = self.dp[host].create_endpoint(vni, name * 8, mac, 1450)
        sh(self.h[host], "ip", "link", "set", ifname, "netns", c)
        sh(c, "ip", "addr", "add", f"{ip}/24", "dev", ifname)
        sh(c, "ip", "link", "set", ifname, "up")
        vtep = HOSTS[host].split("/")[0]
        self.store.put(peer_key(vni, name * 8), Peer(ip=ip, mac=mac, vtep=vtep).to_json())
        return c

    def close(self) -> None:
        for sync in self.sync.values():
            sync.stop()
        for dp in self.dp.values():
            dp.close()
        self.store.close()
        super().close()


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    try:
        u = lab.ns("u")
        sh(u, "ip", "link", "add", "ub0", "type", "bridge")
        sh(u, "ip", "link", "set", "ub0", "up")
        lab.h = {}
        for host, cidr in HOSTS.items():
            h = lab.h[host] = lab.ns(host)
            sh(h, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", f"u-{host}", "netns", u)
            sh(u, "ip", "link", "set", f"u-{host}", "master", "ub0", "up")
            sh(h, "ip", "addr", "add", cidr, "dev", "eth0")
            sh(h, "ip", "link", "set", "eth0", "up")
            other = "10.96.0.0/24" if host == "h3" else "10.96.1.0/24"
            sh(h, "ip", "route", "add", other, "dev", "eth0")  # the other subnet, on the same wire
            dp = lab.dp[host] = Dataplane(cidr.split("/")[0], host_netns=h,
                                          netns_dir=os.path.join(lab.dir, host))
            for vni, encap in ((A, "cross-subnet"), (B, "never")):
                dp.create_network(vni, 1450)
                dp.create_direct(vni)
                dp.create_direct(vni)  # idempotent
            sync = lab.sync[host] = PeerSync(lab.store, dp, vtep=cidr.split("/")[0])
            sync.start()
            assert sync.synced.wait(5)
            sync.network_added(A, encap="cross-subnet")
            sync.network_added(B, encap="never")
            sync.restored()
        lab.c1 = lab.container("h1", A, "c1", "10.95.1.11")
        lab.c2 = lab.container("h2", A, "c2", "10.95.1.12")
        lab.c3 = lab.container("h3", A, "c3", "10.95.1.13")
        lab.c1b = lab.container("h1", A, "d1", "10.95.1.21")  # a second container on h1
        lab.b2 = lab.container("h2", B, "b2", "10.95.1.112")  # network B, same host as c2
        lab.b3 = lab.container("h3", B, "b3", "10.95.1.113")  # network B across subnets: unreachable
        lab.b1 = lab.container("h1", B, "b1", "10.95.1.111")
        wait_for(lambda: "10.95.1.12" in lab.dp["h1"].direct_routes(A), 5, "h1's route to c2")
        yield lab
    finally:
        lab.close()


def test_mac_is_derived_from_host_and_vni():
    assert direct_mac("10.96.0.2", 4301) == "0a:00:10:cd:00:02"
    assert direct_mac("10.96.0.2", 4302) != direct_mac("10.96.0.2", 4301) != direct_mac("10.96.0.1", 4301)


def test_same_subnet_peers_are_routes_and_others_stay_vxlan(lab):
    routes = lab.dp["h1"].direct_routes(A)
    assert routes["10.95.1.12"] == (DIRECT, direct_mac("10.96.0.2", A))
    assert routes["10.95.1.11"] == ("br0", endpoint_mac(__import__("ipaddress").ip_address("10.95.1.11")))
    assert "10.95.1.13" not in routes  # h3 is across subnets
    assert {p.ip for p in lab.dp["h1"].peers(A)} == {"10.95.1.13"}  # ... so vxlan0 carries it
    assert lab.dp["h1"].has_direct(A)
    assert DIRECT not in sh(lab.h["h1"], "ip", "link", "show")  # direct0 lives in the namespace only


#: A VXLAN datagram in tcpdump's output ("... > 10.x.y.z.4789: VXLAN ..."); a
#: bare "4789" would also match a timestamp's microseconds.
VXLAN_LINE = re.compile(r" > \S+\.4789: ")


def capture(lab, host: str):
    """tcpdump on host's underlay link, once it says it listens; returns (process, output file)."""
    out = tempfile.NamedTemporaryFile("w+", dir=lab.dir, delete=False)
    err = os.path.join(lab.dir, f"tcpdump-{host}.err")
    proc = subprocess.Popen(["nsenter", f"--net={lab.h[host]}", "tcpdump", "--immediate-mode", "-nli", "eth0",
                             "icmp or udp port 4789"],
                            stdout=out, stderr=open(err, "w"), text=True)
    wait_for(lambda: "listening" in open(err).read(), 5, "tcpdump to listen")
    return proc, out.name


def stop(proc: subprocess.Popen, path: str) -> str:
    proc.terminate()
    proc.wait(5)
    return open(path).read()


def test_containers_reach_each_other_routed_without_vxlan(lab):
    proc, path = capture(lab, "h2")
    try:
        wait_for(lambda: pings(lab.c1, "10.95.1.12"), 5, "c1 to ping c2 directly")
        assert pings(lab.c2, "10.95.1.11") and pings(lab.c1, "10.95.1.21")
        wait_for(lambda: "10.95.1.12 > 10.95.1.11" in open(path).read(), 5, "the reply in the capture")
    finally:
        out = stop(proc, path)
    # The inner addresses on the underlay wire, and no VXLAN.
    assert re.search(r"^\S+ IP 10\.95\.1\.11 > 10\.95\.1\.12: ICMP", out, re.M), out
    assert not VXLAN_LINE.search(out), out


def test_cross_subnet_peer_goes_through_vxlan(lab):
    proc, path = capture(lab, "h3")
    try:
        wait_for(lambda: pings(lab.c1, "10.95.1.13"), 5, "c1 to reach c3 over VXLAN")
        assert pings(lab.c3, "10.95.1.12")
        wait_for(lambda: VXLAN_LINE.search(open(path).read()), 5, "VXLAN in the capture")
    finally:
        out = stop(proc, path)
    # Every overlay packet on the wire is inside VXLAN (tcpdump prints the inner one on its own line).
    assert VXLAN_LINE.search(out) and not re.search(r"^\S+ IP 10\.95\.", out, re.M), out


def test_never_leaves_off_subnet_peers_unreachable_and_says_so(lab):
    wait_for(lambda: lab.sync["h1"].unreachable(B) == {"10.96.1.3"}, 5, "h3 reported unreachable on B")
    assert lab.sync["h1"].unreachable(A) == set()
    assert not pings(lab.b1, "10.95.1.113")
    assert lab.dp["h1"].peers(B) == set()  # no VXLAN at all


def test_doctor_reports_routes_and_unreachable_hosts(lab):
    from driver.model import Network, Overlay
    from driver.state import State
    from ops.doctor import FAIL, OK, WARN, Doctor

    state = State(lab.store)
    for vni, encap, subnet in ((A, "cross-subnet", "10.95.1.0/24"), (B, "never", "10.95.2.0/24")):
        state.create_overlay(Overlay(vni=vni, subnet=subnet, mtu=1450, networks={"10.96.0.1": f"n{vni}"},
                                     encap=encap), claim_subnet=False)
        state.create_network(Network(network_id=f"n{vni}", vni=vni, host="10.96.0.1", mtu=1450, subnet=subnet))
    try:
        doctor = Doctor(lab.store, "10.96.0.1", lab.dp["h1"])
        check = doctor.check_direct()
        assert check.status == WARN, check
        assert any("VNI 4302 (encap=never): hosts 10.96.1.3 are off" in d for d in check.details), check
        assert doctor.check_peers().status == OK  # vxlan0 holds exactly the cross-subnet peer
        sh(lab.dp["h1"].netns_name(A), "ip", "route", "del", "10.95.1.12/32")
        check = doctor.check_direct()
        assert check.status == FAIL and "VNI 4301: missing route to 10.95.1.12 via direct0" in check.details[0]
    finally:
        lab.sync["h1"]._on_snapshot(*lab.store.list("peers/"))  # puts the route back (as a restart would)
        for vni in (A, B):
            lab.store.delete(f"networks/n{vni}")
            lab.store.delete(f"overlays/{vni}")
    assert "10.95.1.12" in lab.dp["h1"].direct_routes(A)


def test_networks_are_isolated(lab):
    """B's containers reach B's, never A's (and the reverse), on the same and other hosts."""
    wait_for(lambda: pings(lab.b1, "10.95.1.112"), 5, "b1 to ping b2")
    for src, dst in ((lab.b1, "10.95.1.12"), (lab.b2, "10.95.1.11"), (lab.c1, "10.95.1.112"),
                     (lab.c2, "10.95.1.111")):
        assert not pings(src, dst), dst
    # Even an address routed by hand: B's namespace sends only to B's MACs, and h2's A never takes them.
    sh(lab.b1, "ip", "neigh", "replace", "10.95.1.12", "lladdr", direct_mac("10.96.0.2", A), "dev",
       sh(lab.b1, "ip", "-o", "link", "show", "type", "veth").split(":")[1].strip().split("@")[0])
    assert not pings(lab.b1, "10.95.1.12")


def test_a_removed_peer_loses_its_route_and_neighbour(lab):
    lab.store.delete(peer_key(A, "c2" * 8))
    wait_for(lambda: "10.95.1.12" not in lab.dp["h1"].direct_routes(A), 5, "c2's route to go")
    assert "10.95.1.12" not in sh(lab.dp["h1"].netns_name(A), "ip", "neigh", "show", "dev", DIRECT)
    lab.store.put(peer_key(A, "c2" * 8), Peer(ip="10.95.1.12", mac=endpoint_mac(
        __import__("ipaddress").ip_address("10.95.1.12")), vtep="10.96.0.2").to_json())
    wait_for(lambda: pings(lab.c1, "10.95.1.12"), 5, "c2 back")


def test_delete_network_leaves_nothing(lab):
    dp, h = lab.dp["h2"], lab.h["h2"]
    lab.sync["h2"].network_removed(B)
    dp.delete_network(B)
    assert B not in dp.networks()
    assert "macvlan" not in sh(h, "ip", "-d", "link", "show")


def test_a_wider_underlay_is_narrowed_to_the_hosts_16():
    """direct0 MACs carry an address's last 16 bits: on a /8 underlay, 10.1.0.5
    and 10.2.0.5 would share one. Only this host's /16 is routed directly."""
    lab = NamespaceLab("pyodw")
    try:
        h = lab.ns("h")
        sh(h, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")  # no dummy module here
        sh(h, "ip", "addr", "add", "10.1.0.5/8", "dev", "eth0")
        sh(h, "ip", "link", "set", "eth0", "up")
        dp = Dataplane("10.1.0.5", host_netns=h, netns_dir=os.path.join(lab.dir, "h"))
        try:
            assert str(dp.underlay_subnet()) == "10.1.0.0/16"
            assert dp.same_subnet("10.1.200.7")
            assert direct_mac("10.2.0.5", A) == direct_mac("10.1.0.5", A)  # why: the same last 16 bits
            assert not dp.same_subnet("10.2.0.5")
        finally:
            dp.close()
    finally:
        lab.close()
