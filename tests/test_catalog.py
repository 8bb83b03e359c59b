"""The catalog: its plan fed plain data (driver/catalog/plan.py), and its
applier against a stand-in engine: what it asks the engine while containers
come and go, and what it records when the engine refuses to remove a network.
The real engine path is in tests/e2e/test_cluster_networks.py."""

from __future__ import annotations

import pytest

from driver.catalog.apply import Applier
from driver.catalog.plan import Create, DropRecord, Later, Publish, Record, Remove, plan, plan_network
from driver.catalog.table import DesiredTable
from driver.engine import EngineNetworkInfo
from driver.events import EngineEvent
from driver.model import EngineNetwork, NamedNetwork, Network, Overlay
from driver.state import State, engine_network_key, network_key, overlay_key
from driver.store import open_store
from ops.doctor import FAIL, Doctor
from tests.engine_standin import StandinEngine

H1 = "10.99.0.1"
NET = "n" * 64
WEB = EngineNetworkInfo(NET, "web", "pyoverlay", "pyoverlay", "10.40.0.0/24", "10.40.0.1")
WEB_ENTRY = NamedNetwork("web", "10.40.0.0/24", vni=4096, origin=H1)
MISCOUNT = f"error while removing network: network web id {NET} has active endpoints"


def on(info: EngineNetworkInfo, **changes) -> EngineNetworkInfo:
    return EngineNetworkInfo(**{**info.__dict__, **changes})


def catalogued(info: EngineNetworkInfo, **changes) -> EngineNetwork:
    return EngineNetwork(info.name, H1, info.id, info.subnet, dict(info.containers), catalogued=True, **changes)


def one(info, entry=None, record=None, vni=4096):
    return plan_network(H1, "pyoverlay", info, entry, record, vni)


# -- the plan, on plain data ---------------------------------------------------------

def test_a_network_made_here_is_published_once_the_driver_has_recorded_it():
    assert one(WEB) == [Publish(WEB, 4096)]
    assert one(WEB, vni=0) == [Later("web", "the driver's record is not in the store (yet)")]
    # Another IPAM's network is refused by the driver: nothing to share.
    assert one(on(WEB, ipam_driver="default")) == []


def test_a_network_matching_the_catalog_is_recorded_with_its_containers():
    busy = on(WEB, containers={"e1": "app1"})
    assert one(busy, WEB_ENTRY) == [Record(catalogued(busy))]
    # The VNI the driver recorded must be the catalog's, when both are known.
    assert one(busy, WEB_ENTRY, vni=4097)[0].record.error


def test_a_network_that_differs_from_the_catalog_says_what_to_do_and_is_kept():
    [action] = one(on(WEB, subnet="10.41.0.0/24"), WEB_ENTRY)
    assert isinstance(action, Record) and not action.record.catalogued
    assert "docker network rm web" in action.record.error


def test_a_network_that_left_the_catalog_goes_when_unused_and_waits_for_its_containers():
    assert one(WEB, None, catalogued(WEB)) == [Remove(WEB)]
    busy = on(WEB, containers={"e1": "app1"})
    [action] = one(busy, None, catalogued(WEB))
    assert action.record == catalogued(busy, removing=True) and "app1" in action.note
    # Redefined in the catalog while the old one is still in use: the old one goes first.
    assert one(WEB, NamedNetwork("web", "10.41.0.0/24"), catalogued(WEB, removing=True)) == [Remove(WEB)]
    # A record of another network under that name (replaced meanwhile) removes nothing.
    assert one(WEB, None, EngineNetwork("web", H1, "x" * 64, catalogued=True)) == [Publish(WEB, 4096)]


def test_the_catalogs_networks_are_created_unless_the_name_is_taken_or_withdrawn():
    db = NamedNetwork("db", "10.42.0.0/24", vni=4100)
    assert plan(H1, "pyoverlay", {"db": db}, {}, {}, {}, {}) == [Create(db)]
    [taken] = plan(H1, "pyoverlay", {"db": db}, {}, {"db": "bridge"}, {}, {})
    assert taken.record.error.startswith("a bridge network named db already exists") and taken.warn
    assert taken.record.network_id == "" and taken.record.subnet == db.subnet
    assert plan(H1, "pyoverlay", {"db": db}, {}, {}, {}, {}, withdrawing={"db"}) == []


