"""Isolation between overlays and the VXLAN source filter, on the real kernel.

A small lab of namespaces: an underlay bridge, hosts A and B (10.96.0.1 and
.2) and an outsider E (10.96.0.66) on it. Each host runs the whole driver
(app, IPAM, network driver, dataplane, peer sync, VXLAN filter) in its own
namespace against one in-memory store shared by the hosts, as etcd would be.
"Containers" are namespaces into which the test moves Join's interface, as
libnetwork does. Every packet stays inside these namespaces.

What reaches a container is read from its own /proc/net/snmp (ICMP echo
requests received), so nothing depends on the code under test.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from driver.dataplane import Dataplane
from driver.dataplane.firewall import CHAIN, TABLE, Firewall
from driver.ipam import Ipam
from driver.network import NetworkDriver
from driver.peersync import PeerSync
from driver.state import State
from driver.store.memory import MemoryStore
from plugin.app import create_app
from tests.conftest import new_id
from tests.hosts import remove_tree, wait_for
from tests.nslab import pings, run_in
from tests.reliability import record

UNDERLAY = "10.96.0.{}"
OUTSIDER = UNDERLAY.format(66)
SUBNET = "10.50.0.0/24"
_n = itertools.count(1)


def echo_requests_received(ns: str) -> int:
    """Icmp InEchos of the namespace: ICMP echo requests its IP stack took in."""
    lines = [l.split() for l in run_in(ns, "cat", "/proc/net/snmp").stdout.splitlines() if l.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


def nft_drops(ns: str) -> int:
    """Packets the filter's drop rule counted, read with nft itself."""
    out = json.loads(run_in(ns, "nft", "-j", "list", "chain", "inet", TABLE, CHAIN).stdout)
    return sum(e["counter"]["packets"] for item in out["nftables"] if "rule" in item
               for e in item["rule"]["expr"] if "counter" in e)


# -- a VXLAN frame built by hand ------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def vxlan_echo_request(vni: int, dst_mac: str, src_ip: str, dst_ip: str, seq: int) -> bytes:
    """VXLAN header + Ethernet + IPv4 + ICMP echo request, as a peer VTEP would send it."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + b"pyoverlay-injected"
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, socket.IPPROTO_ICMP, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    ether = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex("026600000066") + struct.pack("!H", 0x0800)
    vxlan = struct.pack("!B3xI", 0x08, vni << 8)  # flags: VNI valid; VNI in the top 24 bits
    return vxlan + ether + ip + icmp


SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
frame = bytes.fromhex(sys.argv[3])
for _ in range(int(sys.argv[4])):
    s.sendto(frame, (sys.argv[1], int(sys.argv[2])))
"""


def inject(from_ns: str, to_addr: str, frame: bytes, count: int, port: int = 4789) -> None:
    """Send the frame as UDP datagrams from inside from_ns (never from the test's own namespace)."""
    run_in(from_ns, sys.executable, "-c", SEND, to_addr, str(port), frame.hex(), str(count))


# -- the lab ----------------------------------------------------------------------


class Host:
    """A namespace on the underlay; drivers run "in" it (see Driver)."""

    def __init__(self, lab: "Lab", name: str, addr: str):
        self.lab, self.name, self.addr = lab, name, addr
        self.ns = lab.plug(name, addr)


