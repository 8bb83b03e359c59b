"""The network rules (driver/rules.py): plain values in, a refusal or a
default out; and the same refusal, word for word, from the driver (what
`docker network create` shows) and from `pyoverlay network create`."""

from __future__ import annotations

import ipaddress

import pytest

from driver import rules
from driver.errors import DriverError
from driver.model import Address, Overlay, Pool, SubnetClaim
from driver.state import address_key, overlay_key, pool_key, subnet_index_key
from ops.commands import CommandError, network_create
from tests.conftest import new_id

NET = ipaddress.ip_network("10.20.0.0/24")
OTHER_HOST = "10.97.251.9"


def test_options_are_whole_numbers_in_range():
    assert rules.vni_option({}) is None
    assert rules.vni_option({"vni": "5000"}) == 5000
    assert rules.mtu_option({"com.docker.network.driver.mtu": 1400}, max_mtu=1450) == 1400
    for bad in ("0", "16777216", "ten", "5.0", ""):
        with pytest.raises(DriverError, match=f"-o vni={bad} is not valid: the VXLAN network identifier must be "
                                              "a whole number from 1 to 16777215"):
            rules.vni_option({"vni": bad})
    with pytest.raises(DriverError, match="mtu=575 is not valid: the MTU .* from 576 to 65485"):
        rules.mtu_option({"com.docker.network.driver.mtu": "575"})
    # Beyond this host's underlay: said with the figure, only where a host is at hand.
    assert rules.mtu_option({"com.docker.network.driver.mtu": "9000"}) == 9000
    with pytest.raises(DriverError, match="this host's underlay carries at most 1450 inside VXLAN; "
                                          "use -o com.docker.network.driver.mtu=1450 or less"):
        rules.mtu_option({"com.docker.network.driver.mtu": "9000"}, max_mtu=1450)


def test_multicast_is_true_or_false():
    assert rules.multicast_option({}) is None
    assert rules.multicast_option({"multicast": "true"}) is True
    assert rules.multicast_option({"multicast": False}) is False
    for bad in ("1", "yes", "True", "on", ""):
        with pytest.raises(DriverError, match=f"-o multicast={bad} is not valid: use -o multicast=true to flood "
                                              "broadcast and multicast to every host of the network, or "
                                              r"-o multicast=false \(the default\)"):
            rules.multicast_option({"multicast": bad})
    rules.check_overlay_multicast(5000, None, True)  # left out: the overlay's own
    rules.check_overlay_multicast(5000, True, True)
    with pytest.raises(DriverError, match=r"VNI 5000 does not flood .* \(-o multicast=false\); use "
                                          "-o multicast=false or leave the option out"):
        rules.check_overlay_multicast(5000, True, False)


def test_conflicts():
    rules.check_overlap(NET, ["10.20.0.0/24", "10.30.0.0/16"])  # the same subnet is the same overlay
    with pytest.raises(DriverError, match="subnet 10.20.0.0/24 overlaps 10.20.0.0/16"):
        rules.check_overlap(NET, ["10.20.0.0/16"])
    rules.check_subnet_vni("10.20.0.0/24", None, 4096)  # no VNI asked: the claimed one is taken
    rules.check_subnet_vni("10.20.0.0/24", 4096, 4096)
    with pytest.raises(DriverError, match="use -o vni=4096 or another --subnet"):
        rules.check_subnet_vni("10.20.0.0/24", 5000, 4096)
    rules.check_vni_subnet(5000, "10.20.0.0/24", None)
    with pytest.raises(DriverError, match="VNI 5000 is already used by the pyoverlay network on 10.30.0.0/24"):
        rules.check_vni_subnet(5000, "10.20.0.0/24", "10.30.0.0/24")
    rules.check_overlay_mtu(5000, None, 1450)
    with pytest.raises(DriverError, match="uses MTU 1450 on other hosts"):
        rules.check_overlay_mtu(5000, 1400, 1450)
    with pytest.raises(DriverError, match="recreate the network everywhere with -o com.docker.network.driver.mtu=1400"):
        rules.check_underlay_carries(5000, 1450, 1400)
    rules.check_gateway(NET, ipaddress.ip_address("10.20.0.1"), "10.20.0.1")
    with pytest.raises(DriverError, match="already has gateway 10.20.0.1 on other hosts"):
        rules.check_gateway(NET, ipaddress.ip_address("10.20.0.2"), "10.20.0.1")


