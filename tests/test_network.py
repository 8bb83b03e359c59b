"""The network driver's operations against a recording stand-in for the kernel
layer (driver/dataplane/protocol.py's KernelLayer) and an in-memory store:
which kernel calls each libnetwork call makes, in which order, and that a
refusal leaves nothing behind. The real kernel path is test_protocol's,
test_isolation's and the e2e suite's."""

from __future__ import annotations

import pytest

from driver.dataplane import DataplaneError
from driver.dataplane.protocol import KernelLayer
from driver.errors import DriverError
from driver.network import NetworkDriver
from driver.state import State
from driver.store import open_store

HOST = "10.9.0.1"
NET, EP = "n" * 64, "e" * 64
POOL = [{"AddressSpace": "pyoverlay", "Pool": "10.40.0.0/24"}]
VNI = 4096  # the first VNI the driver picks by itself


class RecordingKernel:
    """Records every call; namespaces and veths are plain sets."""

    def __init__(self, namespaces: set[int] = (), veths: dict[int, set[str]] | None = None):
        self.calls: list[tuple] = []
        self.namespaces = set(namespaces)
        self.veths = veths or {}
        self.refuse: set[str] = set()  # methods that raise DataplaneError

    def _record(self, *call) -> None:
        self.calls.append(call)
        if call[0] in self.refuse:
            raise DataplaneError(f"{call[0]} refused by the test")

    def underlay_mtu(self) -> int:
        self._record("underlay_mtu")
        return 1500

    def create_network(self, vni, mtu, encrypted=False):
        self._record("create_network", vni, mtu, *(("encrypted",) if encrypted else ()))
        self.namespaces.add(vni)

    def create_direct(self, vni):
        self._record("create_direct", vni)

    def delete_network(self, vni):
        self._record("delete_network", vni)
        self.namespaces.discard(vni)
        self.veths.pop(vni, None)

    def networks(self):
        return set(self.namespaces)

    def create_endpoint(self, vni, endpoint_id, mac, mtu):
        self._record("create_endpoint", vni, endpoint_id, mac, mtu)
        self.veths.setdefault(vni, set()).add(endpoint_id[:10])
        return self.endpoint_ifname(endpoint_id)

    def delete_endpoint(self, vni, endpoint_id):
        self._record("delete_endpoint", vni, endpoint_id)
        self.veths.get(vni, set()).discard(endpoint_id[:10])

    def delete_endpoint_soon(self, vni, endpoint_id):
        self._record("delete_endpoint_soon", vni, endpoint_id)
        self.veths.get(vni, set()).discard(endpoint_id[:10])

    def endpoints(self, vni):
        return set(self.veths.get(vni, ()))

    def endpoint_ifname(self, endpoint_id):
        return "pyo" + endpoint_id[:10]

    def netns_name(self, vni):
        return f"/run/netns/pyo-{vni}"


class RecordingPeers:
    def __init__(self):
        self.calls: list[tuple] = []

    def network_added(self, vni, multicast=False):
        self.calls.append(("added", vni, multicast))

    def network_removed(self, vni):
        self.calls.append(("removed", vni))

    def restored(self):
        self.calls.append(("restored",))


@pytest.fixture
def world():
    store = open_store("memory://")
    kernel, peers = RecordingKernel(), RecordingPeers()
    checked: KernelLayer = kernel  # the stand-in must satisfy the Protocol the driver is typed with
    driver = NetworkDriver(State(store), checked, peers, host=HOST, vtep=HOST)
    yield store, kernel, peers, driver
    store.close()


def _keys(store) -> list[str]:
    return sorted(kv.key for kv in store.list("")[0])


def test_create_and_delete_network_make_and_remove_the_namespace(world):
    store, kernel, peers, driver = world
    driver.create_network(NET, {}, POOL, [])
    assert kernel.calls == [("underlay_mtu",), ("create_network", VNI, 1450)]  # 1500 - VXLAN's 50
    assert peers.calls == [("added", VNI, False)]
    assert driver.state.network(NET).vni == VNI
    kernel.calls.clear()
    driver.delete_network(NET)
    assert kernel.calls == [("delete_network", VNI)]
    assert peers.calls[-1] == ("removed", VNI)
    assert _keys(store) == []


def test_a_refused_option_touches_neither_kernel_nor_store(world):
    store, kernel, peers, driver = world
    with pytest.raises(DriverError, match="unknown option -o colour"):
        driver.create_network(NET, {"com.docker.network.generic": {"colour": "blue"}}, POOL, [])
    with pytest.raises(DriverError, match="-o vni=0 is not valid"):
        driver.create_network(NET, {"com.docker.network.generic": {"vni": "0"}}, POOL, [])
    assert [c for c in kernel.calls if c[0] != "underlay_mtu"] == []
    assert peers.calls == [] and _keys(store) == []


