"""Gateway mode's kernel programming (dataplane/egress.py, dataplane/natrules.py)
against the real kernel.

Namespaces stand in for the machine: H is the host (its Dataplane and nft
table are pointed at it), O is the world outside (H routes everything to it),
C is a container whose veth end came from Dataplane.create_endpoint. Servers
answer each connection with the address they saw it come from, so a test
reads where NAT happened. Observation goes through nsenter, never the module
under test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from driver.dataplane import Dataplane
from driver.dataplane.egress import LINK_HOST, uplink_name
from driver.dataplane.natrules import NatTable, PortMapping, Uplink, script
from tests.hosts import wait_for
from tests.nslab import NamespaceLab, sh

VNI = 4177
SUBNET, GATEWAY, CONTAINER = "10.97.100.0/24", "10.97.100.1", "10.97.100.2"
HOST_ADDR, OUTSIDE = "10.97.0.1", "10.97.0.2"
HOST6, OUTSIDE6 = "fd97::1", "fd97::2"

# Answers each connection with the peer's address, then closes it.
ECHO_PEER = """
import socket, sys
v6 = ":" in sys.argv[1]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if v6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
while True:
    c, peer = s.accept(); c.sendall(peer[0].encode() + b"\\n"); c.close()
"""
CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2); print(s.recv(100).decode().strip())
except OSError as e:
    print("failed:", e)
"""


def peer_seen(ns: str, ip: str, port: int) -> str:
    """What a server at ip:port says our address was, as seen from ns ("failed: ..." if unreachable)."""
    return sh(ns, sys.executable, "-c", CONNECT, ip, str(port)).strip()