def test_records_that_no_longer_say_anything_true_are_dropped():
    gone = catalogued(WEB)  # its network left the engine while nobody watched
    refusal = EngineNetwork("db", H1, subnet="10.42.0.0/24", error="the engine refused")  # db left the catalog
    actions = plan(H1, "pyoverlay", {}, {}, {}, {"web": gone, "db": refusal}, {})
    assert sorted(a.name for a in actions if isinstance(a, DropRecord)) == ["db", "web"]
    assert actions == [DropRecord("web"), DropRecord("db")]


def test_a_pass_plans_every_network_against_the_records_left_after_the_drops():
    replaced = EngineNetwork("web", H1, "x" * 64, catalogued=True)  # the old web's record
    actions = plan(H1, "pyoverlay", {}, {"web": WEB}, {"web": "pyoverlay"}, {"web": replaced}, {NET: 4096})
    assert actions == [DropRecord("web"), Publish(WEB, 4096)]


# -- the applier, against a stand-in engine ----------------------------------------

@pytest.fixture
def state():
    s = open_store("memory://")
    s.put(network_key(NET), Network(NET, 4096, H1, 1450, "10.40.0.0/24").to_json())
    yield State(s)
    s.close()


@pytest.fixture
def engine():
    e = StandinEngine()
    e.nets[NET] = WEB
    return e


@pytest.fixture
def applier(state, engine):
    table = DesiredTable(state, on_change=lambda: None)
    a = Applier(state, engine, H1, "pyoverlay", table)
    assert a.run_pass()  # publishes web
    entry, revision = state.catalog_entry("web")
    assert entry == NamedNetwork("web", "10.40.0.0/24", "10.40.0.1", 4096, origin=H1)
    table.load({"web": (entry, revision)})
    return a


def record(state) -> EngineNetwork:
    return state.engine_networks(H1)["web"]


def event(action, container_id):
    return EngineEvent({"Type": "network", "Action": action,
                        "Actor": {"ID": NET, "Attributes": {"container": container_id, "name": "web",
                                                            "type": "pyoverlay"}}})


def test_containers_coming_and_going_are_recorded_without_network_inspects(state, engine, applier):
    engine.asked.clear()
    for i in range(3):
        engine.run(f"c{i}", f"app{i}", NET, f"e{i}", f"10.40.0.{i + 2}")
        assert applier.on_event(event("connect", f"c{i}"))
    assert record(state).containers == {"e0": "app0", "e1": "app1", "e2": "app2"}
    del engine.containers["c1"]
    assert applier.on_event(event("disconnect", "c1"))
    assert record(state).containers == {"e0": "app0", "e2": "app2"}
    # Each network inspect is a network listing inside the engine; those are
    # what make Docker Engine 20.10 miscount endpoints under churn.
    assert engine.count("network") == 0 and engine.count("container") == 3


def test_a_connect_shares_its_container_inspect(state, engine, applier):
    engine.run("c1", "app1", NET, "e1", "10.40.0.2")
    connect = event("connect", "c1")
    assert applier.on_event(connect)
    assert connect.container(engine)["Name"] == "/app1"  # the name publisher's turn: no second inspect
    assert engine.count("container") == 1


def test_a_container_gone_before_its_connect_is_handled_changes_nothing(state, engine, applier):
    assert applier.on_event(event("connect", "gone"))
    assert applier.on_event(event("disconnect", "gone"))
    assert record(state).containers == {}


def withdraw_from_catalog(state, applier):
    """`pyoverlay network rm web` on another host."""
    _, revision = state.catalog_entry("web")
    assert state.delete_catalog_entry("web", revision)
    applier.table.load({})


def test_an_engine_that_miscounts_endpoints_is_named_with_what_to_do(state, engine, applier):
    withdraw_from_catalog(state, applier)
    engine.refuse_remove = MISCOUNT
    assert not applier.run_pass()  # to be tried again
    rec = record(state)
    assert rec.removing and rec.network_id == NET
    assert "no container is on it" in rec.error and "systemctl restart docker" in rec.error
    # Restarted, the engine recounts and lets it go; the record goes with it.
    engine.refuse_remove = ""
    assert applier.run_pass()
    assert NET not in engine.nets and "web" not in state.engine_networks(H1)


