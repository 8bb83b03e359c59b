"""Every libnetwork call over the real Flask app, a real dataplane in a
throw-away host namespace and an in-memory store: answers, errors, and that a
refused request changes neither the store nor the kernel."""

from __future__ import annotations

import ipaddress
import json

import pytest

from tests.conftest import links, new_id
from tests.hosts import wait_for

SUBNET = "10.20.0.0/24"


def make_network(plugin, subnet=SUBNET, options=None, gateway=None):
    status, pool = plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": subnet, "Options": {}, "V6": False})
    assert status == 200, pool
    gw_req = {"PoolID": pool["PoolID"], "Address": gateway or "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}
    status, gw = plugin.call("IpamDriver.RequestAddress", gw_req)
    assert status == 200, gw
    network_id = new_id()
    status, answer = plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": network_id,
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": options or {}},
        "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": pool["Pool"], "Gateway": gw["Address"], "AuxAddresses": None}],
        "IPv6Data": [],
    })
    assert status == 200, answer
    return network_id, pool["PoolID"], gw["Address"]


def make_endpoint(plugin, network_id, pool_id, address=""):
    status, addr = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": address, "Options": None})
    assert status == 200, addr
    endpoint_id = new_id()
    status, answer = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": network_id, "EndpointID": endpoint_id,
        "Interface": {"Address": addr["Address"], "AddressIPv6": "", "MacAddress": ""}, "Options": {},
    })
    assert status == 200, answer
    return endpoint_id, addr["Address"], answer["Interface"]["MacAddress"]


def test_activate_and_capabilities(plugin):
    assert plugin.call("Plugin.Activate") == (200, {"Implements": ["NetworkDriver", "IpamDriver"]})
    assert plugin.call("NetworkDriver.GetCapabilities") == (200, {"Scope": "local", "ConnectivityScope": "global"})
    status, caps = plugin.call("IpamDriver.GetCapabilities")
    assert status == 200 and caps["RequiresMACAddress"] is False
    assert plugin.call("IpamDriver.GetDefaultAddressSpaces") == (
        200, {"LocalDefaultAddressSpace": "pyoverlay", "GlobalDefaultAddressSpace": "pyoverlay"})


def test_unknown_method_is_404(plugin):
    status, body = plugin.call("NetworkDriver.NoSuchThing", {})
    assert status == 404 and "NoSuchThing" in body["Err"]


def test_endpoint_life_cycle_leaves_nothing_behind(plugin, host_ns):
    before_kernel = host_ns.kernel_snapshot()
    network_id, pool_id, gateway = make_network(plugin, options={"com.docker.network.driver.mtu": "1400"})
    assert gateway == "10.20.0.1/24"
    assert len(host_ns.overlay_namespaces()) == 1

    endpoint_id, address, mac = make_endpoint(plugin, network_id, pool_id)
    assert address == "10.20.0.2/24"
    assert mac == "02:50:0a:14:00:02"

    status, joined = plugin.call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id, "SandboxKey": "/var/run/docker/netns/x", "Options": {}})
    assert status == 200, joined
    src = joined["InterfaceName"]["SrcName"]
    assert joined["InterfaceName"]["DstPrefix"] == "eth"
    assert "Gateway" not in joined  # the engine adds docker_gwbridge for the way out
    assert src in links(host_ns.name)
    from tests.conftest import ip
    detail = ip("-n", host_ns.name, "-j", "link", "show", src).stdout
    link = json.loads(detail)[0]
    assert link["mtu"] == 1400 and link["address"] == mac

    status, info = plugin.call("NetworkDriver.EndpointOperInfo", {"NetworkID": network_id, "EndpointID": endpoint_id})
    assert status == 200
    assert info["Value"]["vni"] >= 4096 and info["Value"]["mtu"] == 1400 and info["Value"]["host"] == host_ns.addr

    for method, body in [
        ("NetworkDriver.Leave", {"NetworkID": network_id, "EndpointID": endpoint_id}),
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": network_id, "EndpointID": endpoint_id}),
        ("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": address.split("/")[0]}),
        ("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": gateway.split("/")[0]}),
        ("NetworkDriver.DeleteNetwork", {"NetworkID": network_id}),
        ("IpamDriver.ReleasePool", {"PoolID": pool_id}),
    ]:
        assert plugin.call(method, body) == (200, {}), method
    assert host_ns.kernel_snapshot() == before_kernel
    assert plugin.store_snapshot() == {}