class Lab(NamespaceLab):
    def __init__(self):
        super().__init__("pyogw")
        self.netns_dir = os.path.join(self.dir, "netns")
        self.servers: list[subprocess.Popen] = []

    def serve(self, ns: str, ip: str, port: int) -> None:
        proc = subprocess.Popen(["nsenter", f"--net={ns}", sys.executable, "-c", ECHO_PEER, ip, str(port)])
        self.servers.append(proc)
        wait_for(lambda: sh(ns, "ss", "-Htln", f"sport = :{port}").strip(), 5, f"a server on {ip}:{port}")

    def close(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
        if hasattr(self, "dp"):
            self.dp.close()
        super().close()


def make_lab(suffix: str, vni: int, subnet: str, gateway: str, container: str, endpoint: str, mac: str,
             v6: tuple[str, str, str] = ()) -> Lab:
    """H (the host, default routes out through O), O (the outside) and C (a
    container on overlay vni in gateway mode, its veth end moved in and routed
    via the gateway, as the engine does). v6: (subnet, gateway, container)."""
    lab = Lab()
    try:
        lab.h, lab.o, lab.c = lab.ns("h" + suffix), lab.ns("o" + suffix), lab.ns("c" + suffix)
        sh(lab.h, "ip", "link", "add", "out0", "type", "veth", "peer", "name", "in0", "netns", lab.o)
        for ns, dev, ip4, ip6, via4, via6 in ((lab.h, "out0", HOST_ADDR, HOST6, OUTSIDE, OUTSIDE6),
                                              (lab.o, "in0", OUTSIDE, OUTSIDE6, "", "")):
            sh(ns, "ip", "addr", "add", f"{ip4}/24", "dev", dev)
            if v6:
                sh(ns, "ip", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            sh(ns, "ip", "link", "set", dev, "up")
            if via4:
                sh(ns, "ip", "route", "add", "default", "via", via4)
                if v6:
                    sh(ns, "ip", "-6", "route", "add", "default", "via", via6)
        lab.dp = Dataplane(HOST_ADDR, host_netns=lab.h, netns_dir=lab.netns_dir)
        lab.dp.create_network(vni, 1450)
        lab.dp.add_egress(vni, subnet, gateway, *v6[:2])
        lab.dp.add_egress(vni, subnet, gateway, *v6[:2])  # idempotent
        ifname = lab.dp.create_endpoint(vni, endpoint * 64, mac, 1450)
        sh(lab.h, "ip", "link", "set", ifname, "netns", lab.c)
        sh(lab.c, "ip", "addr", "add", f"{container}/24", "dev", ifname)
        if v6:
            sh(lab.c, "ip", "addr", "add", f"{v6[2]}/64", "dev", ifname, "nodad")
        sh(lab.c, "ip", "link", "set", ifname, "up")
        sh(lab.c, "ip", "route", "add", "default", "via", gateway)
        if v6:
            sh(lab.c, "ip", "-6", "route", "add", "default", "via", v6[1])
        lab.nat = NatTable(netns=lab.h)
        lab.serve(lab.c, "0.0.0.0", 80)
        lab.serve(lab.o, OUTSIDE, 7000)
        if v6:
            lab.serve(lab.c, "::", 80)
            lab.serve(lab.o, OUTSIDE6, 7000)
        return lab
    except BaseException:
        lab.close()
        raise


@pytest.fixture(scope="module")
def lab():
    lab = make_lab("", VNI, SUBNET, GATEWAY, CONTAINER, "c", "02:97:00:00:00:02")
    yield lab
    lab.close()


def test_egress_is_masqueraded_to_the_hosts_address(lab):
    lab.nat.apply([Uplink(VNI, SUBNET)], [])
    assert peer_seen(lab.c, OUTSIDE, 7000) == HOST_ADDR


def test_without_the_nat_table_egress_is_not_masqueraded(lab):
    """The masquerade is ours: without the table the outside sees the overlay address (and cannot answer)."""
    lab.nat.remove()
    try:
        assert peer_seen(lab.c, OUTSIDE, 7000).startswith("failed")
    finally:
        lab.nat.apply([Uplink(VNI, SUBNET)], [])
    assert peer_seen(lab.c, OUTSIDE, 7000) == HOST_ADDR


def test_published_port_on_every_address_and_loopback(lab):
    lab.nat.apply([Uplink(VNI, SUBNET)], [PortMapping("tcp", "", 8080, CONTAINER, 80)])
    # From another host: the client's own address reaches the container (no masquerade).
    assert peer_seen(lab.o, HOST_ADDR, 8080) == OUTSIDE
    # From the host itself, on its address and on loopback (route_localnet, then masqueraded).
    assert peer_seen(lab.h, HOST_ADDR, 8080) == HOST_ADDR
    assert peer_seen(lab.h, "127.0.0.1", 8080) == LINK_HOST
    # A container reaching its own published port through the host (hairpin).
    assert peer_seen(lab.c, HOST_ADDR, 8080) == LINK_HOST


def test_host_ip_limits_the_binding(lab):
    lab.nat.apply([Uplink(VNI, SUBNET)], [PortMapping("tcp", "127.0.0.1", 8081, CONTAINER, 80)])
    assert peer_seen(lab.h, "127.0.0.1", 8081) == LINK_HOST
    assert peer_seen(lab.o, HOST_ADDR, 8081).startswith("failed")


def test_the_overlay_is_not_routed_into_from_outside(lab):
    """Only published ports get in: a neighbour routing the subnet via the host reaches nothing."""
    lab.nat.apply([Uplink(VNI, SUBNET)], [PortMapping("tcp", "", 8080, CONTAINER, 80)])
    sh(lab.o, "ip", "route", "replace", SUBNET, "via", HOST_ADDR)
    try:
        assert peer_seen(lab.o, CONTAINER, 80).startswith("failed")
        assert peer_seen(lab.o, HOST_ADDR, 8080) == OUTSIDE
    finally:
        sh(lab.o, "ip", "route", "del", SUBNET)


def test_rewrite_drops_every_rule_not_asked_for(lab):
    lab.nat.apply([Uplink(VNI, SUBNET)], [PortMapping("tcp", "", 8080, CONTAINER, 80),
                                          PortMapping("tcp", "", 8082, CONTAINER, 80)])
    sh(lab.h, "nft", "add", "rule", "ip", "pyoverlay-gw", "ports", "tcp", "dport", "9999", "dnat", "to",
       f"{CONTAINER}:80")
    lab.nat.apply([Uplink(VNI, SUBNET)], [PortMapping("tcp", "", 8082, CONTAINER, 80)])
    listing = lab.nat.listing()
    assert "dport 8082" in listing and "dport 8080" not in listing and "9999" not in listing, listing
    assert peer_seen(lab.o, HOST_ADDR, 8080).startswith("failed")
    assert peer_seen(lab.o, HOST_ADDR, 8082) == OUTSIDE


def test_bad_values_never_reach_nft(lab):
    before = lab.nat.listing()
    for bad in (PortMapping("tcp", "", 8080, "10.97.100.2; flush ruleset", 80),
                PortMapping("icmp", "", 8080, CONTAINER, 80), PortMapping("tcp", "", 0, CONTAINER, 80)):
        with pytest.raises(ValueError):
            lab.nat.apply([Uplink(VNI, SUBNET)], [bad])
    assert lab.nat.listing() == before


def test_script_is_deterministic():
    a = script([Uplink(1, "10.0.0.0/24"), Uplink(2, "10.0.1.0/24")],
               [PortMapping("udp", "", 53, "10.0.0.2", 53), PortMapping("tcp", "", 80, "10.0.1.2", 80)])
    b = script([Uplink(2, "10.0.1.0/24"), Uplink(1, "10.0.0.0/24")],
               [PortMapping("tcp", "", 80, "10.0.1.2", 80), PortMapping("udp", "", 53, "10.0.0.2", 53)])
    assert a == b


def test_two_gateway_mode_networks_stay_apart(lab):
    """The host routes both subnets, yet only a published port crosses from one to the other."""
    vni2, subnet2 = VNI + 1, "10.97.101.0/24"
    c2 = lab.ns("c2")
    lab.dp.create_network(vni2, 1450)
    try:
        lab.dp.add_egress(vni2, subnet2, "10.97.101.1")
        ifname = lab.dp.create_endpoint(vni2, "d" * 64, "02:97:00:00:01:02", 1450)
        sh(lab.h, "ip", "link", "set", ifname, "netns", c2)
        sh(c2, "ip", "addr", "add", "10.97.101.2/24", "dev", ifname)
        sh(c2, "ip", "link", "set", ifname, "up")
        sh(c2, "ip", "route", "add", "default", "via", "10.97.101.1")
        lab.nat.apply([Uplink(VNI, SUBNET), Uplink(vni2, subnet2)], [PortMapping("tcp", "", 8080, CONTAINER, 80)])
        assert peer_seen(c2, OUTSIDE, 7000) == HOST_ADDR  # its own way out works
        assert peer_seen(c2, CONTAINER, 80).startswith("failed")
        # A published port is open to it, as to any client; it leaves net 2 by
        # an uplink not its own, so its egress masquerade applies (as between two Docker bridges).
        assert peer_seen(c2, HOST_ADDR, 8080) == LINK_HOST
    finally:
        lab.dp.delete_network(vni2)
        lab.nat.apply([Uplink(VNI, SUBNET)], [])


def test_doctor_compares_uplinks_ports_and_forward_rules_with_the_store(lab):
    """`pyoverlay doctor`'s gateway check on the real kernel: OK as applied,
    then FAIL naming a published port deleted by hand, a stale one and a lost
    uplink; nothing to say on a host without gateway-mode networks."""
    from driver.gateway import GatewayMode
    from driver.model import Endpoint, Network
    from driver.state import State, endpoint_key, network_key
    from driver.store import open_store
    from ops.doctor_gateway import check_gateway

    store = open_store("memory://")
    state = State(store)
    assert check_gateway(state, lab.dp, HOST_ADDR, lab.nat) is None  # nothing here yet
    net = Network("n" * 64, VNI, HOST_ADDR, 1450, SUBNET, gateway_mode="pyoverlay", gateway=GATEWAY)
    port = {"Proto": 6, "HostIP": "", "HostPort": 8085, "Port": 80}
    ep = Endpoint("e" * 64, net.network_id, VNI, HOST_ADDR, f"{CONTAINER}/24", "02:97:00:00:00:02", HOST_ADDR,
                  ports=[port])
    store.put(network_key(net.network_id), net.to_json())
    store.put(endpoint_key(ep.endpoint_id), ep.to_json())
    GatewayMode(state, lab.dp, lab.nat, HOST_ADDR).sync()
    try:
        ok = check_gateway(state, lab.dp, HOST_ADDR, lab.nat)
        assert ok.status == "ok" and "1 published port" in ok.summary, ok
        table = sh(lab.h, "nft", "-a", "list", "chain", "ip", "pyoverlay-gw", "ports")
        handle = next(line.rsplit("# handle ", 1)[1] for line in table.splitlines() if "dport 8085" in line)
        sh(lab.h, "nft", "delete", "rule", "ip", "pyoverlay-gw", "ports", "handle", handle)
        sh(lab.h, "nft", "add", "rule", "ip", "pyoverlay-gw", "ports", "udp", "dport", "9998", "dnat", "to",
           f"{CONTAINER}:53")
        bad = check_gateway(state, lab.dp, HOST_ADDR, lab.nat)
        assert bad.status == "fail", bad
        assert any("8085/tcp" in d and "missing" in d for d in bad.details), bad.details
        assert any("9998/udp" in d and "stale" in d for d in bad.details), bad.details
        # Another host's view: a VNI whose uplink is not there.
        other = Network("o" * 64, VNI + 9, HOST_ADDR, 1450, "10.97.109.0/24", gateway_mode="pyoverlay",
                        gateway="10.97.109.1")
        store.put(network_key(other.network_id), other.to_json())
        lost = check_gateway(state, lab.dp, HOST_ADDR, lab.nat)
        assert any(uplink_name(VNI + 9) in d for d in lost.details), lost.details
    finally:
        lab.nat.apply([Uplink(VNI, SUBNET)], [])
        store.close()


def test_deleting_the_network_takes_the_uplink_and_its_route(lab):
    """Last: the module's network goes."""
    assert uplink_name(VNI) in sh(lab.h, "ip", "-o", "link", "show")
    assert SUBNET in sh(lab.h, "ip", "route", "show")
    lab.dp.delete_network(VNI)
    assert uplink_name(VNI) not in sh(lab.h, "ip", "-o", "link", "show")
    assert SUBNET not in sh(lab.h, "ip", "route", "show")
    assert lab.dp.uplinks() == set()


# -- IPv6 (dual stack) ---------------------------------------------------------

VNI6 = 4178
SUBNET4B, GATEWAY4B, CONTAINER4B = "10.97.102.0/24", "10.97.102.1", "10.97.102.2"
SUBNET6, GATEWAY6, CONTAINER6 = "fd97:100::/64", "fd97:100::1", "fd97:100::2"


@pytest.fixture(scope="module")
def lab6():
    lab = make_lab("6", VNI6, SUBNET4B, GATEWAY4B, CONTAINER4B, "d", "02:97:00:00:01:02",
                   (SUBNET6, GATEWAY6, CONTAINER6))
    yield lab
    lab.close()


UPLINKS6 = [Uplink(VNI6, SUBNET4B), Uplink(VNI6, SUBNET6)]


def test_ipv6_egress_is_masqueraded_beside_ipv4(lab6):
    lab6.nat.apply(UPLINKS6, [])
    assert peer_seen(lab6.c, OUTSIDE6, 7000) == HOST6
    assert peer_seen(lab6.c, OUTSIDE, 7000) == HOST_ADDR


def test_ipv6_published_port(lab6):
    lab6.nat.apply(UPLINKS6, [PortMapping("tcp", "", 8080, CONTAINER4B, 80),
                              PortMapping("tcp", "", 8080, CONTAINER6, 80)])
    # From another host over IPv6: the client's own address (no masquerade).
    assert peer_seen(lab6.o, HOST6, 8080) == OUTSIDE6
    assert peer_seen(lab6.o, HOST_ADDR, 8080) == OUTSIDE
    # From the host on its own IPv6 address, and a container through the host
    # (hairpin): masqueraded, to the host's global address (preferred over the link-local one).
    assert peer_seen(lab6.h, HOST6, 8080) == HOST6
    assert peer_seen(lab6.c, HOST6, 8080) == HOST6
    # ::1 is not published (IPv6 has no route_localnet): refused at once, not lost.
    assert peer_seen(lab6.h, "::1", 8080).startswith("failed: [Errno 111]")
    # The IPv6 table holds the IPv6 mapping only, the IPv4 table the IPv4 one.
    six = sh(lab6.h, "nft", "list", "table", "ip6", "pyoverlay-gw")
    four = sh(lab6.h, "nft", "list", "table", "ip", "pyoverlay-gw")
    assert f"dnat to [{CONTAINER6}]:80" in six and CONTAINER4B not in six
    assert f"dnat to {CONTAINER4B}:80" in four and CONTAINER6 not in four


def test_without_ipv6_uplinks_there_is_no_ipv6_table(lab6):
    lab6.nat.apply([Uplink(VNI6, SUBNET4B)], [])
    assert sh(lab6.h, "nft", "list", "tables") .count("ip6 pyoverlay-gw") == 0
    assert peer_seen(lab6.c, OUTSIDE, 7000) == HOST_ADDR


def test_ipv6_script_rendering():
    text = script([Uplink(7, "10.0.0.0/24"), Uplink(7, "fd00:7::/64")],
                  [PortMapping("tcp", "", 80, "10.0.0.2", 8080), PortMapping("udp", "fd00::9", 53, "fd00:7::2", 53)])
    four, six = text.split("table ip6 pyoverlay-gw {")
    assert "ip6 daddr fd00::9 udp dport 53 dnat to [fd00:7::2]:53" in six
    assert 'oifname != "pyg7" ip6 saddr fd00:7::/64 masquerade' in six
    assert "ip6 daddr != ::1 fib daddr type local jump ports" in six
    assert "127.0.0.0/8" not in six and "fd00" not in four
    assert "tcp dport 80 dnat to 10.0.0.2:8080" in four
    # A host address of one family and a container address of the other never reach nft.
    with pytest.raises(ValueError):
        script([], [PortMapping("tcp", "10.0.0.1", 80, "fd00:7::2", 80)])
