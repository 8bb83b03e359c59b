"""The name table's answers, from plain records (no store, no wire)."""

from __future__ import annotations

import pytest

from driver.dns.server import Answer
from driver.names import A, AAAA, NOERROR, NXDOMAIN, PTR, NameTable, ptr_address
from driver.namepub import records_of
from driver.model import NameRecord
from driver.state import name_key
from driver.store.memory import MemoryStore

WEB, DB = 4100, 4200  # two overlays


def rec(host, container, name, address, network, aliases=()):
    return NameRecord(host=host, container=container, name=name, address=address, network=network,
                      aliases=tuple(aliases))


@pytest.fixture
def table():
    t = NameTable(MemoryStore())
    t.load({
        name_key(WEB, "e1"): rec("h1", "c1", "front", "10.1.0.2", "web", ["www"]),
        name_key(WEB, "e2"): rec("h2", "c2", "api", "10.1.0.3", "web"),
        name_key(WEB, "e3"): rec("h3", "c3", "api", "10.1.0.4", "web"),  # same name on another host
        name_key(DB, "e4"): rec("h2", "c2", "api", "10.2.0.3", "db"),  # api is on both networks
        name_key(DB, "e5"): rec("h3", "c5", "pg", "10.2.0.5", "db", ["database"]),
    })
    return t


def test_name_alias_and_name_dot_network(table):
    assert table.lookup(WEB, "10.1.0.3", "front", A) == Answer(NOERROR, ("10.1.0.2",), 0)
    assert table.lookup(WEB, "10.1.0.3", "www", A) == Answer(NOERROR, ("10.1.0.2",), 0)
    assert table.lookup(WEB, "10.1.0.3", "front.web", A) == Answer(NOERROR, ("10.1.0.2",), 0)
    assert table.lookup(WEB, "10.1.0.3", "FRONT.Web", A).records == ("10.1.0.2",)


def test_every_host_holding_a_name_is_answered(table):
    assert table.lookup(WEB, "10.1.0.2", "api", A).records == ("10.1.0.3", "10.1.0.4")


def test_a_querier_on_two_networks_finds_both(table):
    # c2 asks on web but is on db too: pg is answered
    assert table.lookup(WEB, "10.1.0.3", "pg", A).records == ("10.2.0.5",)
    assert table.lookup(WEB, "10.1.0.3", "database.db", A).records == ("10.2.0.5",)


def test_a_name_on_another_network_is_nxdomain_never_its_address(table):
    answer = table.lookup(WEB, "10.1.0.2", "pg", A)
    assert answer.rcode == NXDOMAIN and answer.records == ()
    assert table.lookup(WEB, "10.1.0.2", "pg.db", A).rcode == NXDOMAIN


def test_unknown_querier_is_scoped_to_the_overlay_it_asked_on(table):
    assert table.lookup(DB, "10.2.0.99", "pg", A).records == ("10.2.0.5",)
    assert table.lookup(DB, "10.2.0.99", "front", A).rcode == NXDOMAIN


def test_other_names_and_the_host_listener_forward(table):
    assert table.lookup(WEB, "10.1.0.2", "example.com", A) is None
    assert table.lookup(None, "172.17.0.2", "front", A) is None


def test_aaaa_and_other_types_of_a_cluster_name_are_empty_noerror(table):
    assert table.lookup(WEB, "10.1.0.2", "api", AAAA) == Answer(NOERROR, (), 0)


def test_ptr(table):
    assert ptr_address("2.0.1.10.in-addr.arpa") == "10.1.0.2"
    assert ptr_address("x.0.1.10.in-addr.arpa") is None
    assert table.lookup(WEB, "10.1.0.3", "2.0.1.10.in-addr.arpa", PTR).records == ("front.web",)
    assert table.lookup(WEB, "10.1.0.2", "5.0.2.10.in-addr.arpa", PTR).rcode == NXDOMAIN  # not on db
    assert table.lookup(WEB, "10.1.0.2", "8.8.8.8.in-addr.arpa", PTR) is None


def test_events_update_the_table():
    store = MemoryStore()
    t = NameTable(store)
    t.start()
    try:
        t.synced.wait(5)
        key = name_key(WEB, "e9")
        store.put(key, rec("h1", "c9", "late", "10.1.0.9", "web").to_json())
        import time
        deadline = time.monotonic() + 5
        while t.lookup(WEB, "10.1.0.9", "late", A) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.lookup(WEB, "10.1.0.9", "late", A).records == ("10.1.0.9",)
        store.delete(key)
        while t.lookup(WEB, "10.1.0.9", "late", A) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.lookup(WEB, "10.1.0.9", "late", A) is None
    finally:
        t.stop()


def test_records_of_an_inspected_container():
    inspect = {
        "Id": "c1" * 32, "Name": "/front", "State": {"Running": True},
        "NetworkSettings": {"Networks": {
            "web": {"NetworkID": "n-web", "EndpointID": "e1", "IPAddress": "10.1.0.2",
                    "Aliases": ["www", "c1c1c1c1c1c1"], "DNSNames": ["front", "www"]},
            "bridge": {"NetworkID": "n-bridge", "EndpointID": "e0", "IPAddress": "172.17.0.2"},
            "gone": {"NetworkID": "n-web", "EndpointID": "", "IPAddress": ""},
        }},
    }
    found = records_of(inspect, "h1", {"n-web": WEB}.get)
    assert found == {(WEB, "e1"): rec("h1", "c1" * 32, "front", "10.1.0.2", "web", ["c1c1c1c1c1c1", "www"])}
    assert records_of({**inspect, "State": {"Running": False}}, "h1", {"n-web": WEB}.get) == {}


def test_aaaa_for_dual_stack_containers():
    """A dual-stack container's IPv6 address answers AAAA (A as before); an
    IPv4-only one's AAAA stays empty NOERROR, a name elsewhere NXDOMAIN."""
    t = NameTable(MemoryStore())
    six = NameRecord(host="h1", container="c1", name="front", address="10.1.0.2", network="web",
                     address6="fd00:1::2")
    t.load({name_key(WEB, "e1"): six,
            name_key(WEB, "e2"): rec("h2", "c2", "api", "10.1.0.3", "web"),
            name_key(DB, "e3"): NameRecord(host="h3", container="c3", name="pg", address="10.2.0.5", network="db",
                                           address6="fd00:2::5")})
    assert t.lookup(WEB, "10.1.0.3", "front", AAAA).records == ("fd00:1::2",)
    assert t.lookup(WEB, "10.1.0.3", "front.web", AAAA).records == ("fd00:1::2",)
    assert t.lookup(WEB, "10.1.0.3", "front", A).records == ("10.1.0.2",)
    assert t.lookup(WEB, "10.1.0.2", "api", AAAA) == Answer(NOERROR, (), 0)
    assert t.lookup(WEB, "10.1.0.2", "pg", AAAA).rcode == NXDOMAIN
    # The record carries the address only when there is one: IPv4 records read as before.
    assert "address6" not in rec("h2", "c2", "api", "10.1.0.3", "web").to_json()
    assert NameRecord.from_json(six.to_json()) == six


def test_records_of_takes_the_ipv6_address():
    inspect = {"Name": "/front", "Id": "c1", "State": {"Running": True}, "NetworkSettings": {"Networks": {
        "web": {"EndpointID": "e1", "NetworkID": "n1", "IPAddress": "10.1.0.2", "GlobalIPv6Address": "fd00:1::2"}}}}
    (record,) = records_of(inspect, "h1", lambda network_id: WEB).values()
    assert (record.address, record.address6) == ("10.1.0.2", "fd00:1::2")
