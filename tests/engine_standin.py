"""A stand-in for driver.engine.Engine: containers and networks as the docker
API returns them, an event stream the test feeds (and may end), and a log of
what was asked. For unit tests of the catalog, the name publisher and the
event pump; the real engine path is in tests/e2e/."""

from __future__ import annotations

import queue
import threading
from typing import Optional

from driver.engine import EngineNetworkInfo, EngineRefused, EngineUnavailable, endpoint_in


class Stream:
    def __init__(self, events: "queue.Queue"):
        self.events = events
        self.closed = threading.Event()

    def __iter__(self):
        while not self.closed.is_set():
            try:
                event = self.events.get(timeout=0.02)
            except queue.Empty:
                continue
            if event is None:  # the engine went away
                return
            yield event

    def close(self):
        self.closed.set()


class StandinEngine:
    url = "unix:///standin.sock"

    def __init__(self):
        self.containers: dict[str, dict] = {}  # container ID -> inspect
        self.nets: dict[str, EngineNetworkInfo] = {}  # network ID -> info (containers come from self.containers)
        self.asked: list[tuple[str, str]] = []  # (call, argument), in order
        self.streams: list[Stream] = []
        self.down = False  # events() fails as with no engine listening
        self.refuse_remove = ""
        self.no_ipv4_false = ""  # set: an engine before 28, refusing an IPv6-only network with this
        self._events: queue.Queue = queue.Queue()

    # -- what a test does to the engine ----------------------------------------

    def run(self, cid: str, name: str, network_id: str, endpoint: str, ip: str, aliases=()):
        self.containers[cid] = {"Id": cid, "Name": "/" + name, "State": {"Running": True}, "NetworkSettings": {
            "Networks": {self._name_of(network_id): {"NetworkID": network_id, "EndpointID": endpoint,
                                                     "IPAddress": ip, "Aliases": list(aliases)}}}}

    def emit(self, kind: str, action: str, cid: str = "", network_id: str = "", **attributes):
        if kind == "network":
            actor = {"ID": network_id, "Attributes": {"container": cid, **attributes}}
        else:
            actor = {"ID": cid, "Attributes": attributes}
        self._events.put({"Type": kind, "Action": action, "Actor": actor})

    def end_stream(self):
        self._events.put(None)

    def count(self, call: str) -> int:
        return sum(1 for c, _ in self.asked if c == call)

    def _name_of(self, network_id: str) -> str:
        info = self.nets.get(network_id)
        return info.name if info is not None else network_id

    # -- the Engine interface ---------------------------------------------------

    def events(self):
        self.asked.append(("events", ""))
        if self.down:
            raise EngineUnavailable("no engine listening (stand-in)")
        stream = Stream(self._events)
        self.streams.append(stream)
        return stream

    def container(self, cid: str) -> Optional[dict]:
        self.asked.append(("container", cid))
        return self.containers.get(cid)

    def running_containers(self):
        return list(self.containers)

    def _members(self, network_id: str) -> dict[str, tuple[str, str]]:
        found = {}
        for cid, data in self.containers.items():
            hit = endpoint_in(data, network_id)
            if hit is not None:
                found[cid] = hit
        return found

    def network(self, network_id: str) -> Optional[EngineNetworkInfo]:
        self.asked.append(("network", network_id))
        info = self.nets.get(network_id)
        if info is None:
            return None
        members = self._members(network_id)
        return EngineNetworkInfo(info.id, info.name, info.driver, info.ipam_driver, info.subnet, info.gateway,
                                 info.internal, info.options,
                                 containers={e: n for e, n in members.values()},
                                 attached={c: e for c, (e, _) in members.items()},
                                 ipv6=info.ipv6, subnet6=info.subnet6, gateway6=info.gateway6)

    def networks(self, driver=None):
        return [self.network(n) for n, i in list(self.nets.items()) if driver is None or i.driver == driver]

    def network_summaries(self):
        return [(i.id, i.name, i.driver, (i.subnet,)) for i in self.nets.values()]

    def create_network(self, name, driver, subnet, gateway, options, internal, subnet6="", gateway6=""):
        self.asked.append(("create_network", name))
        if ":" in subnet and self.no_ipv4_false:
            raise EngineRefused(self.no_ipv4_false, None)
        network_id = f"{name}-id".ljust(64, "0")
        self.nets[network_id] = EngineNetworkInfo(network_id, name, driver, driver, subnet, gateway, internal,
                                                  dict(options), ipv6=bool(subnet6) or ":" in subnet,
                                                  subnet6=subnet6, gateway6=gateway6)
        return network_id

    def remove_network(self, network_id: str) -> None:
        self.asked.append(("remove_network", network_id))
        if self.refuse_remove:
            raise EngineRefused(self.refuse_remove, 403)
        del self.nets[network_id]

    def close(self):
        pass