def test_a_kernel_refusal_undoes_the_store_change(world):
    store, kernel, peers, driver = world
    kernel.refuse.add("create_network")
    with pytest.raises(DataplaneError, match="refused by the test"):
        driver.create_network(NET, {}, POOL, [])
    assert _keys(store) == [], "no network, overlay or subnet claim may outlive the refusal"
    assert peers.calls == []
    kernel.refuse.clear()
    driver.create_network(NET, {}, POOL, [])  # the same VNI is free again
    assert driver.state.network(NET).vni == VNI


def test_endpoint_join_leave_and_delete_call_the_kernel_in_order(world):
    store, kernel, peers, driver = world
    driver.create_network(NET, {}, POOL, [])
    kernel.calls.clear()
    answer = driver.create_endpoint(NET, EP, {"Address": "10.40.0.5/24"})
    assert kernel.calls == [], "CreateEndpoint writes records only; the veth comes at Join"
    mac = answer["Interface"]["MacAddress"]
    assert mac == "02:50:0a:28:00:05"
    joined = driver.join(NET, EP, "/var/run/docker/netns/abc")
    assert joined["InterfaceName"] == {"SrcName": "pyo" + EP[:10], "DstPrefix": "eth"}
    driver.leave(NET, EP)
    driver.delete_endpoint(NET, EP)
    assert kernel.calls == [
        ("create_endpoint", VNI, EP, mac, 1450),
        ("delete_endpoint_soon", VNI, EP),
    ], "Leave queues the veth's deletion (answering at once); DeleteEndpoint must not delete it again"
    assert driver.state.endpoint(EP) is None
    assert not [k for k in _keys(store) if k.startswith("peers/")], "the peer record goes with the endpoint"


def test_delete_network_removes_forgotten_endpoints_before_the_namespace(world):
    store, kernel, peers, driver = world
    driver.create_network(NET, {}, POOL, [])
    driver.create_endpoint(NET, EP, {"Address": "10.40.0.5/24"})
    driver.join(NET, EP, "")
    kernel.calls.clear()
    driver.delete_network(NET)  # the engine crashed and never sent Leave/DeleteEndpoint
    assert kernel.calls == [("delete_endpoint", VNI, EP), ("delete_network", VNI)]
    assert driver.state.endpoint(EP) is None


def test_a_join_the_kernel_refuses_leaves_the_endpoint_to_retry(world):
    store, kernel, peers, driver = world
    driver.create_network(NET, {}, POOL, [])
    driver.create_endpoint(NET, EP, {"Address": "10.40.0.5/24"})
    kernel.refuse.add("create_endpoint")
    with pytest.raises(DataplaneError):
        driver.join(NET, EP, "")
    assert driver.state.endpoint(EP) is not None, "the engine retries the Join: the endpoint must stay"
    kernel.refuse.clear()
    assert driver.join(NET, EP, "")["InterfaceName"]["SrcName"] == "pyo" + EP[:10]


def test_restore_removes_debris_and_remakes_what_the_store_holds(world):
    store, _, _, driver = world
    driver.create_network(NET, {}, POOL, [])
    driver.create_endpoint(NET, EP, {"Address": "10.40.0.5/24"})
    # After a reboot: the namespace is gone; another has debris of ours.
    kernel = RecordingKernel(namespaces={VNI, 7777}, veths={VNI: {EP[:10], "deadbeef00"}, 7777: {"x" * 10}})
    restarted = RecordingPeers()
    driver = NetworkDriver(State(store), kernel, restarted, host=HOST, vtep=HOST)
    driver.restore()
    assert kernel.calls == [
        ("delete_network", 7777),  # stale: no network of this host has VNI 7777
        ("create_network", VNI, 1450),  # converges the one the store holds
        ("delete_endpoint", VNI, "deadbeef00"),  # a veth no endpoint owns
    ], "the live endpoint's veth must be kept"
    assert restarted.calls == [("added", VNI, False), ("restored",)]


def test_the_real_dataplane_and_the_stand_in_offer_what_the_protocol_names():
    """No type checker runs in CI: compare the signatures here, so the
    Protocol, the real Dataplane and this stand-in cannot drift apart."""
    import inspect

    from driver.dataplane import Dataplane

    wanted = {n: inspect.signature(f) for n, f in vars(KernelLayer).items()
              if callable(f) and not n.startswith("_")}
    assert len(wanted) == 11
    for cls in (Dataplane, RecordingKernel):
        for name, signature in wanted.items():
            have = inspect.signature(getattr(cls, name))
            params = [p for p in have.parameters if p != "self"]
            assert params == [p for p in signature.parameters if p != "self"], f"{cls.__name__}.{name}{have}"