def test_delete_endpoint_after_leave_skips_the_kernel_and_without_it_cleans_up(plugin, host_ns, monkeypatch):
    network_id, pool_id, _ = make_network(plugin)
    joined = []
    for _ in range(2):
        endpoint_id, _, _ = make_endpoint(plugin, network_id, pool_id)
        status, answer = plugin.call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                                            "SandboxKey": "/var/run/docker/netns/x", "Options": {}})
        assert status == 200, answer
        joined.append((endpoint_id, answer["InterfaceName"]["SrcName"]))
    (left, left_if), (crashed, crashed_if) = joined
    kernel_calls = []
    for name in ("delete_endpoint", "delete_endpoint_soon"):
        real = getattr(plugin.dataplane, name)
        monkeypatch.setattr(plugin.dataplane, name, lambda *a, real=real: kernel_calls.append(a) or real(*a))

    # The usual order: Leave queues the veth's deletion; DeleteEndpoint only
    # forgets (in a burst it would otherwise wait behind every other deletion).
    assert plugin.call("NetworkDriver.Leave", {"NetworkID": network_id, "EndpointID": left}) == (200, {})
    assert plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": network_id, "EndpointID": left}) == (200, {})
    wait_for(lambda: left_if not in links(host_ns.name), 5, f"the deletion of {left_if} after Leave")
    assert len(kernel_calls) == 1
    # An engine that crashed between Join and Leave sends DeleteEndpoint alone:
    # the veth must go all the same.
    assert plugin.call("NetworkDriver.DeleteEndpoint", {"NetworkID": network_id, "EndpointID": crashed}) == (200, {})
    assert crashed_if not in links(host_ns.name) and len(kernel_calls) == 2
    assert not any(k.startswith("endpoints/") for k in plugin.store_snapshot())


def test_unknown_ids_succeed(plugin):
    """The engine cleans up after a crash with IDs the plugin may not know."""
    nid, eid = new_id(), new_id()
    for method, body in [
        ("NetworkDriver.Leave", {"NetworkID": nid, "EndpointID": eid}),
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid}),
        ("NetworkDriver.DeleteNetwork", {"NetworkID": nid}),
        ("IpamDriver.ReleaseAddress", {"PoolID": "10.99.99.0/24", "Address": "10.99.99.7"}),
        ("IpamDriver.ReleasePool", {"PoolID": "10.99.99.0/24"}),
        ("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": nid, "EndpointID": eid}),
        # Empty IDs in clean-up calls: nothing to undo, not an error.
        ("NetworkDriver.Leave", {"NetworkID": "", "EndpointID": ""}),
        ("NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": ""}),
        ("NetworkDriver.DeleteNetwork", {"NetworkID": ""}),
        ("IpamDriver.ReleasePool", {"PoolID": ""}),
        ("IpamDriver.ReleaseAddress", {"PoolID": "", "Address": "10.99.99.7"}),
    ]:
        assert plugin.call(method, body) == (200, {}), method
    assert plugin.store_snapshot() == {}


def _create_network_body(**over):
    body = {
        "NetworkID": new_id(),
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": SUBNET, "Gateway": "10.20.0.1/24"}],
        "IPv6Data": [],
    }
    body.update(over)
    return body


