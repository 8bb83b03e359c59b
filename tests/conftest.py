"""Shared fixtures: a throw-away "host" namespace with an underlay address, and
a complete driver (real dataplane in that namespace, in-memory store) behind
the real Flask app."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import uuid

import pytest

from driver.dataplane import Dataplane
from driver.ipam import Ipam
from driver.network import NetworkDriver
from driver.peersync import PeerSync
from driver.state import State
from driver.store import open_store
from plugin.app import create_app
from tests.etcdserver import EtcdServer
from tests.zkserver import ZkServer

_counter = itertools.count(1)


# One real etcd and one ZooKeeper server per session, for every test that
# needs a store server it does not stop: each test keeps to a key prefix
# (a root znode) of its own, so tests never see each other's keys.
@pytest.fixture(scope="session")
def etcd_server():
    server = EtcdServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def zk_server():
    server = ZkServer()
    server.start()
    yield server
    server.close()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def links(netns: str) -> set[str]:
    out = ip("-n", netns, "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


class HostNamespace:
    """A namespace standing in for a host: lo plus one underlay veth whose
    peer sits in a second namespace, so the address is real and routable."""

    def __init__(self, mtu: int = 1500):
        n = next(_counter)
        tag = f"{os.getpid() % 10000}x{n}"
        self.name = f"pyo-t-h{tag}"
        self.far = f"pyo-t-u{tag}"
        self.addr = f"10.97.{n % 250}.1"
        self.netns_dir = f"/run/pyoverlay-test/{self.name}"
        os.makedirs(self.netns_dir, exist_ok=True)
        ip("netns", "add", self.name)
        ip("netns", "add", self.far)
        ip("-n", self.name, "link", "add", "underlay0", "mtu", str(mtu), "type", "veth",
           "peer", "name", "far0", "netns", self.far)
        ip("-n", self.name, "addr", "add", f"{self.addr}/24", "dev", "underlay0")
        ip("-n", self.name, "link", "set", "underlay0", "up")
        ip("-n", self.name, "link", "set", "lo", "up")
        ip("-n", self.far, "addr", "add", f"10.97.{n % 250}.2/24", "dev", "far0")
        ip("-n", self.far, "link", "set", "far0", "up")
        ip("-n", self.name, "route", "add", "default", "via", f"10.97.{n % 250}.2")

    def overlay_namespaces(self) -> set[str]:
        return set(os.listdir(self.netns_dir))

    def kernel_snapshot(self) -> tuple:
        return (frozenset(links(self.name)), frozenset(self.overlay_namespaces()))

    def remove(self) -> None:
        for entry in os.listdir(self.netns_dir):
            path = os.path.join(self.netns_dir, entry)
            subprocess.run(["umount", "-l", path], capture_output=True)
            os.unlink(path)
        # Creating a namespace makes the directory a bind mount of itself (as iproute2 does).
        subprocess.run(["umount", "-l", self.netns_dir], capture_output=True)
        os.rmdir(self.netns_dir)
        ip("netns", "del", self.name, check=False)
        ip("netns", "del", self.far, check=False)


@pytest.fixture
def host_ns():
    host = HostNamespace()
    yield host
    host.remove()


class PluginUnderTest:
    """The whole plugin minus gunicorn: what the engine talks to."""

    def __init__(self, host: HostNamespace, store_url: str = "memory://"):
        self.host = host
        self.store = open_store(store_url)
        self.dataplane = Dataplane(vtep=host.addr, host_netns=host.name, netns_dir=host.netns_dir)
        self.peers = PeerSync(self.store, self.dataplane, vtep=host.addr)
        state = State(self.store)
        self.network = NetworkDriver(state, self.dataplane, self.peers, host=host.addr, vtep=host.addr)
        self.ipam = Ipam(state, host.addr, host_routes=self.dataplane.routes)
        self.network.claims_from = self.ipam.claims_from  # as plugin/server.py wires it
        self.network.release_unused = self.ipam.release_unused
        self.client = create_app(self.network, self.ipam).test_client()
        self.peers.start()
        assert self.peers.synced.wait(5), "peer sync never took its first snapshot"
        self.network.restore()  # as the plugin does at start

    def call(self, method: str, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        # The engine sends no Content-Type: the app must not depend on one.
        response = self.client.post(f"/{method}", data=data)
        return response.status_code, response.get_json(force=True)

    def store_snapshot(self) -> dict:
        kvs, _ = self.store.list("")
        return {kv.key: kv.value for kv in kvs if not kv.key.startswith("hosts/")}

    def close(self) -> None:
        self.peers.stop()
        self.ipam.close()
        self.dataplane.close()
        self.store.close()


@pytest.fixture
def plugin(host_ns):
    p = PluginUnderTest(host_ns)
    yield p
    for vni in p.dataplane.networks():
        p.dataplane.delete_network(vni)
    p.close()


def new_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # the engine's IDs are 64 hex digits
