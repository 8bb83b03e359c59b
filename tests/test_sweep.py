"""The endpoint sweep's rule (driver/sweep.py), on a real in-memory store with
the engine's two listings given: what goes, what stays, and when. The real path
(an engine that forgot an endpoint while the plugin was down) is
tests/e2e/test_faults.py::test_endpoint_forgotten_while_plugin_down_is_swept."""

from __future__ import annotations

from driver.model import Address, Endpoint, Pool
from driver.state import State, address_key, endpoint_key, pool_key
from driver.store.memory import MemoryStore
from driver.sweep import EndpointSweep

NET, OTHER_NET = "a" * 64, "b" * 64
SUBNET = "10.5.0.0/24"


class FakeEngine:
    def __init__(self):
        self.endpoints: set[str] = set()
        self.networks = {NET}
        self.network_listings = 0

    def container_endpoints(self):
        return set(self.endpoints)

    def network_summaries(self):
        self.network_listings += 1
        return [(n, "name", "pyoverlay", (SUBNET,)) for n in self.networks]


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def setup(host="h1"):
    state = State(MemoryStore())
    assert state.create({pool_key(SUBNET): Pool(subnet=SUBNET, hosts=["h1", "h2"], gateway="10.5.0.1")})
    assert state.create({address_key(SUBNET, "10.5.0.1"): Address(kind="gateway", host="h2")})
    engine, clock, calls = FakeEngine(), Clock(), []

    def delete_endpoint(network_id, endpoint_id):
        calls.append(("DeleteEndpoint", endpoint_id))
        state.delete([endpoint_key(endpoint_id)])

    def release_address(pool_id, address):
        calls.append(("ReleaseAddress", address))
        state.delete([address_key(pool_id, address)])

    def release_unused(subnet, ip, revision):
        calls.append(("release unused", ip))
        return state.release_address_if_unchanged(subnet, ip, revision)

    sweep = EndpointSweep(state, engine, host, delete_endpoint, release_address, release_unused, grace=60,
                          clock=clock)
    return state, engine, clock, calls, sweep


def add(state, eid, ip, network=NET, host="h1", claim=True):
    if claim:
        assert state.create({address_key(SUBNET, ip): Address(kind="container", host=host)})
    assert state.create({endpoint_key(eid): Endpoint(endpoint_id=eid, network_id=network, vni=7, host=host,
                                                     address=f"{ip}/24", mac="02:00:00:00:00:01", vtep="10.99.0.2")})


def test_an_endpoint_the_engine_forgot_goes_only_after_the_grace():
    state, engine, clock, calls, sweep = setup()
    add(state, "1" * 64, "10.5.0.2")
    assert sweep.sweep() == [] and calls == []  # first sighting: could be a CreateEndpoint in flight
    clock.t = 59
    assert sweep.sweep() == [] and calls == []
    clock.t = 60
    assert sweep.sweep() == ["1" * 64]
    assert calls == [("DeleteEndpoint", "1" * 64), ("ReleaseAddress", "10.5.0.2")]
    assert state.endpoint("1" * 64) is None and state.get(address_key(SUBNET, "10.5.0.2"), Address) is None


def test_an_endpoint_a_container_lists_stays_and_a_sighting_resets():
    state, engine, clock, calls, sweep = setup()
    add(state, "1" * 64, "10.5.0.2")
    sweep.sweep()  # unknown: in flight
    clock.t = 30
    engine.endpoints.add("1" * 64)  # the container runs now
    sweep.sweep()
    engine.endpoints.clear()  # then goes, with the plugin down
    clock.t = 70
    assert sweep.sweep() == []  # unknown since 70, not since 0
    clock.t = 129
    assert sweep.sweep() == []
    clock.t = 130
    assert sweep.sweep() == ["1" * 64]


def test_other_hosts_and_networks_the_engine_lacks_are_never_judged():
    state, engine, clock, calls, sweep = setup()
    add(state, "1" * 64, "10.5.0.2", host="h2")  # another host's endpoint
    add(state, "2" * 64, "10.5.0.3", network=OTHER_NET)  # an engine that is not ours would lack the network
    for t in (0, 100, 200):
        clock.t = t
        assert sweep.sweep() == []
    assert calls == []


def test_no_network_listing_while_every_record_is_listed():
    state, engine, clock, calls, sweep = setup()
    add(state, "1" * 64, "10.5.0.2")
    engine.endpoints.add("1" * 64)
    for t in (0, 100):
        clock.t = t
        sweep.sweep()
    assert engine.network_listings == 0 and calls == []