def _generic(**options):
    return {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": options}


BAD_DRIVER_CALLS = [
    ("malformed JSON", "NetworkDriver.CreateNetwork", b"{not json", "not valid JSON"),
    ("not an object", "NetworkDriver.CreateNetwork", b"[1, 2]", "JSON object"),
    ("missing NetworkID", "NetworkDriver.CreateNetwork", {"Options": {}}, "NetworkID"),
    ("wrong type", "NetworkDriver.CreateNetwork", {"NetworkID": 7}, "NetworkID"),
    ("bad id", "NetworkDriver.DeleteNetwork", {"NetworkID": "../../etc"}, "NetworkID"),
    ("bad CIDR", "NetworkDriver.CreateNetwork",
     _create_network_body(IPv4Data=[{"AddressSpace": "pyoverlay", "Pool": "10.20.0.0/33"}]), "CIDR"),
    ("unknown option", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(color="red")), "-o color"),
    ("VNI out of range", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(vni="16777216")), "1 to 16777215"),
    ("VNI not a number", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(vni="ten")), "whole number"),
    ("MTU too large", "NetworkDriver.CreateNetwork",
     _create_network_body(Options=_generic(**{"com.docker.network.driver.mtu": "9000"})), "1450"),
    ("MTU too small", "NetworkDriver.CreateNetwork",
     _create_network_body(Options=_generic(**{"com.docker.network.driver.mtu": "100"})), "576"),
    ("block size too large", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(block_size="20")),
     "prefix length from 24"),
    ("block size not a number", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(block_size="/26")),
     "-o block_size=/26 is not valid"),
    ("multicast neither true nor false", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(multicast="on")),
     "-o multicast=on is not valid: use -o multicast=true"),
    ("IPv6", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv6": True}), "IPv6"),
    ("default IPAM", "NetworkDriver.CreateNetwork",
     _create_network_body(IPv4Data=[{"AddressSpace": "LocalDefault", "Pool": SUBNET}]), "--ipam-driver pyoverlay"),
    ("two subnets", "NetworkDriver.CreateNetwork",
     _create_network_body(IPv4Data=[{"AddressSpace": "pyoverlay", "Pool": SUBNET}, {"AddressSpace": "pyoverlay", "Pool": "10.21.0.0/24"}]), "exactly one"),
    ("endpoint on unknown network", "NetworkDriver.CreateEndpoint",
     {"NetworkID": new_id(), "EndpointID": new_id(), "Interface": {"Address": "10.20.0.5/24"}}, "not known"),
    ("join unknown endpoint", "NetworkDriver.Join", {"NetworkID": new_id(), "EndpointID": new_id(), "SandboxKey": "/x"}, "not known"),
    ("NetworkID not hex", "NetworkDriver.DeleteNetwork", {"NetworkID": "999.1.1.1"}, "64 lowercase hexadecimal"),
    ("EndpointID -1", "NetworkDriver.Leave", {"NetworkID": new_id(), "EndpointID": "-1"}, "64 lowercase hexadecimal"),
    ("MAC", "NetworkDriver.CreateEndpoint",
     {"NetworkID": new_id(), "EndpointID": new_id(), "Interface": {"Address": "10.30.0.9/24", "MacAddress": "02:42:zz:00:00:01"}},
     "MAC address"),
    ("endpoint address", "NetworkDriver.CreateEndpoint",
     {"NetworkID": new_id(), "EndpointID": new_id(), "Interface": {"Address": "10.30.0.999/24"}}, "CIDR form"),
    ("gateway", "NetworkDriver.CreateNetwork",
     _create_network_body(IPv4Data=[{"AddressSpace": "pyoverlay", "Pool": SUBNET, "Gateway": "10.20.0.1"}]), "CIDR form"),
    ("aux address", "NetworkDriver.CreateNetwork",
     _create_network_body(IPv4Data=[{"AddressSpace": "pyoverlay", "Pool": SUBNET, "AuxAddresses": {"a": 5}}]), "AuxAddresses"),
    ("-o value not a string", "NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(vni=5000)), "vni"),
    ("enable_ipv6 not a flag", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv6": "yes"}), "enable_ipv6"),
    ("SandboxKey relative", "NetworkDriver.Join", {"NetworkID": new_id(), "EndpointID": new_id(), "SandboxKey": "x/y"},
     "absolute path"),
    ("ifname too long", "NetworkDriver.Join",
     {"NetworkID": new_id(), "EndpointID": new_id(), "Options": {"com.docker.network.endpoint.ifname": "e" * 16}}, "ifname"),
]

# Docker 28+: --ipv4=false sends enable_ipv4=false and requests no IPv4 pool;
# -o com.docker.network.enable_ipv4=false arrives as a generic option.
BAD_DRIVER_CALLS += [
    ("IPv4 off", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv4": False, "com.docker.network.generic": {}},
                          IPv4Data=[]), "needs IPv6: add --ipv6"),
    ("IPv4 off as -o", "NetworkDriver.CreateNetwork",
     _create_network_body(Options=_generic(**{"com.docker.network.enable_ipv4": "false"})), "needs IPv6: add --ipv6"),
    ("IPv4 off as -o with IPv4 given", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv6": True,
                                   "com.docker.network.generic": {"com.docker.network.enable_ipv4": "false"}},
                          IPv6Data=[{"AddressSpace": "pyoverlay", "Pool": "fd00:20::/64"}]),
     "Docker 28's --ipv4=false"),
    ("IPv6 without its subnet", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv6": True}), "exactly one IPv6 subnet"),
    ("IPv6 pool not held", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv6": True},
                          IPv6Data=[{"AddressSpace": "LocalDefault", "Pool": "fd00:20::/64"}]), "--ipam-driver pyoverlay"),
    ("IPv6 data not IPv6", "NetworkDriver.CreateNetwork",
     _create_network_body(Options={"com.docker.network.enable_ipv6": True},
                          IPv6Data=[{"AddressSpace": "pyoverlay", "Pool": SUBNET}]), "IPv6 address or network"),
    ("IPv6 address malformed", "NetworkDriver.CreateEndpoint",
     {"NetworkID": new_id(), "EndpointID": new_id(), "Interface": {"Address": "10.30.0.9/24", "AddressIPv6": "fd00::g/64"}},
     "IPv6 address or network"),
]

