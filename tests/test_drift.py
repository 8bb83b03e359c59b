"""driver/drift.py with plain data: what restore applies and doctor reports."""

from __future__ import annotations

from driver.drift import Drift, KernelView, StoreView, VxlanSettings, drift
from driver.model import Peer

VTEP, OTHER = "10.9.0.1", "10.9.0.2"


def peer(n: int, vtep: str = OTHER, mac: str | None = None) -> Peer:
    return Peer(ip=f"10.40.0.{n}", mac=mac or f"02:50:0a:28:00:{n:02x}", vtep=vtep)


def test_in_step_is_no_drift():
    store = StoreView(networks={5000}, endpoints={5000: {"aaaaaaaaaa"}}, peers={5000: {peer(2)}},
                      vtep=VTEP, vxlan_port=4789)
    kernel = KernelView(namespaces={5000}, veths={5000: {"aaaaaaaaaa"}}, peers={5000: {peer(2)}},
                        vxlan={5000: VxlanSettings(5000, 4789, VTEP)})
    assert drift(store, kernel) == Drift() and not drift(store, kernel)


def test_missing_and_stale_namespaces():
    found = drift(StoreView(networks={5000, 5001}), KernelView(namespaces={5001, 7777, 42}))
    assert found.missing_namespaces == [5000]
    assert found.stale_namespaces == [42, 7777]  # sorted: restore and doctor act in a stable order
    assert found


def test_veths_compared_only_where_both_sides_have_the_network_and_it_was_read():
    store = StoreView(networks={5000, 5001, 5002}, endpoints={5000: {"live000000", "notyet0000"}, 5001: {"x" * 10}})
    kernel = KernelView(namespaces={5000, 5001, 9999},
                        veths={5000: {"live000000", "debris0000"}, 9999: {"y" * 10}})
    found = drift(store, kernel)
    assert found.stale_veths == {5000: ["debris0000"]}
    assert found.missing_veths == {5000: ["notyet0000"]}  # 5001's veths were not read: no claim about them
    assert found.missing_namespaces == [5002] and found.stale_namespaces == [9999]


def test_peers_leave_out_this_host_and_compare_macs_in_any_case():
    store = StoreView(networks={5000}, vtep=VTEP, peers={
        5000: {peer(2), peer(3, mac="02:50:0A:28:00:03"), peer(4, vtep=VTEP)},  # 4 is ours: br0 reaches it
        6000: {peer(9)},  # a network this host does not carry
    })
    kernel = KernelView(namespaces={5000}, peers={5000: {peer(3), peer(5)}})
    found = drift(store, kernel)
    assert found.missing_peers == {5000: [peer(2)]}
    assert found.stale_peers == {5000: [peer(5)]}


def test_a_moved_peer_is_both_missing_and_stale():
    store = StoreView(networks={5000}, vtep=VTEP, peers={5000: {peer(2, vtep="10.9.0.3")}})
    found = drift(store, KernelView(namespaces={5000}, peers={5000: {peer(2)}}))
    assert found.missing_peers == {5000: [peer(2, vtep="10.9.0.3")]}
    assert found.stale_peers == {5000: [peer(2)]}



def test_the_flood_list_of_a_multicast_overlay_is_each_other_host_with_a_peer():
    peers = {5000: {peer(2), peer(3), peer(4, vtep="10.9.0.3"), peer(5, vtep=VTEP)},
             5001: {peer(6)}}
    store = StoreView(networks={5000, 5001}, peers=peers, vtep=VTEP, multicast={5000})
    kernel = KernelView(namespaces={5000, 5001}, flood={5000: {OTHER, "10.9.0.3"}, 5001: set()})
    assert not drift(store, kernel), "one entry per host, never this host's own"
    # A host missing, a host with no peer left; and a flood entry where the option is off.
    found = drift(store, KernelView(namespaces={5000, 5001}, flood={5000: {OTHER, "10.9.0.9"}, 5001: {OTHER}}))
    assert found.missing_flood == {5000: ["10.9.0.3"]}
    assert found.stale_flood == {5000: ["10.9.0.9"], 5001: [OTHER]}
    assert not drift(store, KernelView(namespaces={5000, 5001})), "not read: no drift"

def test_vxlan_settings_that_differ_or_a_missing_device():
    store = StoreView(networks=set(), vtep=VTEP, vxlan_port=4789)  # the store is not needed for these
    kernel = KernelView(namespaces={1, 2, 3, 4}, vxlan={
        1: VxlanSettings(1, 4789, VTEP),
        2: VxlanSettings(2, 8472, VTEP),  # another --vxlan-port
        3: VxlanSettings(3, 4789, "10.9.0.77"),  # another --advertise-addr
        4: None,  # no vxlan device in the namespace
    })
    found = drift(store, kernel)
    assert found.vxlan == {
        2: (VxlanSettings(2, 8472, VTEP), VxlanSettings(2, 4789, VTEP)),
        3: (VxlanSettings(3, 4789, "10.9.0.77"), VxlanSettings(3, 4789, VTEP)),
        4: (None, VxlanSettings(4, 4789, VTEP)),
    }


def test_inputs_are_not_changed():
    store = StoreView(networks={5000}, endpoints={5000: {"a" * 10}}, peers={5000: {peer(2)}}, vtep=VTEP)
    kernel = KernelView(namespaces={5000, 1}, veths={5000: {"b" * 10}}, peers={5000: set()})
    before = (repr(store), repr(kernel))
    drift(store, kernel)
    assert (repr(store), repr(kernel)) == before