def test_a_container_that_joined_before_the_removal_is_not_a_miscount(state, engine, applier):
    withdraw_from_catalog(state, applier)
    engine.refuse_remove = MISCOUNT
    real_remove = engine.remove_network

    def joined_meanwhile(network_id):
        engine.run("late", "late", NET, "e9", "10.40.0.9")
        real_remove(network_id)

    engine.remove_network = joined_meanwhile
    assert not applier.run_pass()
    assert record(state).error == ""


def test_docker_network_rm_here_withdraws_the_name_from_the_catalog(state, engine, applier):
    del engine.nets[NET]
    assert applier.on_event(EngineEvent({"Type": "network", "Action": "destroy",
                                         "Actor": {"ID": NET, "Attributes": {"name": "web", "type": "pyoverlay"}}}))
    assert applier.wants_pass and "web" not in state.engine_networks(H1)
    assert applier.run_pass()
    assert state.catalog_entry("web") == (None, 0)
    assert applier.table.snapshot() == {}  # not created again before the watch says so
    assert engine.count("create_network") == 0


def test_doctor_on_that_host_fails_and_says_what_to_do(state, engine, applier):
    withdraw_from_catalog(state, applier)
    engine.refuse_remove = MISCOUNT
    applier.run_pass()
    check = Doctor(state.store, H1, dataplane=None, engine=engine).check_engine()
    assert check.status == FAIL
    assert any("systemctl restart docker" in line for line in check.details), check


def test_a_pass_deletes_this_hosts_unreadable_records_and_no_one_elses(state, applier):
    ghost, theirs = engine_network_key(H1, "ghost"), engine_network_key("10.99.0.2", "web")
    state.store.put(ghost, "{not json")  # no network of that name: no plan would write it again
    state.store.put(theirs, "{not json")
    assert applier.run_pass()
    assert state.store.get(ghost) is None
    assert state.store.get(theirs).value == "{not json"  # another host's, for its own catalog
    assert record(state).network_id == NET


def made_elsewhere(state) -> EngineNetworkInfo:
    """The network another host's engine is asked for from the catalog entry "web"."""
    other = StandinEngine()
    there = Applier(state, other, "10.99.0.2", "pyoverlay", DesiredTable(state, on_change=lambda: None))
    there.table.load({"web": state.catalog_entry("web")})
    assert there.run_pass()
    (made,) = other.nets.values()
    return made


def test_multicast_travels_with_the_name(state, engine):
    """-o multicast=true given on one host: the entry carries it, and another
    host's engine is asked for the network with it (so it floods there too)."""
    state.store.put(overlay_key(4096), Overlay(4096, "10.40.0.0/24", 1450, {H1: NET}, multicast=True).to_json())
    table = DesiredTable(state, on_change=lambda: None)
    assert Applier(state, engine, H1, "pyoverlay", table).run_pass()
    entry, _ = state.catalog_entry("web")
    assert entry.multicast and entry.options() == {"vni": "4096", "multicast": "true"}
    assert NamedNetwork.from_json(entry.to_json()) == entry

    made = made_elsewhere(state)
    assert made.name == "web" and made.options == {"vni": "4096", "multicast": "true"}


def test_gateway_mode_travels_with_the_name(state, engine):
    """-o gateway=pyoverlay given on one host: another host's engine is asked for it too."""
    engine.nets[NET] = on(WEB, options={"gateway": "pyoverlay"})
    assert Applier(state, engine, H1, "pyoverlay", DesiredTable(state, on_change=lambda: None)).run_pass()
    entry, _ = state.catalog_entry("web")
    assert entry.gateway_mode == "pyoverlay" and NamedNetwork.from_json(entry.to_json()) == entry
    made = made_elsewhere(state)
    assert made.options.get("gateway") == "pyoverlay"
    assert "gateway_mode" not in WEB_ENTRY.to_json() and "gateway" not in WEB_ENTRY.options()


def test_direct_mode_travels_with_the_name(state, engine):
    """-o encap=cross-subnet made on one host: the entry carries the overlay's
    own mode, and another host's engine is asked for the network with it."""
    state.store.put(overlay_key(4096), Overlay(4096, "10.40.0.0/24", 1450, {H1: NET}, encap="cross-subnet").to_json())
    assert Applier(state, engine, H1, "pyoverlay", DesiredTable(state, on_change=lambda: None)).run_pass()
    entry, _ = state.catalog_entry("web")
    assert entry.encap == "cross-subnet" and NamedNetwork.from_json(entry.to_json()) == entry
    made = made_elsewhere(state)
    assert made.options == {"vni": "4096", "encap": "cross-subnet"}
    assert "encap" not in WEB_ENTRY.to_json() and "encap" not in WEB_ENTRY.options()