BAD_IPAM_CALLS = [
    ("malformed JSON", "IpamDriver.RequestPool", b"{", "not valid JSON"),
    ("missing AddressSpace", "IpamDriver.RequestPool", {"Pool": SUBNET}, "AddressSpace"),
    ("bad CIDR", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "10.20.0.1/24"}, "CIDR"),
    ("not a CIDR", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "banana"}, "CIDR"),
    ("IPv6 without a subnet", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "", "V6": True},
     "pass an IPv6 --subnet"),
    ("IPv6 link-local", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "fe80::/64", "V6": True},
     "not a unicast range"),
    ("IPv6 too small", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "fd00:20::/126", "V6": True},
     "too small: use a /124"),
    ("IPv6 pool not canonical", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "fd00:20::1/64", "V6": True},
     "not a valid IPv6 network"),
    ("IPv6 pool asked as IPv4", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "fd00:20::/64", "V6": False},
     "engine asked for IPv4"),
    ("IPv4 pool asked as IPv6", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": SUBNET, "V6": True},
     "engine asked for IPv6"),
    ("IPv6 address of an IPv4 pool", "IpamDriver.RequestAddress", {"PoolID": "10.30.0.0/24", "Address": "fd00:20::5"},
     "IPv6 address where an IPv4 one is needed"),
    ("ip-range", "IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": SUBNET, "SubPool": "10.20.0.0/25"}, "--ip-range"),
    ("foreign space", "IpamDriver.RequestPool", {"AddressSpace": "LocalDefault", "Pool": SUBNET}, "address space"),
    ("wrong type", "IpamDriver.RequestAddress", {"PoolID": 5}, "PoolID"),
    ("unknown pool", "IpamDriver.RequestAddress", {"PoolID": "10.55.0.0/24", "Address": ""}, "not held"),
    ("PoolID not ours", "IpamDriver.RequestAddress", {"PoolID": "LocalDefault/10.30.0.0/24", "Address": ""}, "pool ID that pyoverlay"),
    ("PoolID newline", "IpamDriver.ReleasePool", {"PoolID": "10.30.0.0/24\n"}, "pool ID that pyoverlay"),
    ("address not IPv4", "IpamDriver.RequestAddress", {"PoolID": "10.30.0.0/24", "Address": "10.30.0.300"}, "IP address such as"),
    ("release address", "IpamDriver.ReleaseAddress", {"PoolID": "10.30.0.0/24", "Address": ""}, "IP address such as"),
    ("IPAM option not a string", "IpamDriver.RequestAddress",
     {"PoolID": "10.30.0.0/24", "Options": {"RequestAddressType": 1}}, "RequestAddressType"),
]

# IDs the engine never sends: each refused where the same call with a good ID works.
MALFORMED_IDS = ["999.1.1.1", "-1", "", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "0" * 64 + "\n", " " + "0" * 63,
                 "../" + "0" * 61, "0x" + "0" * 62, "０" * 64]


