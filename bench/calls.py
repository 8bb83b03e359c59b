"""The libnetwork calls the engine makes, as bodies shaped like the engine's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from bench.env import PluginClient, new_id

ADDRESS_SPACE = "pyoverlay"
GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


@dataclass
class Net:
    network_id: str
    pool_id: str
    pool: str
    gateway: str
    vni: Optional[int]


@dataclass
class Ep:
    endpoint_id: str
    network_id: str
    pool_id: str
    address: str  # ip/prefix, as IPAM returned it
    mac: str
    timings: dict = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


def create_network(client: PluginClient, subnet: str, vni: Optional[int] = None,
                   mtu: Optional[int] = None, internal: bool = False) -> Net:
    pool, _ = client.call("IpamDriver.RequestPool",
                          {"AddressSpace": ADDRESS_SPACE, "Pool": subnet, "SubPool": "", "Options": {}, "V6": False})
    gw, _ = client.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": GATEWAY})
    generic = {}
    if vni is not None:
        generic["vni"] = str(vni)
    if mtu is not None:
        generic["com.docker.network.driver.mtu"] = str(mtu)
    options = {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": generic}
    if internal:
        options["com.docker.network.internal"] = True
    network_id = new_id()
    client.call("NetworkDriver.CreateNetwork", {
        "NetworkID": network_id, "Options": options,
        "IPv4Data": [{"AddressSpace": ADDRESS_SPACE, "Pool": pool["Pool"], "Gateway": gw["Address"],
                      "AuxAddresses": {}}],
        "IPv6Data": [],
    })
    return Net(network_id, pool["PoolID"], pool["Pool"], gw["Address"], vni)


def delete_network(client: PluginClient, net: Net) -> None:
    client.call("NetworkDriver.DeleteNetwork", {"NetworkID": net.network_id})
    client.call("IpamDriver.ReleaseAddress", {"PoolID": net.pool_id, "Address": net.gateway.split("/")[0]})
    client.call("IpamDriver.ReleasePool", {"PoolID": net.pool_id})


def request_address(client: PluginClient, net: Net) -> tuple[str, float]:
    answer, took = client.call("IpamDriver.RequestAddress", {"PoolID": net.pool_id, "Address": "", "Options": None})
    if "Address" not in answer:
        raise RuntimeError(f"RequestAddress on {net.pool_id}: {answer}")
    return answer["Address"], took


def create_endpoint(client: PluginClient, net: Net, address: str) -> tuple[Ep, float]:
    endpoint_id = new_id()
    answer, took = client.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": net.network_id, "EndpointID": endpoint_id,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""}, "Options": {},
    })
    mac = answer["Interface"]["MacAddress"].lower()
    return Ep(endpoint_id, net.network_id, net.pool_id, address, mac), took


def new_endpoint(client: PluginClient, net: Net) -> Ep:
    """RequestAddress + CreateEndpoint, as the engine does before a container starts."""
    address, t_addr = request_address(client, net)
    ep, t_create = create_endpoint(client, net, address)
    ep.timings.update(RequestAddress=t_addr, CreateEndpoint=t_create)
    return ep


def join(client: PluginClient, ep: Ep) -> float:
    _, took = client.call("NetworkDriver.Join", {
        "NetworkID": ep.network_id, "EndpointID": ep.endpoint_id,
        "SandboxKey": f"/var/run/docker/netns/{ep.endpoint_id[:12]}", "Options": {},
    })
    return took


def leave(client: PluginClient, ep: Ep) -> float:
    _, took = client.call("NetworkDriver.Leave", {"NetworkID": ep.network_id, "EndpointID": ep.endpoint_id})
    return took


def delete_endpoint(client: PluginClient, ep: Ep) -> float:
    _, took = client.call("NetworkDriver.DeleteEndpoint", {"NetworkID": ep.network_id, "EndpointID": ep.endpoint_id})
    return took


def release_address(client: PluginClient, ep: Ep) -> float:
    _, took = client.call("IpamDriver.ReleaseAddress", {"PoolID": ep.pool_id, "Address": ep.ip})
    return took


def remove_endpoint(client: PluginClient, ep: Ep) -> None:
    delete_endpoint(client, ep)
    release_address(client, ep)