def test_multicast_is_the_overlay_s_on_every_host_and_fixed_once_made(world):
    """-o multicast=true reaches peer sync here, and on a host that joins
    later with the option left out; a host asking the opposite is refused
    with what to do, and nothing of it is kept."""
    store, kernel, peers, driver = world
    with pytest.raises(DriverError, match="-o multicast=yes is not valid: use -o multicast=true"):
        driver.create_network(NET, {"com.docker.network.generic": {"multicast": "yes"}}, POOL, [])
    assert peers.calls == [] and _keys(store) == []
    driver.create_network(NET, {"com.docker.network.generic": {"multicast": "true"}}, POOL, [])
    assert peers.calls == [("added", VNI, True)]
    assert driver.state.overlay(VNI).multicast

    other = "10.9.0.2"
    theirs = RecordingPeers()
    there = NetworkDriver(State(store), RecordingKernel(), theirs, host=other, vtep=other)
    before = _keys(store)
    with pytest.raises(DriverError, match=f"VNI {VNI} floods broadcast and multicast on other hosts "
                                          r"\(-o multicast=true\); use -o multicast=true or leave the option "
                                          "out. It is fixed when the network is made: to change it, remove the "
                                          "network on every host and create it again"):
        there.create_network("m" * 64, {"com.docker.network.generic": {"multicast": "false"}}, POOL, [])
    assert _keys(store) == before and theirs.calls == []
    there.create_network("m" * 64, {}, POOL, [])
    assert theirs.calls == [("added", VNI, True)]

    # After a restart the overlay still floods.
    restarted = RecordingPeers()
    NetworkDriver(State(store), RecordingKernel(), restarted, host=HOST, vtep=HOST).restore()
    assert restarted.calls == [("added", VNI, True), ("restored",)]


POOL6 = [{"AddressSpace": "pyoverlay", "Pool": "fd00:40::/64"}]
V6 = {"com.docker.network.enable_ipv6": True}


def test_every_host_gives_a_dual_stack_overlay_the_same_ipv6_subnet(world):
    """Hosts join an overlay by its IPv4 subnet; one giving it another IPv6
    subnet, or none, is refused with what to do, and nothing of it is kept."""
    store, kernel, peers, driver = world
    driver.create_network(NET, V6, POOL, POOL6)
    assert driver.state.overlay(VNI).subnet6 == "fd00:40::/64"
    assert driver.state.network(NET).subnets() == ("10.40.0.0/24", "fd00:40::/64")

    other = "10.9.0.2"
    theirs = RecordingPeers()
    there = NetworkDriver(State(store), RecordingKernel(), theirs, host=other, vtep=other)
    before = _keys(store)
    with pytest.raises(DriverError, match=f"VNI {VNI} has IPv6 subnet fd00:40::/64 on other hosts; create it "
                                          r"here with the same subnets \(--ipv6 --subnet fd00:40::/64\)"):
        there.create_network("m" * 64, {}, POOL, [])
    with pytest.raises(DriverError, match="has IPv6 subnet fd00:40::/64 on other hosts"):
        there.create_network("m" * 64, V6, POOL, [{"AddressSpace": "pyoverlay", "Pool": "fd00:41::/64"}])
    assert _keys(store) == before and theirs.calls == []
    there.create_network("m" * 64, V6, POOL, POOL6)
    assert theirs.calls == [("added", VNI, False)]


def test_an_ipv6_only_network_and_what_it_refuses(world):
    store, kernel, peers, driver = world
    no_v4 = {**V6, "com.docker.network.enable_ipv4": False}
    for options, v4, v6, says in [
        ({"com.docker.network.enable_ipv4": False}, [], [], "needs IPv6: add --ipv6"),
        (V6, POOL, [], "exactly one IPv6 subnet"),
        ({**no_v4, "com.docker.network.generic": {"block_size": "120"}}, [], POOL6, "this network has no IPv4"),
        ({**V6, "com.docker.network.generic": {"com.docker.network.enable_ipv4": "false"}}, POOL, POOL6,
         "Docker 28's --ipv4=false"),
        (no_v4, [], [{"AddressSpace": "pyoverlay", "Pool": "fe80::/64"}], "not a unicast range"),
    ]:
        with pytest.raises(DriverError, match=says):
            driver.create_network(NET, options, v4, v6)
    assert [c for c in kernel.calls if c[0] != "underlay_mtu"] == [] and _keys(store) == []

    driver.create_network(NET, no_v4, [], POOL6)
    network = driver.state.network(NET)
    assert (network.subnet, network.subnet6) == ("fd00:40::/64", "")  # known by its IPv6 subnet
    assert driver.state.subnet_claim("fd00:40::/64").vni == VNI
    driver.delete_network(NET)
    assert _keys(store) == []
