"""The cluster resolver's kernel side (driver/dataplane/dnsplane.py, Dataplane.add_dns_address)
against the real kernel, in throw-away namespaces (tests/test_dataplane.py's lab):
a "container" with the /32 route Join hands the engine reaches a socket
listen() made inside the overlay namespace, over br0, from its overlay address."""

from __future__ import annotations

import sys
import threading

from driver.dataplane import dnsplane
from tests.test_dataplane import a, container, ip_json, lab, mac, network, run  # noqa: F401 (fixtures)

DNS = "169.254.53.53"
SUBNET = "10.98.100.0/24"
CLIENT = r"""
import socket, sys
kind = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
s.settimeout(5)
s.connect((sys.argv[2], 53))
s.send(b"ping")
print(s.recv(16).decode())
"""


def _addresses(ns: str, dev: str) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for link in ip_json(ns, "addr", "show", "dev", dev)
            for a in link["addr_info"] if a["family"] == "inet"]


def test_overlay_address_route_and_sockets_reach_a_container(a, network, container):
    overlay = network(a, 4301)
    a.dp.add_dns_address(4301, SUBNET, DNS)
    a.dp.add_dns_address(4301, SUBNET, DNS)  # restore repeats it: idempotent
    assert _addresses(overlay, "br0") == [f"{DNS}/32"]
    routes = ip_json(overlay, "route", "show", SUBNET)
    assert routes and routes[0]["dev"] == "br0" and routes[0]["prefsrc"] == DNS, routes

    udp, tcp = dnsplane.listen(overlay, DNS)
    try:
        ns, _ = container(a, 4301, "10.98.100.2", mac(0x301))
        run(ns, "ip", "route", "add", f"{DNS}/32", "dev", "eth0", "scope", "link", check=True)
        udp.settimeout(5)
        tcp.settimeout(5)
        seen = {}

        def serve() -> None:
            data, peer = udp.recvfrom(64)
            seen["udp"] = peer[0]
            udp.sendto(b"pong-" + data, peer)
            conn, peer = tcp.accept()
            with conn:
                seen["tcp"] = peer[0]
                conn.send(b"pong-" + conn.recv(16))

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        assert run(ns, sys.executable, "-c", CLIENT, "udp", DNS, check=True).stdout.strip() == "pong-ping"
        assert run(ns, sys.executable, "-c", CLIENT, "tcp", DNS, check=True).stdout.strip() == "pong-ping"
        server.join(5)
        # From the container's overlay address: what names the querier.
        assert seen == {"udp": "10.98.100.2", "tcp": "10.98.100.2"}
        # The address is only in the overlay namespace: this process's own has none.
        assert not [x for x in _addresses("/proc/self/ns/net", "lo") if x.startswith(DNS)]
    finally:
        udp.close()
        tcp.close()


def test_host_address_on_lo(a):
    a.dp.add_local_address(DNS)
    try:
        assert f"{DNS}/32" in _addresses(a.ns, "lo")
        udp, tcp = dnsplane.listen(a.ns, DNS)
        udp.close()
        tcp.close()
    finally:
        a.dp.add_local_address(DNS, present=False)
    assert f"{DNS}/32" not in _addresses(a.ns, "lo")


QUERY = r"""
import json, sys
import dns.message, dns.query, dns.rcode
q = dns.message.make_query(sys.argv[2], sys.argv[3])
r = dns.query.tcp(q, sys.argv[1], timeout=3) if sys.argv[4] == "tcp" else dns.query.udp(q, sys.argv[1], timeout=3)
print(json.dumps([dns.rcode.to_text(r.rcode()), [i.to_text() for rr in r.answer for i in rr]]))
"""


def test_listeners_serve_the_name_table_in_the_overlay_namespace(a, network, container):
    """The resolver's whole path on this host: container -> br0 -> listener -> table."""
    import json

    from driver.dns.server import Resolver
    from driver.dnslisteners import Listeners
    from driver.names import NameTable
    from driver.model import NameRecord
    from driver.state import name_key
    from driver.store.memory import MemoryStore

    network(a, 4302)
    table = NameTable(MemoryStore())
    table.load({
        name_key(4302, "e1"): NameRecord("h1", "c1", "front", "10.98.100.12", "web", ("www",)),
        name_key(4302, "e2"): NameRecord("h2", "c2", "back", "10.98.100.13", "web"),
        name_key(4999, "e3"): NameRecord("h2", "c3", "pg", "10.98.200.3", "db"),
    })
    resolver = Resolver(table.lookup, [])
    resolver.start()
    listeners = Listeners(a.dp, resolver, DNS)
    try:
        listeners.network_added(4302, SUBNET)
        assert listeners.tags() == {4302}
        ns, _ = container(a, 4302, "10.98.100.12", mac(0x302))
        run(ns, "ip", "route", "add", f"{DNS}/32", "dev", "eth0", "scope", "link", check=True)

        def ask(name, qtype="A", proto="udp"):
            return json.loads(run(ns, sys.executable, "-c", QUERY, DNS, name, qtype, proto, check=True).stdout)

        assert ask("back") == ["NOERROR", ["10.98.100.13"]]
        assert ask("www.web", proto="tcp") == ["NOERROR", ["10.98.100.12"]]
        assert ask("13.100.98.10.in-addr.arpa", "PTR") == ["NOERROR", ["back.web."]]
        assert ask("pg") == ["NXDOMAIN", []]  # on a network it is not on
        assert ask("example.test")[0] == "SERVFAIL"  # forwarded: no upstream here
    finally:
        listeners.network_removed(4302)
        listeners.stop()
        resolver.stop()