@pytest.mark.parametrize("what,method,body,says", BAD_DRIVER_CALLS + BAD_IPAM_CALLS, ids=[c[0] + " " + c[1] for c in BAD_DRIVER_CALLS + BAD_IPAM_CALLS])
def test_bad_input_is_refused_and_changes_nothing(plugin, host_ns, what, method, body, says):
    # Something already in place, so "changes nothing" has something to lose.
    make_network(plugin, subnet="10.30.0.0/24")
    store_before, kernel_before = plugin.store_snapshot(), host_ns.kernel_snapshot()
    if isinstance(body, bytes):
        status, answer = plugin.call(method, raw=body)
    else:
        status, answer = plugin.call(method, body)
    ipam = method.startswith("IpamDriver.")
    key = "Error" if ipam else "Err"
    assert status == 200 if ipam else status >= 400  # see plugin/app.py: _refuse
    assert set(answer) == {key}, answer
    assert says in answer[key], answer[key]
    assert plugin.store_snapshot() == store_before
    assert host_ns.kernel_snapshot() == kernel_before


def test_address_requests(plugin):
    network_id, pool_id, _ = make_network(plugin)
    _, first, _ = make_endpoint(plugin, network_id, pool_id)
    _, chosen, _ = make_endpoint(plugin, network_id, pool_id, address="10.20.0.77")
    assert (first, chosen) == ("10.20.0.2/24", "10.20.0.77/24")
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "10.20.0.77"})
    assert status == 200 and "already in use" in answer["Error"] and "--ip" in answer["Error"]
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "10.20.0.1"})
    assert status == 200 and "gateway" in answer["Error"]
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "10.21.0.5"})
    assert status == 200 and "not a usable address" in answer["Error"]