class Driver:
    """The composition plugin/server.py's Runtime makes, for one host and one store.

    overlays: the directory of overlay namespaces; a second cluster's driver on
    the same host needs its own (restore removes overlays its store does not know)."""

    def __init__(self, host: Host, store, vxlan_filter: bool = True, overlays: str = "overlays"):
        self.host, self.store, self.addr = host, store, host.addr
        self.lab = host.lab
        self.ns = host.ns
        self.netns_dir = os.path.join(host.lab.root, f"{overlays}-{host.name}")
        self.vxlan_filter = vxlan_filter
        self.running = False
        host.lab.drivers.append(self)
        self.start()

    def start(self) -> "Driver":
        self.dataplane = Dataplane(self.addr, host_netns=self.ns, netns_dir=self.netns_dir)
        self.peers = PeerSync(self.store, self.dataplane, vtep=self.addr)
        self.firewall = Firewall(netns=self.ns) if self.vxlan_filter else None
        if self.firewall is not None:
            assert self.firewall.install(), "nft could not install the VXLAN filter"
            self.peers.on_vteps = self.firewall.allow
        state = State(self.store)
        self.driver = NetworkDriver(state, self.dataplane, self.peers, host=self.addr, vtep=self.addr)
        self.client = create_app(self.driver, Ipam(state, self.addr)).test_client()
        self.peers.start()
        assert self.peers.synced.wait(5)
        self.driver.restore()
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.peers.stop()
            if self.firewall is not None:
                self.firewall.close()
            self.dataplane.close()
            self.running = False

    def call(self, method: str, body: dict) -> dict:
        response = self.client.post(f"/{method}", data=json.dumps(body))
        answer = response.get_json(force=True)
        assert response.status_code == 200, (method, answer)
        return answer

    def network(self, subnet: str, vni: int) -> tuple[str, str]:
        """docker network create -d pyoverlay --ipam-driver pyoverlay --subnet S -o vni=V."""
        pool = self.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": subnet})["PoolID"]
        gw = self.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": {
            "RequestAddressType": "com.docker.network.gateway"}})["Address"]
        network_id = new_id()
        self.call("NetworkDriver.CreateNetwork", {
            "NetworkID": network_id, "Options": {"com.docker.network.generic": {"vni": str(vni)}},
            "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": subnet, "Gateway": gw}]})
        return network_id, pool

    def container(self, network: tuple[str, str], ip: str = "") -> "Container":
        """docker run --network N [--ip IP]: RequestAddress, CreateEndpoint, Join, then
        what libnetwork does with the interface."""
        network_id, pool = network
        address = self.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": ip, "Options": None})["Address"]
        endpoint_id = new_id()
        mac = self.call("NetworkDriver.CreateEndpoint", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                                         "Interface": {"Address": address}})["Interface"]["MacAddress"]
        src = self.call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                               "SandboxKey": ""})["InterfaceName"]["SrcName"]
        ns = self.lab.new_ns(f"ctr-{next(_n)}")
        with IPRoute(netns=self.ns, flags=0, groups=0) as h:
            h.link("set", index=h.link_lookup(ifname=src)[0], net_ns_fd=ns, ifname="eth0")
        with IPRoute(netns=ns, flags=0, groups=0) as c:
            eth0 = c.link_lookup(ifname="eth0")[0]
            ip_addr, prefix = address.split("/")
            c.addr("add", index=eth0, address=ip_addr, prefixlen=int(prefix))
            c.link("set", index=eth0, state="up")
            c.link("set", index=c.link_lookup(ifname="lo")[0], state="up")
        return Container(ns, ip_addr, mac, network_id, endpoint_id)


class Container:
    def __init__(self, ns: str, ip: str, mac: str, network_id: str, endpoint_id: str):
        self.ns, self.ip, self.mac = ns, ip, mac
        self.network_id, self.endpoint_id = network_id, endpoint_id


