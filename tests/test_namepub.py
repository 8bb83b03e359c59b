"""The name publisher against a stand-in engine (events and inspect as the
docker API returns them) and the in-memory store, outages included."""

from __future__ import annotations

import queue
import threading

import pytest

from driver.model import NameRecord, Network
from driver.namepub import NamePublisher
from driver.state import NAMES, name_key, network_key
from driver.store.base import StoreError
from driver.store.memory import MemoryStore
from tests.hosts import wait_for

HOST, VNI, NET = "10.99.0.1", 4100, "n-web"


class FakeEngine:
    url = "fake"

    def __init__(self):
        self.containers: dict[str, dict] = {}
        self.events: queue.Queue = queue.Queue()

    def run(self, cid: str, name: str, ip: str, aliases=()):
        self.containers[cid] = {"Id": cid, "Name": "/" + name, "State": {"Running": True}, "NetworkSettings": {
            "Networks": {"web": {"NetworkID": NET, "EndpointID": "ep-" + cid, "IPAddress": ip,
                                 "Aliases": list(aliases)}}}}

    def emit(self, kind: str, action: str, cid: str):
        actor = {"ID": NET, "Attributes": {"container": cid}} if kind == "network" else {"ID": cid}
        self.events.put({"Type": kind, "Action": action, "Actor": actor})

    def container(self, cid):
        return self.containers.get(cid)

    def running_containers(self):
        return list(self.containers)

    def name_events(self):
        events = self.events

        class Stream:
            closed = threading.Event()

            def __iter__(self):
                while not self.closed.is_set():
                    try:
                        yield events.get(timeout=0.05)
                    except queue.Empty:
                        continue

            def close(self):
                self.closed.set()

        return Stream()

    def close(self):
        pass


class FlakyStore(MemoryStore):
    down = False

    def put(self, key, value, lease=0):
        if self.down:
            raise StoreError("store down (test)")
        return super().put(key, value, lease)


@pytest.fixture
def setup():
    store, engine = FlakyStore(), FakeEngine()
    store.put(network_key(NET), Network(NET, VNI, HOST, 1450, "10.1.0.0/24").to_json())
    engine.run("c1", "front", "10.1.0.2", ["www"])
    pub = NamePublisher(store, engine, HOST, ttl=3)
    pub.start()
    yield store, engine, pub
    pub.stop()


def names(store) -> dict[str, NameRecord]:
    return {kv.key: NameRecord.from_json(kv.value) for kv in store.list(NAMES)[0]}


def test_publishes_renames_and_forgets(setup):
    store, engine, pub = setup
    key = name_key(VNI, "ep-c1")
    wait_for(lambda: key in names(store), 5, "the first pass")
    assert names(store)[key] == NameRecord(HOST, "c1", "front", "10.1.0.2", "web", ("www",))
    engine.containers["c1"]["Name"] = "/front2"
    engine.emit("container", "rename", "c1")
    wait_for(lambda: names(store).get(key) and names(store)[key].name == "front2", 5, "the rename")
    del engine.containers["c1"]
    engine.emit("container", "destroy", "c1")
    wait_for(lambda: key not in names(store), 5, "the record to go")


def test_a_store_outage_is_waited_out(setup):
    store, engine, pub = setup
    wait_for(lambda: pub.passes, 5, "the first pass")
    store.down = True
    engine.run("c2", "late", "10.1.0.3")
    engine.emit("network", "connect", "c2")
    wait_for(lambda: not pub._queue.qsize(), 5, "the event to be taken")
    assert name_key(VNI, "ep-c2") not in names(store)
    store.down = False
    wait_for(lambda: name_key(VNI, "ep-c2") in names(store), 10, "the write retried after the outage")


def test_a_clean_stop_revokes_the_names(setup):
    store, engine, pub = setup
    wait_for(lambda: names(store), 5, "the first pass")
    pub.stop()
    assert names(store) == {}