def test_vni_conflicts(plugin):
    make_network(plugin, options={"vni": "5000"})
    store_before = plugin.store_snapshot()
    status, pool = plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": "10.40.0.0/24"})
    assert status == 200
    body = _create_network_body(
        Options=_generic(vni="5000"),
        IPv4Data=[{"AddressSpace": "pyoverlay", "Pool": "10.40.0.0/24", "Gateway": "10.40.0.1/24"}],
    )
    status, answer = plugin.call("NetworkDriver.CreateNetwork", body)
    assert status == 400 and "VNI 5000 is already used" in answer["Err"]
    plugin.call("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    assert plugin.store_snapshot() == store_before


def test_kernel_failure_leaves_store_unchanged(plugin, host_ns):
    """A VXLAN device that already holds VNI 6000 on port 4789 makes the kernel
    refuse the overlay: the call fails and no record or interface remains."""
    from tests.conftest import ip
    ip("-n", host_ns.name, "link", "add", "squatter", "type", "vxlan", "id", "6000", "dstport", "4789", "local", host_ns.addr)
    status, pool = plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": SUBNET})
    store_before, kernel_before = plugin.store_snapshot(), host_ns.kernel_snapshot()
    status, answer = plugin.call("NetworkDriver.CreateNetwork", _create_network_body(Options=_generic(vni="6000")))
    assert status >= 400 and "Err" in answer
    assert plugin.store_snapshot() == store_before
    assert host_ns.kernel_snapshot() == kernel_before


@pytest.mark.parametrize("options", [
    {"com.docker.network.enable_ipv4": True, "com.docker.network.generic": {}},
    _generic(**{"com.docker.network.enable_ipv4": "true"}),
], ids=["engine", "-o"])
def test_enable_ipv4_true_is_accepted(plugin, options):
    status, answer = plugin.call("NetworkDriver.CreateNetwork", _create_network_body(Options=options))
    assert (status, answer) == (200, {})


def _refused_and_nothing_changed(plugin, host_ns, method, body):
    store_before, kernel_before = plugin.store_snapshot(), host_ns.kernel_snapshot()
    status, answer = plugin.call(method, body)
    key = "Error" if method.startswith("IpamDriver.") else "Err"
    assert set(answer) == {key} and "ID" in answer[key], (body, answer)
    assert plugin.store_snapshot() == store_before, f"refused {method} with {body} changed the store"
    assert host_ns.kernel_snapshot() == kernel_before


@pytest.mark.parametrize("bad", MALFORMED_IDS, ids=repr)
def test_malformed_ids_are_refused_where_good_ones_work(plugin, host_ns, bad):
    status, pool = plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": SUBNET})
    assert status == 200, pool
    network = _create_network_body(NetworkID=bad)
    _refused_and_nothing_changed(plugin, host_ns, "NetworkDriver.CreateNetwork", network)
    network["NetworkID"] = new_id()
    assert plugin.call("NetworkDriver.CreateNetwork", network) == (200, {})

    status, addr = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": ""})
    assert status == 200, addr
    endpoint = {"NetworkID": network["NetworkID"], "EndpointID": bad, "Interface": {"Address": addr["Address"]}}
    _refused_and_nothing_changed(plugin, host_ns, "NetworkDriver.CreateEndpoint", endpoint)
    _refused_and_nothing_changed(plugin, host_ns, "NetworkDriver.CreateEndpoint",
                                 {**endpoint, "NetworkID": bad, "EndpointID": new_id()})
    endpoint["EndpointID"] = new_id()
    status, answer = plugin.call("NetworkDriver.CreateEndpoint", endpoint)
    assert status == 200, answer

    join = {"NetworkID": network["NetworkID"], "EndpointID": endpoint["EndpointID"], "SandboxKey": "/var/run/docker/netns/x"}
    for method in ("NetworkDriver.Join", "NetworkDriver.EndpointOperInfo", "NetworkDriver.ProgramExternalConnectivity"):
        _refused_and_nothing_changed(plugin, host_ns, method, {**join, "EndpointID": bad})
        _refused_and_nothing_changed(plugin, host_ns, method, {**join, "NetworkID": bad})
    if bad:  # an empty ID in a clean-up call is "nothing to do" (test_unknown_ids_succeed)
        for method in ("NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint", "NetworkDriver.RevokeExternalConnectivity"):
            _refused_and_nothing_changed(plugin, host_ns, method, {**join, "EndpointID": bad})
        _refused_and_nothing_changed(plugin, host_ns, "NetworkDriver.DeleteNetwork", {"NetworkID": bad})
    status, answer = plugin.call("NetworkDriver.Join", join)
    assert status == 200, answer


def test_what_newer_engines_send_is_accepted(plugin, host_ns):
    """Option keys added by engines 28 and 29 (docs: engines.md) pass the schemas."""
    status, pool = plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": SUBNET, "Options": None,
                                                         "V6": False})
    assert status == 200, pool
    network = _create_network_body(Options={"com.docker.network.enable_ipv4": True, "com.docker.network.enable_ipv6": False,
                                            "com.docker.network.generic": {}})
    assert plugin.call("NetworkDriver.CreateNetwork", network) == (200, {})
    status, addr = plugin.call("IpamDriver.RequestAddress", {
        "PoolID": pool["PoolID"], "Address": "", "Options": {"com.docker.network.endpoint.name": "web-1"}})
    assert status == 200 and "Error" not in addr, addr
    endpoint_id = new_id()
    options = {"com.docker.network.endpoint.ifname": "eth7", "com.docker.network.endpoint.sysctls": "net.ipv4.conf.IFNAME.forwarding=1",
               "com.docker.network.portmap": [], "com.docker.network.endpoint.exposedports": []}
    status, answer = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": network["NetworkID"], "EndpointID": endpoint_id, "Options": options,
        "Interface": {"Address": addr["Address"], "AddressIPv6": "", "MacAddress": "02:42:AC:11:00:09"}})
    assert status == 200, answer
    status, answer = plugin.call("NetworkDriver.Join", {"NetworkID": network["NetworkID"], "EndpointID": endpoint_id,
                                                        "SandboxKey": "/var/run/docker/netns/abc", "Options": options})
    assert status == 200, answer


# -- IPv6 ---------------------------------------------------------------------

SUBNET6 = "fd00:20::/64"