def test_addresses_and_defaults():
    assert rules.usable_address(NET, "10.20.0.7/24") == ipaddress.ip_address("10.20.0.7")
    for bad in ("10.20.0.0", "10.20.0.255", "10.21.0.1"):
        with pytest.raises(DriverError, match=f"address {bad} is not a usable address of 10.20.0.0/24"):
            rules.usable_address(NET, bad)
    assert rules.default_gateway(NET) == ipaddress.ip_address("10.20.0.1")
    assert rules.free_vni([]) == rules.VNI_AUTO_START == 4096
    assert rules.free_vni([4096, 4097, 4099, 7]) == 4098
    with pytest.raises(DriverError, match="every VNI from 4096 to 16777215 is in use"):
        rules.free_vni(range(rules.VNI_AUTO_START, rules.VNI_MAX + 1))


# -- one refusal, two doors ----------------------------------------------------------

def _docker_create(plugin, subnet: str, options: dict):
    """What the engine sends for `docker network create -d pyoverlay --ipam-driver pyoverlay
    --subnet SUBNET -o K=V...`; returns (status, answer) of CreateNetwork."""
    status, pool = plugin.call("IpamDriver.RequestPool",
                               {"AddressSpace": "pyoverlay", "Pool": subnet, "Options": {}, "V6": False})
    assert status == 200, pool
    status, gateway = plugin.call("IpamDriver.RequestAddress", {
        "PoolID": pool["PoolID"], "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert status == 200, gateway
    return plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": new_id(),
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": options},
        "IPv4Data": [{"AddressSpace": "pyoverlay", "Pool": pool["Pool"], "Gateway": gateway["Address"],
                      "AuxAddresses": None}],
        "IPv6Data": [],
    })


def _cli_create(plugin, name: str, subnet: str, options: dict) -> str:
    with pytest.raises(CommandError) as refused:
        network_create(plugin.store, name, subnet, options=options)
    assert plugin.store.list("catalog/")[0] == []  # refused: nothing written
    return str(refused.value)


@pytest.mark.parametrize("case, subnet, options", [
    ("the subnet belongs to another VNI", "10.20.0.0/24", {"vni": "5001"}),
    ("the VNI carries another subnet", "10.30.0.0/24", {"vni": "5000"}),
    ("an MTU below the smallest", "10.40.0.0/24", {"com.docker.network.driver.mtu": "100"}),
    ("an MTU that is not a number", "10.40.0.0/24", {"com.docker.network.driver.mtu": "big"}),
    ("multicast neither true nor false", "10.40.0.0/24", {"multicast": "1"}),
    ("multicast where the overlay does not flood", "10.20.0.0/24", {"multicast": "true"}),
])
def test_a_refusal_reads_the_same_from_docker_and_from_pyoverlay(plugin, case, subnet, options):
    # Another host made the overlay 10.20.0.0/24 with -o vni=5000 (the records its driver and IPAM write).
    for key, record in ((subnet_index_key("10.20.0.0/24"), SubnetClaim(5000)),
                        (overlay_key(5000), Overlay(5000, "10.20.0.0/24", 1400, {OTHER_HOST: "a" * 64})),
                        (pool_key("10.20.0.0/24"), Pool("10.20.0.0/24", [OTHER_HOST], gateway="10.20.0.1")),
                        (address_key("10.20.0.0/24", "10.20.0.1"), Address(kind="gateway", host=OTHER_HOST))):
        plugin.store.put(key, record.to_json())
    before = plugin.store_snapshot()

    status, answer = _docker_create(plugin, subnet, options)
    assert status == 400 and "Err" in answer, (case, answer)
    from_cli = _cli_create(plugin, "other", subnet, options)
    print(f"{case}: {from_cli}")
    assert answer["Err"] == from_cli, case
    # The docker path's pool and gateway are the engine's to release; the networks and overlays are unchanged.
    after = plugin.store_snapshot()
    assert {k: v for k, v in after.items() if k.startswith(("networks/", "overlays/", "subnets/"))} == \
        {k: v for k, v in before.items() if k.startswith(("networks/", "overlays/", "subnets/"))}
