"""What the store holds for this host that the engine lost (driver/leftovers.py):
found on plain data, forgotten only after its grace and only through the
forget callback (the driver's own DeleteNetwork and ReleasePool)."""

from __future__ import annotations

from driver.leftovers import PHANTOM_GRACE, Leftovers, find
from driver.model import Network, Pool
from driver.state import State, network_key, pool_key
from driver.store import open_store

H1, H2 = "10.99.0.1", "10.99.0.2"
KEPT = Network("k" * 64, 4096, H1, 1450, "10.40.0.0/24")
LOST = Network("l" * 64, 4097, H1, 1450, "10.41.0.0/24")


def summary(network: Network):
    return (network.network_id, "net", "pyoverlay", (network.subnet,))


def test_networks_and_pool_holds_the_engine_has_not_are_found():
    pools = [Pool("10.40.0.0/24", [H1]), Pool("10.41.0.0/24", [H1]), Pool("10.42.0.0/24", [H1])]
    found = find([KEPT, LOST], pools, [summary(KEPT)])
    assert found == {(LOST.network_id, LOST.subnet): f"network {LOST.network_id[:12]}",
                     ("", "10.42.0.0/24"): "the hold on the pool"}
    # A subnet another driver's network uses is not a leftover hold.
    assert ("", "10.42.0.0/24") not in find([KEPT], pools, [summary(KEPT), ("b" * 64, "b", "bridge", ("10.42.0.0/24",))])


def test_an_engine_without_any_of_this_hosts_networks_is_not_trusted():
    # It may not be the engine that uses this plugin (another DOCKER_HOST, a fresh engine).
    assert find([KEPT, LOST], [Pool("10.42.0.0/24", [H1])], []) == {}


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_a_leftover_is_forgotten_after_its_grace_and_only_if_still_gone():
    store = open_store("memory://")
    for network in (KEPT, LOST, Network("o" * 64, 4098, H2, 1450, "10.43.0.0/24")):
        store.put(network_key(network.network_id), network.to_json())
    store.put(pool_key("10.41.0.0/24"), Pool("10.41.0.0/24", [H1]).to_json())
    forgotten, clock = [], Clock()
    sweeper = Leftovers(State(store), H1, lambda nid, subnet: forgotten.append((nid, subnet)), clock=clock)
    engine = [summary(KEPT)]
    sweeper.sweep(engine, in_engine=lambda nid: False)
    assert forgotten == [] and sweeper.next_due() == 100.0 + PHANTOM_GRACE
    clock.now += PHANTOM_GRACE
    sweeper.sweep(engine, in_engine=lambda nid: nid == LOST.network_id)  # back in the engine meanwhile
    assert forgotten == []
    sweeper.sweep(engine, in_engine=lambda nid: False)
    assert forgotten == [(LOST.network_id, LOST.subnet)]  # the other host's network is not this host's to forget
    assert sweeper.next_due() is None
    store.close()


def test_a_failed_forget_is_tried_again_on_the_next_sweep():
    store = open_store("memory://")
    for network in (KEPT, LOST):
        store.put(network_key(network.network_id), network.to_json())
    calls, clock = [], Clock()

    def forget(nid, subnet):
        calls.append(nid)
        if len(calls) == 1:
            raise OSError("kernel busy (test)")

    sweeper = Leftovers(State(store), H1, forget, clock=clock)
    sweeper.sweep([summary(KEPT)], lambda nid: False)
    clock.now += PHANTOM_GRACE
    sweeper.sweep([summary(KEPT)], lambda nid: False)
    assert sweeper.next_due() is not None  # still waiting
    sweeper.sweep([summary(KEPT)], lambda nid: False)
    assert calls == [LOST.network_id, LOST.network_id] and sweeper.next_due() is None
    store.close()
