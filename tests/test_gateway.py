"""Gateway mode's operations (driver/gateway.py) through the network driver,
against stand-ins for the kernel and the NAT table and an in-memory store:
what Join answers, which ports are published, that a refusal changes
nothing, that the table always follows the store. The kernel side is
test_gateway_dataplane's; the engine's, tests/e2e/test_gateway_mode.py's."""

from __future__ import annotations

import socket

import pytest

from driver.dataplane.firewall import FirewallError
from driver.errors import DriverError
from driver.gateway import GatewayMode
from driver.model import Address
from driver.network import NetworkDriver
from driver.state import State
from driver.store import open_store
from plugin.app import create_app
from tests.test_network import RecordingKernel, RecordingPeers

HOST = "10.9.0.1"
NET, NET2 = "a" * 64, "b" * 64
EP, EP2 = "e" * 64, "f" * 64
POOL = [{"AddressSpace": "pyoverlay", "Pool": "10.41.0.0/24", "Gateway": "10.41.0.1/24"}]
POOL2 = [{"AddressSpace": "pyoverlay", "Pool": "10.42.0.0/24", "Gateway": "10.42.0.1/24"}]
GW = {"com.docker.network.generic": {"gateway": "pyoverlay"}}


class Kernel(RecordingKernel):
    def add_egress(self, vni, subnet, gateway, *v6):
        self._record("add_egress", vni, subnet, gateway, *v6)


class Nat:
    def __init__(self):
        self.uplinks, self.mappings, self.applied, self.refuse = [], [], 0, False

    def apply(self, uplinks, mappings):
        if self.refuse:
            raise FirewallError("nft refused by the test")
        self.uplinks, self.mappings, self.applied = sorted(uplinks), sorted(mappings), self.applied + 1

    def ports(self):
        return sorted((m.proto, m.host_ip, m.host_port, m.ip, m.port) for m in self.mappings)


@pytest.fixture
def world():
    store = open_store("memory://")
    kernel, nat = Kernel(), Nat()
    state = State(store)
    driver = NetworkDriver(state, kernel, RecordingPeers(), host=HOST, vtep=HOST,
                           gateway=GatewayMode(state, kernel, nat, HOST))
    yield driver, kernel, nat
    store.close()


def endpoint(driver, net=NET, ep=EP, ip="10.41.0.2"):
    driver.state.claim_address(driver.state.network(net).subnet, ip, Address.container(HOST))
    driver.create_endpoint(net, ep, {"Address": f"{ip}/24"})
    return driver.join(net, ep, "/var/run/docker/netns/x")


def binding(port, host_port, host_ip="", proto=6, end=None):
    return {"Proto": proto, "IP": "", "Port": port, "HostIP": host_ip, "HostPort": host_port,
            "HostPortEnd": host_port if end is None else end}


