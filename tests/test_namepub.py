"""The name publisher against a stand-in engine (events and inspect as the
docker API returns them, through the real event pump) and the in-memory
store, outages included."""

from __future__ import annotations

import pytest

from driver.events import EventPump
from driver.model import NameRecord, Network
from driver.namepub import NamePublisher
from driver.state import State, network_key
from driver.store.base import StoreError
from driver.store.memory import MemoryStore
from tests.engine_standin import StandinEngine
from tests.hosts import wait_for

HOST, VNI, NET = "10.99.0.1", 4100, "n-web"


class FlakyStore(MemoryStore):
    down = False

    def put(self, key, value, lease=0):
        if self.down:
            raise StoreError("store down (test)")
        return super().put(key, value, lease)


@pytest.fixture
def setup():
    store, engine = FlakyStore(), StandinEngine()
    store.put(network_key(NET), Network(NET, VNI, HOST, 1450, "10.1.0.0/24").to_json())
    engine.run("c1", "front", NET, "ep-c1", "10.1.0.2", ["www"])
    pub = NamePublisher(State(store), engine, HOST, ttl=3)
    pump = EventPump(engine)
    pump.subscribe(pub)
    pub.start()
    pump.start()
    yield store, engine, pub
    pump.stop()
    pub.stop()


def names(store) -> dict[tuple[int, str], NameRecord]:
    return State(store).names_of(HOST)


def test_publishes_renames_and_forgets(setup):
    store, engine, pub = setup
    key = (VNI, "ep-c1")
    wait_for(lambda: key in names(store), 5, "the first pass")
    assert names(store)[key] == NameRecord(HOST, "c1", "front", "10.1.0.2", NET, ("www",))
    engine.containers["c1"]["Name"] = "/front2"
    engine.emit("container", "rename", "c1")
    wait_for(lambda: names(store).get(key) and names(store)[key].name == "front2", 5, "the rename")
    del engine.containers["c1"]
    engine.emit("container", "destroy", "c1")
    wait_for(lambda: key not in names(store), 5, "the record to go")


def test_events_that_change_no_name_are_not_followed(setup):
    store, engine, pub = setup
    wait_for(lambda: pub.passes, 5, "the first pass")
    engine.asked.clear()
    engine.emit("container", "create", "c1")  # the pump's stream carries it for the catalog's filter
    engine.emit("network", "connect", "c1", "n-bridge")  # another driver's network
    engine.emit("container", "rename", "c1")
    wait_for(lambda: engine.count("container"), 5, "the rename to be taken")
    assert engine.asked == [("container", "c1")]


def test_a_store_outage_is_waited_out(setup):
    store, engine, pub = setup
    wait_for(lambda: pub.passes, 5, "the first pass")
    store.down = True
    engine.run("c2", "late", NET, "ep-c2", "10.1.0.3")
    engine.emit("network", "connect", "c2", NET)
    wait_for(lambda: ("container", "c2") in engine.asked, 5, "the event to be taken")
    assert (VNI, "ep-c2") not in names(store)
    store.down = False
    wait_for(lambda: (VNI, "ep-c2") in names(store), 10, "the write retried after the outage")


def test_a_clean_stop_revokes_the_names(setup):
    store, engine, pub = setup
    wait_for(lambda: names(store), 5, "the first pass")
    pub.stop()
    assert names(store) == {}
