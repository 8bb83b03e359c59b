"""The engine event pump (driver/events.py): one stream per process for the
catalog and the name publisher, a connect's container inspect shared between
them, and a full pass by both after every reconnect. Real catalog and name
publisher, in-memory store, a stand-in engine (tests/engine_standin.py)."""

from __future__ import annotations

import threading

import pytest

from driver.catalog import Catalog
from driver.engine import EngineNetworkInfo
from driver.events import EngineEvent, EventPump
from driver.model import Network
from driver.namepub import NamePublisher
from driver.state import State, network_key
from driver.store.memory import MemoryStore
from tests.engine_standin import StandinEngine
from tests.hosts import wait_for

H1, NET, VNI = "10.99.0.1", "n" * 64, 4096
WEB = EngineNetworkInfo(NET, "web", "pyoverlay", "pyoverlay", "10.40.0.0/24", "10.40.0.1")


class Recorder:
    """A subscriber that keeps what it is told."""

    def __init__(self, types=("network", "container")):
        self.types = types
        self.told: list[str] = []
        self.changed = threading.Event()

    def wants(self, event):
        return event.type in self.types

    def engine_up(self):
        self.told.append("up")

    def engine_event(self, event):
        self.told.append(f"{event.type} {event.action}")

    def engine_down(self):
        self.told.append("down")


@pytest.fixture
def host():
    """The catalog and the name publisher on one pump, as plugin/server.py wires them."""
    store, engine = MemoryStore(), StandinEngine()
    state = State(store)
    store.put(network_key(NET), Network(NET, VNI, H1, 1450, WEB.subnet).to_json())
    engine.nets[NET] = WEB
    engine.run("c1", "front", NET, "e1", "10.40.0.2")
    catalog = Catalog(state, engine, H1, "pyoverlay", resync=300)
    publisher = NamePublisher(state, engine, H1, ttl=3, resync=300)
    pump = EventPump(engine)
    for part in (catalog, publisher):
        pump.subscribe(part)
        part.start()
    pump.start()
    yield state, engine, catalog, publisher, pump
    pump.stop()
    publisher.stop()
    catalog.stop()
    store.close()


def containers_recorded(state) -> dict:
    record = state.engine_networks(H1).get("web")
    return record.containers if record is not None else {}


def test_one_stream_feeds_both_and_a_connect_is_inspected_once(host):
    state, engine, catalog, publisher, pump = host
    wait_for(lambda: (VNI, "e1") in state.names_of(H1), 5, "the publisher's first pass")
    wait_for(lambda: containers_recorded(state) == {"e1": "front"}, 5, "the catalog's first pass")
    assert engine.count("events") == 1 and pump.streams == 1
    before = engine.count("container")
    engine.run("c2", "back", NET, "e2", "10.40.0.3")
    engine.emit("network", "connect", "c2", NET, name="web", type="pyoverlay")
    wait_for(lambda: (VNI, "e2") in state.names_of(H1), 5, "the publisher to take the connect")
    wait_for(lambda: "e2" in containers_recorded(state), 5, "the catalog to take the connect")
    assert engine.asked.count(("container", "c2")) == 1  # one inspect for both
    assert engine.count("container") == before + 1
    assert engine.count("events") == 1


def test_after_a_reconnect_both_catch_up_on_what_they_missed(host):
    state, engine, catalog, publisher, pump = host
    wait_for(lambda: containers_recorded(state) == {"e1": "front"} and publisher.passes, 5, "the first passes")
    passes = (catalog.passes, publisher.passes)
    engine.end_stream()
    # Started while nobody listened: no event will ever say so.
    engine.run("c3", "late", NET, "e3", "10.40.0.4")
    wait_for(lambda: pump.streams == 2, 5, "the pump to reconnect")
    wait_for(lambda: (VNI, "e3") in state.names_of(H1), 5, "the publisher's pass after the reconnect")
    wait_for(lambda: "e3" in containers_recorded(state), 5, "the catalog's pass after the reconnect")
    assert catalog.passes > passes[0] and publisher.passes > passes[1]
    assert catalog.connected.is_set()


def test_an_engine_that_is_not_there_yet_is_waited_for_and_each_hears_only_what_it_wants():
    engine = StandinEngine()
    engine.down = True
    networks, everything = Recorder(types=("network",)), Recorder()
    pump = EventPump(engine)
    pump.subscribe(networks)
    pump.subscribe(everything)
    pump.start()
    try:
        wait_for(lambda: engine.count("events") >= 2, 5, "a second attempt")
        assert networks.told == [] and pump.streams == 0
        engine.down = False
        wait_for(lambda: pump.streams == 1, 5, "the stream once the engine answers")
        engine.emit("container", "rename", "c1")
        engine.emit("network", "connect", "c1", NET)
        wait_for(lambda: len(everything.told) == 3, 5, "both events")
        assert everything.told == ["up", "container rename", "network connect"]
        assert networks.told == ["up", "network connect"]
        engine.end_stream()
        wait_for(lambda: len(everything.told) == 5, 5, "the pump to reconnect")
        assert everything.told[3:] == networks.told[2:] == ["down", "up"] and pump.streams == 2
    finally:
        pump.stop()


def test_a_failed_inspect_is_asked_again_by_the_next_subscriber():
    class Flaky(StandinEngine):
        fail = True

        def container(self, cid):
            if self.fail:
                self.fail = False
                raise OSError("engine busy (test)")
            return super().container(cid)

    engine = Flaky()
    engine.run("c1", "front", NET, "e1", "10.40.0.2")
    event = EngineEvent({"Type": "network", "Action": "connect", "Actor": {"ID": NET, "Attributes": {"container": "c1"}}})
    with pytest.raises(OSError):
        event.container(engine)
    assert event.container(engine)["Name"] == "/front"
    assert event.container(engine)["Name"] == "/front" and engine.count("container") == 1