def _pool(plugin, subnet, v6):
    status, pool = plugin.call("IpamDriver.RequestPool", {"AddressSpace": "pyoverlay", "Pool": subnet, "V6": v6})
    assert status == 200 and "Error" not in pool, pool
    status, gw = plugin.call("IpamDriver.RequestAddress", {
        "PoolID": pool["PoolID"], "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert status == 200 and "Error" not in gw, gw
    return {"AddressSpace": "pyoverlay", "Pool": pool["Pool"], "Gateway": gw["Address"]}


def _address(plugin, pool_id, address=""):
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": address, "Options": None})
    assert status == 200 and "Error" not in answer, answer
    return answer["Address"]


def test_a_dual_stack_endpoint_through_the_real_app(plugin, host_ns):
    v4, v6 = _pool(plugin, SUBNET, False), _pool(plugin, SUBNET6, True)
    assert v6["Gateway"] == "fd00:20::1/64"
    network_id = new_id()
    assert plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": network_id, "Options": {"com.docker.network.enable_ipv6": True},
        "IPv4Data": [v4], "IPv6Data": [v6]}) == (200, {})
    address, address6 = _address(plugin, SUBNET), _address(plugin, SUBNET6)
    assert address6.startswith("fd00:20::") and address6.endswith("/64")
    endpoint_id = new_id()
    status, answer = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": network_id, "EndpointID": endpoint_id,
        "Interface": {"Address": address, "AddressIPv6": address6, "MacAddress": ""}})
    assert status == 200, answer
    # The MAC still comes from the IPv4 address when there is one.
    octets = [int(o) for o in address.split("/")[0].split(".")]
    assert answer["Interface"]["MacAddress"] == "02:50:" + ":".join(f"{o:02x}" for o in octets)
    status, info = plugin.call("NetworkDriver.EndpointOperInfo", {"NetworkID": network_id, "EndpointID": endpoint_id})
    assert status == 200 and (info["Value"]["address"], info["Value"]["address6"]) == (address, address6), info
    peers = [json.loads(v) for k, v in plugin.store_snapshot().items() if k.startswith("peers/")]
    assert peers == [{"ip": address.split("/")[0], "ip6": address6.split("/")[0],
                      "mac": answer["Interface"]["MacAddress"], "vtep": peers[0]["vtep"]}]
    status, joined = plugin.call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                                        "SandboxKey": "/var/run/docker/netns/x"})
    assert status == 200 and "GatewayIPv6" not in joined, joined  # no IPv6 way out: docker_gwbridge stays

    # --ip6 on this network: taken refused, outside refused, nothing changed.
    before = plugin.store_snapshot()
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": SUBNET6, "Address": address6.split("/")[0]})
    assert "already in use" in answer["Error"]
    status, answer = plugin.call("IpamDriver.RequestAddress", {"PoolID": SUBNET6, "Address": "fd00:21::5"})
    assert "not a usable address of fd00:20::/64" in answer["Error"]
    assert plugin.store_snapshot() == before

    for call in ("Leave", "DeleteEndpoint"):
        assert plugin.call(f"NetworkDriver.{call}", {"NetworkID": network_id, "EndpointID": endpoint_id})[0] == 200
    for pool, cidr in ((SUBNET, address), (SUBNET6, address6)):
        plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": cidr.split("/")[0]})
    assert plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": network_id}) == (200, {})
    for pool in (SUBNET, SUBNET6):
        plugin.call("IpamDriver.ReleasePool", {"PoolID": pool})
    assert [k for k in plugin.store_snapshot() if not k.startswith(("hosts/", "seen/"))] == []


def test_an_ipv6_only_endpoint_and_what_it_refuses(plugin, host_ns):
    v6 = _pool(plugin, SUBNET6, True)
    network_id = new_id()
    assert plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": network_id, "Options": {"com.docker.network.enable_ipv6": True,
                                             "com.docker.network.enable_ipv4": False},
        "IPv4Data": [], "IPv6Data": [v6]}) == (200, {})
    address6 = _address(plugin, SUBNET6)
    before, kernel = plugin.store_snapshot(), host_ns.kernel_snapshot()
    for interface, says in [({"Address": "10.20.0.5/24", "AddressIPv6": address6}, "has no IPv4"),
                            ({"AddressIPv6": ""}, "has no IPv6 address"),
                            ({"AddressIPv6": "fd00:99::5/64"}, "outside the network's subnet")]:
        status, answer = plugin.call("NetworkDriver.CreateEndpoint", {
            "NetworkID": network_id, "EndpointID": new_id(), "Interface": interface})
        assert status >= 400 and says in answer["Err"], answer
    assert plugin.store_snapshot() == before and host_ns.kernel_snapshot() == kernel
    status, answer = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": network_id, "EndpointID": new_id(), "Interface": {"Address": "", "AddressIPv6": address6}})
    assert status == 200, answer
    tail = ipaddress.ip_address(address6.split("/")[0]).packed[-5:]
    assert answer["Interface"]["MacAddress"] == "06:" + ":".join(f"{b:02x}" for b in tail)
