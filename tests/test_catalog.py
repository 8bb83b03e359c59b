"""The catalog's engine side against a stand-in engine: what it asks the
engine while containers come and go, and what it records when the engine
refuses to remove a network. The real engine path is in
tests/e2e/test_cluster_networks.py."""

from __future__ import annotations

import pytest

from driver.catalog import Catalog, EngineNetwork
from driver.engine import EngineNetworkInfo, EngineRefused
from driver.model import Network
from driver.state import CATALOG, engine_network_key, network_key
from driver.store import open_store
from ops.doctor import FAIL, Doctor

H1 = "10.99.0.1"
NET = "n" * 64
WEB = EngineNetworkInfo(NET, "web", "pyoverlay", "pyoverlay", "10.40.0.0/24", "10.40.0.1")


class Engine:
    """Answers as Docker Engine 20.10 does; counts network inspects."""

    url = "unix:///var/run/docker.sock"

    def __init__(self):
        self.nets = {NET: WEB}
        self.endpoints: dict[str, tuple[str, str]] = {}  # container ID -> (endpoint ID, name)
        self.inspects = 0
        self.refuse_remove = ""

    def networks(self, driver=None):
        return [self.network(n) for n in self.nets]

    def network_summaries(self):
        return [(i.id, i.name, i.driver, (i.subnet,)) for i in self.nets.values()]

    def network(self, network_id):
        self.inspects += 1
        info = self.nets.get(network_id)
        if info is None:
            return None
        return EngineNetworkInfo(info.id, info.name, info.driver, info.ipam_driver, info.subnet, info.gateway,
                                 containers={e: n for e, n in self.endpoints.values()},
                                 attached={c: e for c, (e, _) in self.endpoints.items()})

    def endpoint_of(self, container_id, network_id):
        return self.endpoints.get(container_id)

    def remove_network(self, network_id):
        if self.refuse_remove:
            raise EngineRefused(self.refuse_remove, 403)
        del self.nets[network_id]

    def close(self):
        pass


@pytest.fixture
def store():
    s = open_store("memory://")
    s.put(network_key(NET), Network(NET, 4096, H1, 1450, "10.40.0.0/24").to_json())
    yield s
    s.close()


@pytest.fixture
def engine():
    return Engine()


@pytest.fixture
def catalog(store, engine):
    c = Catalog(store, engine, H1, "pyoverlay")
    assert c._pass()  # publishes web
    c._on_snapshot(store.list(CATALOG)[0], 0)
    return c


def record(store) -> EngineNetwork:
    return EngineNetwork.from_json(store.get(engine_network_key(H1, "web")).value)


def event(action, container_id):
    return {"Type": "network", "Action": action,
            "Actor": {"ID": NET, "Attributes": {"container": container_id, "name": "web", "type": "pyoverlay"}}}


def test_containers_coming_and_going_are_recorded_without_network_inspects(store, engine, catalog):
    engine.inspects = 0
    for i in range(3):
        engine.endpoints[f"c{i}"] = (f"e{i}", f"app{i}")
        assert catalog._on_engine_event(event("connect", f"c{i}"))
    assert record(store).containers == {"e0": "app0", "e1": "app1", "e2": "app2"}
    del engine.endpoints["c1"]
    assert catalog._on_engine_event(event("disconnect", "c1"))
    assert record(store).containers == {"e0": "app0", "e2": "app2"}
    # Each network inspect is a network listing inside the engine; those are
    # what make Docker Engine 20.10 miscount endpoints under churn.
    assert engine.inspects == 0


def test_a_container_gone_before_its_connect_is_handled_changes_nothing(store, engine, catalog):
    assert catalog._on_engine_event(event("connect", "gone"))
    assert catalog._on_engine_event(event("disconnect", "gone"))
    assert record(store).containers == {}


def test_an_engine_that_miscounts_endpoints_is_named_with_what_to_do(store, engine, catalog):
    store.delete(CATALOG + "web")  # `pyoverlay network rm web` on another host
    catalog._on_snapshot([], 0)
    engine.refuse_remove = f"error while removing network: network web id {NET} has active endpoints"
    assert not catalog._pass()  # to be tried again
    rec = record(store)
    assert rec.removing and rec.network_id == NET
    assert "no container is on it" in rec.error and "systemctl restart docker" in rec.error
    # Restarted, the engine recounts and lets it go; the record goes with it.
    engine.refuse_remove = ""
    assert catalog._pass()
    assert NET not in engine.nets and store.get(engine_network_key(H1, "web")) is None


def test_a_container_that_joined_before_the_removal_is_not_a_miscount(store, engine, catalog):
    store.delete(CATALOG + "web")
    catalog._on_snapshot([], 0)
    engine.refuse_remove = f"error while removing network: network web id {NET} has active endpoints"
    real_remove = engine.remove_network

    def joined_meanwhile(network_id):
        engine.endpoints["late"] = ("e9", "late")
        real_remove(network_id)

    engine.remove_network = joined_meanwhile
    assert not catalog._pass()
    assert record(store).error == ""


def test_doctor_on_that_host_fails_and_says_what_to_do(store, engine, catalog):
    store.delete(CATALOG + "web")
    catalog._on_snapshot([], 0)
    engine.refuse_remove = f"error while removing network: network web id {NET} has active endpoints"
    catalog._pass()
    check = Doctor(store, H1, dataplane=None, engine=engine).check_engine()
    assert check.status == FAIL
    assert any("systemctl restart docker" in line for line in check.details), check