def portmap(*bindings):
    return {"com.docker.network.portmap": list(bindings)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def test_option_values(world):
    driver, kernel, nat = world
    with pytest.raises(DriverError, match="gateway=pyoverlay .*gateway=docker_gwbridge"):
        driver.create_network(NET, {"com.docker.network.generic": {"gateway": "bridge"}}, POOL, [])
    assert driver.state.networks() == [] and nat.applied == 0
    driver.create_network(NET, {"com.docker.network.generic": {"gateway": "docker_gwbridge"}}, POOL, [])
    assert driver.state.network(NET).gateway_mode == ""


def test_gwbridge_mode_is_unchanged(world):
    driver, kernel, nat = world
    driver.create_network(NET, {}, POOL, [])
    answer = endpoint(driver)
    assert "Gateway" not in answer
    driver.program_external_connectivity(NET, EP, portmap(binding(80, 8080)))
    assert nat.applied == 0 and driver.state.endpoint(EP).ports == []
    assert not [c for c in kernel.calls if c[0] == "add_egress"]


def test_gateway_mode_network_join_and_ports(world):
    driver, kernel, nat = world
    driver.create_network(NET, GW, POOL, [])
    assert ("add_egress", 4096, "10.41.0.0/24", "10.41.0.1") in kernel.calls
    assert [(u.vni, u.subnet) for u in nat.uplinks] == [(4096, "10.41.0.0/24")]
    assert endpoint(driver)["Gateway"] == "10.41.0.1"
    driver.program_external_connectivity(NET, EP, portmap(binding(80, 8080), binding(53, 5353, proto=17),
                                                          binding(80, 8080, host_ip="::")))
    assert nat.ports() == [("tcp", "", 8080, "10.41.0.2", 80), ("udp", "", 5353, "10.41.0.2", 53)]
    info = driver.endpoint_oper_info(NET, EP)
    assert sorted(b["HostPort"] for b in info["com.docker.network.portmap"]) == [5353, 8080]
    driver.revoke_external_connectivity(NET, EP)
    assert nat.ports() == [] and driver.state.endpoint(EP).ports == []


def test_internal_gateway_mode_has_no_way_out(world):
    driver, kernel, nat = world
    driver.create_network(NET, {**GW, "com.docker.network.internal": True}, POOL, [])
    assert "Gateway" not in endpoint(driver)
    assert not [c for c in kernel.calls if c[0] == "add_egress"]
    assert nat.uplinks == []


def test_host_port_zero_and_ranges_pick_a_free_port(world):
    driver, kernel, nat = world
    driver.create_network(NET, GW, POOL, [])
    endpoint(driver)
    first = free_port()
    with socket.socket() as holder:  # another program holds the first port of the range
        holder.bind(("0.0.0.0", first))
        holder.listen()
        driver.program_external_connectivity(NET, EP, portmap(binding(80, 0), binding(81, first, end=first + 1)))
    ports = {m.port: m.host_port for m in nat.mappings}
    assert ports[80] > 0 and ports[81] == first + 1


def test_a_taken_port_is_refused_and_changes_nothing(world):
    driver, kernel, nat = world
    driver.create_network(NET, GW, POOL, [])
    endpoint(driver)
    endpoint(driver, ep=EP2, ip="10.41.0.3")
    port = free_port()
    driver.program_external_connectivity(NET, EP, portmap(binding(80, port)))
    before = (nat.ports(), nat.applied)
    with pytest.raises(DriverError, match=rf"host port {port}/tcp .* already taken .*published by pyoverlay "
                                          rf"endpoint {EP[:12]}.*-p OTHER:80"):
        driver.program_external_connectivity(NET, EP2, portmap(binding(8, port + 1), binding(80, port)))
    assert (nat.ports(), nat.applied) == before and driver.state.endpoint(EP2).ports == []
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", port + 2))
        holder.listen()
        with pytest.raises(DriverError, match="in use by another program"):
            driver.program_external_connectivity(NET, EP2, portmap(binding(80, port + 2)))
    with pytest.raises(DriverError, match="not an address of this host"):
        driver.program_external_connectivity(NET, EP2, portmap(binding(80, port + 3, host_ip="192.0.2.77")))
    assert (nat.ports(), nat.applied) == before


def test_an_nft_failure_leaves_the_store_as_it_was(world):
    driver, kernel, nat = world
    driver.create_network(NET, GW, POOL, [])
    endpoint(driver)
    nat.refuse = True
    with pytest.raises(DriverError, match="nft refused by the test"):
        driver.program_external_connectivity(NET, EP, portmap(binding(80, free_port())))
    assert driver.state.endpoint(EP).ports == []


def test_the_table_follows_the_store(world):
    """A deleted endpoint's (or network's) rules go; a restart rewrites what the store holds."""
    driver, kernel, nat = world
    driver.create_network(NET, GW, POOL, [])
    driver.create_network(NET2, GW, POOL2, [])
    endpoint(driver)
    endpoint(driver, net=NET2, ep=EP2, ip="10.42.0.2")
    p1, p2 = free_port(), free_port() + 1
    driver.program_external_connectivity(NET, EP, portmap(binding(80, p1)))
    driver.program_external_connectivity(NET2, EP2, portmap(binding(80, p2)))
    assert [m.host_port for m in nat.mappings] == sorted([p1, p2])
    driver.leave(NET, EP)
    driver.delete_endpoint(NET, EP)  # the engine never revoked (it crashed): the rule goes anyway
    assert [m.host_port for m in nat.mappings] == [p2]
    nat.mappings = ["stale"]
    driver.restore()
    assert [m.host_port for m in nat.mappings] == [p2]
    assert ("add_egress", 4097, "10.42.0.0/24", "10.42.0.1") in kernel.calls[-3:]
    driver.delete_network(NET2)
    assert [u.vni for u in nat.uplinks] == [4096] and nat.mappings == []


def test_the_app_refuses_a_malformed_portmap(world):
    driver, kernel, nat = world
    driver.create_network(NET, GW, POOL, [])
    endpoint(driver)
    client = create_app(driver, None).test_client()
    answer = client.post("/NetworkDriver.ProgramExternalConnectivity", json={
        "NetworkID": NET, "EndpointID": EP, "Options": portmap({"Proto": 6, "Port": 80, "HostPort": 70000})})
    assert answer.status_code == 400 and "HostPort" in answer.get_json()["Err"]
    answer = client.post("/NetworkDriver.ProgramExternalConnectivity", json={
        "NetworkID": NET, "EndpointID": EP, "Options": portmap(binding(80, 8080, proto=1))})
    assert answer.status_code == 400 and "tcp or udp" in answer.get_json()["Err"]
    assert nat.mappings == []


def test_a_host_without_gateway_mode_restores_without_nft(world):
    driver, kernel, nat = world
    driver.create_network(NET, {}, POOL, [])
    nat.refuse = True
    driver.restore()  # no raise: nothing here needs the table
    nat.refuse = False
    driver.create_network(NET2, GW, POOL2, [])
    nat.refuse = True
    with pytest.raises(DriverError, match="nft refused"):
        driver.restore()  # this one does: restore is retried until it succeeds


POOL6 = [{"AddressSpace": "pyoverlay", "Pool": "fd00:41::/64", "Gateway": "fd00:41::1/64"}]
GW6 = {**GW, "com.docker.network.enable_ipv6": True}


def test_dual_stack_gateway_mode(world):
    """Join gives both gateways, the uplink carries both subnets, and each -p
    is published on both families, with one host port, to the matching address."""
    driver, kernel, nat = world
    driver.create_network(NET, GW6, POOL, POOL6)
    assert ("add_egress", 4096, "10.41.0.0/24", "10.41.0.1", "fd00:41::/64", "fd00:41::1") in kernel.calls
    assert sorted((u.vni, u.subnet) for u in nat.uplinks) == [(4096, "10.41.0.0/24"), (4096, "fd00:41::/64")]
    driver.state.claim_address("10.41.0.0/24", "10.41.0.2", Address.container(HOST))
    driver.create_endpoint(NET, EP, {"Address": "10.41.0.2/24", "AddressIPv6": "fd00:41::2/64"})
    answer = driver.join(NET, EP, "/var/run/docker/netns/x")
    assert (answer["Gateway"], answer["GatewayIPv6"]) == ("10.41.0.1", "fd00:41::1")
    # Engine 28: 0.0.0.0 and :: for each -p; engine 20.10: one binding without an address.
    driver.program_external_connectivity(NET, EP, portmap(binding(80, 8080, "0.0.0.0"), binding(80, 8080, "::"),
                                                          binding(53, 0, proto=17)))
    ports = nat.ports()
    assert ("tcp", "", 8080, "10.41.0.2", 80) in ports and ("tcp", "", 8080, "fd00:41::2", 80) in ports
    udp = [p for p in ports if p[0] == "udp"]
    assert [p[3] for p in udp] == ["10.41.0.2", "fd00:41::2"] and udp[0][2] == udp[1][2] > 0, udp
    # A host address of one family maps to the container's address of that family only.
    driver.program_external_connectivity(NET, EP, portmap(binding(80, 8081, "::1")))
    assert nat.ports() == [("tcp", "::1", 8081, "fd00:41::2", 80)]
    driver.revoke_external_connectivity(NET, EP)
    assert nat.ports() == []


def test_ipv6_only_gateway_mode(world):
    driver, kernel, nat = world
    driver.create_network(NET, {**GW6, "com.docker.network.enable_ipv4": False}, [], POOL6)
    assert ("add_egress", 4096, "fd00:41::/64", "fd00:41::1") in kernel.calls
    driver.create_endpoint(NET, EP, {"AddressIPv6": "fd00:41::2/64"})
    answer = driver.join(NET, EP, "/var/run/docker/netns/x")
    assert answer["GatewayIPv6"] == "fd00:41::1" and "Gateway" not in answer
    driver.program_external_connectivity(NET, EP, portmap(binding(80, 8080, "0.0.0.0"), binding(80, 8080, "::")))
    assert nat.ports() == [("tcp", "", 8080, "fd00:41::2", 80)]