def test_an_entry_without_multicast_reads_as_before():
    """Left out of the JSON when off: entries written before the option stay byte for byte."""
    entry = NamedNetwork("web", "10.40.0.0/24", vni=4096, origin=H1)
    assert "multicast" not in entry.to_json() and "multicast" not in entry.options()
    assert "multicast" not in Overlay(4096, "10.40.0.0/24", 1450).to_json()


def test_a_dual_stack_network_travels_with_both_subnets(state, engine):
    """--ipv6 with an IPv4 and an IPv6 subnet on one host: the entry carries
    both, another host's engine is asked for both, and the network there matches."""
    engine.nets[NET] = on(WEB, ipv6=True, subnet6="fd00:40::/64", gateway6="fd00:40::1")
    assert Applier(state, engine, H1, "pyoverlay", DesiredTable(state, on_change=lambda: None)).run_pass()
    entry, _ = state.catalog_entry("web")
    assert (entry.subnet, entry.subnet6, entry.gateway6) == ("10.40.0.0/24", "fd00:40::/64", "fd00:40::1")
    assert NamedNetwork.from_json(entry.to_json()) == entry
    assert "subnet6" not in WEB_ENTRY.to_json()  # an IPv4 entry reads as before
    made = made_elsewhere(state)
    assert (made.subnet, made.subnet6, made.gateway6, made.ipv6) == ("10.40.0.0/24", "fd00:40::/64",
                                                                     "fd00:40::1", True)
    assert state.engine_networks("10.99.0.2")["web"].catalogued
    # The same name with other IPv6 subnets (or none) differs from the catalog's, saying both.
    [action] = one(on(WEB, subnet6="fd00:41::/64"), entry)
    assert "fd00:41::/64" in action.record.error and "fd00:40::/64" in action.record.error
    [action] = one(WEB, entry)
    assert action.record.error and "10.40.0.0/24 fd00:40::/64" in action.record.error


def test_an_ipv6_only_network_an_older_engine_cannot_make_is_a_recorded_refusal(state):
    entry = NamedNetwork("six", "fd00:42::/64", "fd00:42::1", 4100, origin="cli")
    state.add_catalog_entry(entry)
    old = StandinEngine()
    old.no_ipv4_false = ("this engine (API 1.41) cannot make an IPv6-only network: --ipv4=false came with "
                         "Docker 28.0 (API 1.48); upgrade the engine on this host, or make the network dual-stack")
    there = Applier(state, old, "10.99.0.3", "pyoverlay", DesiredTable(state, on_change=lambda: None))
    there.table.load({"six": state.catalog_entry("six")})
    assert not there.run_pass()
    assert old.nets == {}
    why = state.engine_networks("10.99.0.3")["six"].error
    assert "IPv6-only" in why and "Docker 28.0" in why, why
    # An engine that can (28): made, IPv6 only.
    new = StandinEngine()
    here = Applier(state, new, "10.99.0.4", "pyoverlay", DesiredTable(state, on_change=lambda: None))
    here.table.load({"six": state.catalog_entry("six")})
    assert here.run_pass()
    (made,) = new.nets.values()
    assert (made.subnet, made.subnet6, made.ipv6) == ("fd00:42::/64", "", True)


def test_engine_inspect_reads_both_subnets_whatever_their_order():
    data = {"Id": NET, "Name": "web", "Driver": "pyoverlay", "EnableIPv6": True,
            "IPAM": {"Driver": "pyoverlay", "Config": [{"Subnet": "fd00:40::/64", "Gateway": "fd00:40::1"},
                                                       {"Subnet": "10.40.0.0/24", "Gateway": "10.40.0.1"}]}}
    info = EngineNetworkInfo.from_inspect(data)
    assert (info.subnet, info.gateway, info.subnet6, info.gateway6) == ("10.40.0.0/24", "10.40.0.1",
                                                                        "fd00:40::/64", "fd00:40::1")
    only6 = EngineNetworkInfo.from_inspect({**data, "IPAM": {"Driver": "pyoverlay",
                                                             "Config": [{"Subnet": "fd00:40::/64"}]}})
    assert (only6.subnet, only6.subnet6) == ("fd00:40::/64", "")