class Lab:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="pyo-isolation-")
        self.drivers: list[Driver] = []
        self.underlay = self.new_ns("underlay")
        with IPRoute(netns=self.underlay, flags=0, groups=0) as ul:
            ul.link("add", ifname="ul", kind="bridge")
            ul.link("set", index=ul.link_lookup(ifname="ul")[0], state="up")

    def new_ns(self, name: str) -> str:
        path = os.path.join(self.root, "ns", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pr_netns.create(path)
        return path

    def plug(self, name: str, addr: str) -> str:
        """A namespace with eth0 on the underlay bridge at addr."""
        ns = self.new_ns(name)
        with IPRoute(netns=self.underlay, flags=0, groups=0) as ul:
            ul.link("add", ifname=f"ul-{addr.split('.')[-1]}", kind="veth", state="up",
                    master=ul.link_lookup(ifname="ul")[0], peer={"ifname": "eth0", "net_ns_fd": ns})
        with IPRoute(netns=ns, flags=0, groups=0) as h:
            eth0 = h.link_lookup(ifname="eth0")[0]
            h.addr("add", index=eth0, address=addr, prefixlen=24)
            h.link("set", index=eth0, state="up")
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
        return ns

    def host(self, name: str, n: int) -> Host:
        return Host(self, name, UNDERLAY.format(n))

    def close(self) -> None:
        for driver in self.drivers:
            driver.stop()
        remove_tree(self.root)


@pytest.fixture
def lab():
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


# -- tests ----------------------------------------------------------------------------


def received(*containers: Container) -> list[int]:
    return [echo_requests_received(c.ns) for c in containers]


def test_overlapping_subnets_on_different_vnis_stay_apart(lab):
    """Two pyoverlay clusters (two stores) share hosts and underlay and both
    use 10.50.0.0/24, on VNIs 100 and 200, with the addresses crossed over the
    hosts: pings on one VNI never reach the other VNI's namespaces, which hold
    the same IPs and MACs."""
    a, b = lab.host("a", 1), lab.host("b", 2)
    x_store, y_store = MemoryStore(), MemoryStore()
    # The VXLAN filter is per host and assumes one driver per host: left out here.
    xa, xb = Driver(a, x_store, False, "x"), Driver(b, x_store, False, "x")
    ya, yb = Driver(a, y_store, False, "y"), Driver(b, y_store, False, "y")
    x1 = xa.container(xa.network(SUBNET, 100), "10.50.0.2")
    x2 = xb.container(xb.network(SUBNET, 100), "10.50.0.3")
    y1 = ya.container(ya.network(SUBNET, 200), "10.50.0.3")
    y2 = yb.container(yb.network(SUBNET, 200), "10.50.0.2")
    assert (x1.mac, x2.mac) == (y2.mac, y1.mac)  # MACs come from IPs: twins on the other VNI
    wait_for(lambda: pings(x1.ns, x2.ip), 10, "x1 -> x2 across hosts on VNI 100")
    wait_for(lambda: pings(y2.ns, y1.ip), 10, "y2 -> y1 across hosts on VNI 200")

    n, leaked = 10, 0
    for talkers, listeners, others in (((x1, x2), (x2, x1), (y1, y2)), ((y1, y2), (y2, y1), (x1, x2))):
        before, quiet = received(*listeners), received(*others)
        for _ in range(n):
            for src, dst in zip(talkers, listeners):
                assert pings(src.ns, dst.ip), f"{src.ip} -> {dst.ip} failed on its own VNI"
        assert [x - y for x, y in zip(received(*listeners), before)] == [n, n]
        leaked += sum(x - y for x, y in zip(received(*others), quiet))
        assert received(*others) == quiet, "pings on one VNI reached the other VNI's containers"
    record("isolation, overlapping subnets", did=f"two clusters on one underlay, both 10.50.0.0/24, on VNI 100 "
           f"and 200 with the same IPs and MACs crossed over two hosts; {4 * n} pings",
           held="every ping answered on its own VNI; the twins on the other VNI received none", leaked=leaked)


def test_vxlan_from_an_unknown_address_never_reaches_a_container(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    outsider = lab.plug("outsider", OUTSIDER)
    store = MemoryStore()
    # A starts without the filter first: proof that the crafted frame is good
    # and that the kernel alone takes VXLAN from anyone.
    da, db = Driver(a, store, vxlan_filter=False), Driver(b, store)
    vni = 4242
    target = da.container(da.network(SUBNET, vni))
    friend = db.container(db.network(SUBNET, vni))
    wait_for(lambda: pings(friend.ns, target.ip), 10, "B's container to reach A's")

    frame = vxlan_echo_request(vni, target.mac, "10.50.0.99", target.ip, seq=1)
    before = echo_requests_received(target.ns)
    inject(outsider, a.addr, frame, 5)
    wait_for(lambda: echo_requests_received(target.ns) >= before + 5, 5,
             "the unfiltered kernel to deliver the injected frames (is the frame itself bad?)")

    # Restart A's driver with the filter, as an upgrade would: kernel and store stay.
    da.stop()
    da.vxlan_filter = True
    da.start()
    assert da.firewall.allowed() == {b.addr}, "the filter should allow exactly B, A's one peer host"
    injected = 200
    before, drops_before = echo_requests_received(target.ns), nft_drops(a.ns)
    inject(outsider, a.addr, frame, injected)
    # A datagram on the underlay is handled by the time the next one from the
    # same sender arrives: a control frame from the outsider after the burst
    # would be dropped too, so wait on the drop counter itself.
    wait_for(lambda: nft_drops(a.ns) - drops_before >= injected, 5, "the filter to count the injected frames")
    dropped = nft_drops(a.ns) - drops_before
    reached = echo_requests_received(target.ns) - before
    assert (dropped, reached) == (injected, 0), f"{reached} injected frames reached the container"
    # Legitimate traffic still flows, both ways, and the same frame from B's VTEP arrives.
    for _ in range(3):
        assert pings(friend.ns, target.ip) and pings(target.ns, friend.ip)
    inject(b.ns, a.addr, frame, 3)
    wait_for(lambda: echo_requests_received(target.ns) >= before + 6, 5, "frames from the known peer B")
    assert echo_requests_received(target.ns) == before + 3 + 3
    record("VXLAN source filter", did=f"{injected} crafted VXLAN frames (ICMP echo to a container's IP and MAC, "
           "right VNI) sent to UDP 4789 from an underlay address that is no peer VTEP; the same frame from a "
           "peer host as the control", held=f"{dropped} of {injected} dropped before decapsulation, 0 reached the "
           "container; the peer's frames and pings arrived", injected=injected, dropped=dropped, reached=reached)


def test_filter_follows_the_peers_and_outlives_the_driver(lab):
    """The allowed set follows the store: a host comes in with its first
    endpoint on an overlay this host carries and goes with its last one. A
    restarted driver keeps the kernel's set until it has read the store."""
    a, b, c = lab.host("a", 1), lab.host("b", 2), lab.host("c", 3)
    store = MemoryStore()
    da, db, dc = (Driver(h, store) for h in (a, b, c))
    net_a, net_b = da.network(SUBNET, 300), db.network(SUBNET, 300)
    assert da.firewall.allowed() == set()
    ctr_b = db.container(net_b)
    wait_for(lambda: da.firewall.allowed() == {b.addr}, 5, "A to allow B")
    dc.container(dc.network("10.51.0.0/24", 301))
    ctr_a = da.container(net_a)
    wait_for(lambda: db.firewall.allowed() == {a.addr}, 5, "B to allow A")
    assert da.firewall.allowed() == {b.addr}, "C shares no overlay with A: it must not be allowed"
    wait_for(lambda: pings(ctr_a.ns, ctr_b.ip), 10, "A's container to reach B's")

    # The driver goes away (and the store with it, as far as A can tell): the
    # kernel keeps filtering with the last set, and traffic keeps flowing.
    da.stop()
    fresh = Firewall(netns=a.ns)
    assert fresh.install() and fresh.allowed() == {b.addr}, "a restart must not forget the peers"
    assert pings(ctr_a.ns, ctr_b.ip) and pings(ctr_b.ns, ctr_a.ip)
    fresh.close()
    da.start()

    # C joins A's overlay: allowed. B's last endpoint goes: no longer allowed.
    net_c = dc.network(SUBNET, 300)
    dc.container(net_c)
    wait_for(lambda: da.firewall.allowed() == {b.addr, c.addr}, 5, "A to allow C")
    db.call("NetworkDriver.Leave", {"NetworkID": ctr_b.network_id, "EndpointID": ctr_b.endpoint_id})
    db.call("NetworkDriver.DeleteEndpoint", {"NetworkID": ctr_b.network_id, "EndpointID": ctr_b.endpoint_id})
    wait_for(lambda: da.firewall.allowed() == {c.addr}, 5, "A to drop B from the filter")


def test_filter_rebuilds_a_table_removed_behind_its_back(lab):
    a = lab.host("a", 1)
    fw = Firewall(netns=a.ns)
    assert fw.install()
    fw.allow({"10.96.0.7"})
    run_in(a.ns, "nft", "delete", "table", "inet", TABLE)
    fw.allow({"10.96.0.7", "10.96.0.8"})
    assert fw.allowed() == {"10.96.0.7", "10.96.0.8"}
    fw.allow({"not-an-address; flush ruleset", "10.96.0.8"})  # values from the store never reach nft unchecked
    assert fw.allowed() == {"10.96.0.8"}
    fw.close()