def test_an_address_claimed_again_after_the_endpoint_is_left_alone():
    state, engine, clock, calls, sweep = setup()
    add(state, "1" * 64, "10.5.0.2")
    sweep.sweep()
    # The engine released the address (its ReleaseAddress got through) and a new
    # container on this host claimed it; its CreateEndpoint is still to come.
    state.delete([address_key(SUBNET, "10.5.0.2")])
    assert state.create({address_key(SUBNET, "10.5.0.2"): Address(kind="container", host="h1")})
    clock.t = 60
    assert sweep.sweep() == ["1" * 64]
    assert calls == [("DeleteEndpoint", "1" * 64)]
    assert state.get(address_key(SUBNET, "10.5.0.2"), Address) is not None


def claim(state, ip, host="h1"):
    assert state.create({address_key(SUBNET, ip): Address.container(host)})


def test_an_address_no_endpoint_uses_goes_only_after_the_grace():
    """A ReleaseAddress that failed (the store restarting) leaves a claim the
    engine forgot: no endpoint record uses it. It goes after the grace; the
    addresses endpoints use, the gateway and another host's claims stay."""
    state, engine, clock, calls, sweep = setup()
    add(state, "1" * 64, "10.5.0.2")
    engine.endpoints.add("1" * 64)
    claim(state, "10.5.0.3")  # the orphan
    claim(state, "10.5.0.4", host="h2")  # h2's: its own sweep judges it
    sweep.sweep()
    clock.t = 59
    sweep.sweep()
    assert calls == [] and state.get(address_key(SUBNET, "10.5.0.3"), Address) is not None
    clock.t = 60
    sweep.sweep()
    assert calls == [("release unused", "10.5.0.3")]
    kept = {ip for ip, _, _ in state.addresses(SUBNET)}
    assert kept == {"10.5.0.1", "10.5.0.2", "10.5.0.4"}


def test_an_unused_address_claimed_again_meanwhile_starts_over():
    """Released and claimed again between two passes (a new container whose
    CreateEndpoint is still to come): a new claim, judged from its own first sighting."""
    state, engine, clock, calls, sweep = setup()
    claim(state, "10.5.0.3")
    sweep.sweep()
    state.delete([address_key(SUBNET, "10.5.0.3")])
    clock.t = 30
    claim(state, "10.5.0.3")
    sweep.sweep()
    clock.t = 60
    sweep.sweep()
    assert calls == []
    clock.t = 89
    sweep.sweep()
    assert calls == []
    clock.t = 90
    sweep.sweep()
    assert calls == [("release unused", "10.5.0.3")] and state.addresses(SUBNET)[0][0] == "10.5.0.1"


def test_an_address_whose_endpoint_comes_is_never_released():
    state, engine, clock, calls, sweep = setup()
    claim(state, "10.5.0.3")
    sweep.sweep()  # RequestAddress answered, CreateEndpoint not yet
    clock.t = 1
    add(state, "3" * 64, "10.5.0.3", claim=False)
    engine.endpoints.add("3" * 64)
    for t in (1, 61, 200):
        clock.t = t
        sweep.sweep()
    assert calls == [] and state.get(address_key(SUBNET, "10.5.0.3"), Address) is not None


SUBNET6 = "fd00:5::/64"


def add_dual(state, eid, ip, ip6):
    """A dual-stack endpoint and its two claims."""
    assert state.create({pool_key(SUBNET6): Pool(subnet=SUBNET6, hosts=["h1"])}) or state.pool(SUBNET6)
    for subnet, address in ((SUBNET, ip), (SUBNET6, ip6)):
        assert state.create({address_key(subnet, address): Address.container("h1")})
    assert state.create({endpoint_key(eid): Endpoint(endpoint_id=eid, network_id=NET, vni=7, host="h1",
                                                     address=f"{ip}/24", address6=f"{ip6}/64",
                                                     mac="02:00:00:00:00:01", vtep="10.99.0.2")})


def test_a_dual_stack_endpoint_keeps_both_addresses_and_gives_both_back():
    """Its IPv6 claim is in use as much as its IPv4 one; when the engine has
    forgotten the endpoint, both are released."""
    state, engine, clock, calls, sweep = setup()
    add_dual(state, "1" * 64, "10.5.0.2", "fd00:5::2")
    engine.endpoints.add("1" * 64)
    for t in (0, 60, 200):
        clock.t = t
        sweep.sweep()
    assert calls == [] and state.get(address_key(SUBNET6, "fd00:5::2"), Address) is not None
    engine.endpoints.clear()
    for t in (300, 360):
        clock.t = t
        sweep.sweep()
    assert calls == [("DeleteEndpoint", "1" * 64), ("ReleaseAddress", "10.5.0.2"), ("ReleaseAddress", "fd00:5::2")]
    assert state.addresses(SUBNET6) == []
