"""`pyoverlay doctor` against a real kernel: a throw-away host namespace with
the real dataplane and peer sync, the real app on a real unix socket, and an
in-memory store. The engine comparison needs a real engine: see
tests/e2e/test_cluster_networks.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from driver.dataplane import Dataplane
from driver.membership import Membership
from driver.model import Peer
from driver.state import peer_key
from driver.store import open_store
from plugin.app import create_app
from ops.doctor import FAIL, IP_FORWARD, OK, SKIP, Doctor, exit_status, render
from tests.conftest import new_id
from tests.hosts import wait_for
from tests.test_protocol import make_endpoint, make_network

REMOTE = "10.97.200.2"  # another host's VTEP: only ever an FDB destination here


@pytest.fixture
def served(plugin, tmp_path):
    """The plugin's app answering on a unix socket, and this host's record in the store."""
    path = str(tmp_path / "pyoverlay.sock")
    server = make_server("unix://" + path, 0, create_app(plugin.network, plugin.ipam), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    membership = Membership(plugin.store, plugin.host.addr, plugin.host.addr, "test")
    membership.start()
    wait_for(lambda: plugin.store.get(f"hosts/{plugin.host.addr}"), 5, "the host record")
    yield path
    membership.stop()
    server.shutdown()
    thread.join(5)


def in_overlay(plugin, vni: int, *cmd: str) -> None:
    subprocess.run(["nsenter", f"--net={plugin.dataplane.netns_name(vni)}", *cmd], check=True,
                   capture_output=True, text=True)


def remote_peers(plugin, vni: int, n: int) -> list[Peer]:
    """n endpoints of another host, as its plugin would publish them."""
    peers = [Peer(ip=f"10.20.0.{100 + i}", mac=f"02:50:0a:14:00:{100 + i:02x}", vtep=REMOTE) for i in range(n)]
    for p in peers:
        plugin.store.put(peer_key(vni, new_id()), p.to_json())
    wait_for(lambda: plugin.dataplane.peers(vni) == set(peers), 5, "peer sync to program the remote peers")
    return peers


@pytest.fixture
def overlay(plugin, served):
    """One network with a joined local container and three remote peers."""
    network_id, pool_id, _ = make_network(plugin)
    endpoint_id, _, _ = make_endpoint(plugin, network_id, pool_id)
    status, answer = plugin.call("NetworkDriver.Join", {"NetworkID": network_id, "EndpointID": endpoint_id,
                                                        "SandboxKey": "/var/run/docker/netns/x", "Options": {}})
    assert status == 200, answer
    vni = json.loads(plugin.store.get(f"networks/{network_id}").value)["vni"]
    return vni, remote_peers(plugin, vni, 3)


def doctor(plugin, socket_path) -> list:
    return Doctor(plugin.store, plugin.host.addr, plugin.dataplane, socket_path=socket_path).run()


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_clean_host(plugin, served, overlay):
    vni, peers = overlay
    checks = doctor(plugin, served)
    assert [(c.name, c.status) for c in checks] == [
        ("plugin socket", OK), ("store", OK), ("underlay", OK), ("vxlan port", OK),
        ("overlays", OK), ("peers", OK), ("engine", SKIP),
    ], render(checks)
    found = by_name(checks)
    assert found["underlay"].summary == f"underlay0 holds {plugin.host.addr}, MTU 1500: overlays up to MTU 1450"
    assert found["vxlan port"].summary == f"UDP 4789 on all 1 overlay(s), local {plugin.host.addr}"
    assert found["peers"].summary == "the kernel holds exactly the store's 3 remote peer(s)"
    assert exit_status(checks) == 0
    assert render(checks).endswith("no problem found\n")


def test_reports_a_stale_and_a_missing_fdb_entry(plugin, served, overlay):
    vni, peers = overlay
    # Nothing may repair the kernel behind the test's back.
    plugin.peers.stop()
    stale = Peer(ip="10.20.0.250", mac="02:50:0a:14:00:fa", vtep="10.97.201.2")
    in_overlay(plugin, vni, "bridge", "fdb", "append", stale.mac, "dev", "vxlan0", "dst", stale.vtep,
               "self", "permanent")
    in_overlay(plugin, vni, "ip", "neigh", "replace", stale.ip, "lladdr", stale.mac, "dev", "vxlan0",
               "nud", "permanent")
    lost = peers[1]
    in_overlay(plugin, vni, "bridge", "fdb", "del", lost.mac, "dev", "vxlan0", "self")

    checks = doctor(plugin, served)
    found = by_name(checks)
    assert found["peers"].status == FAIL
    assert found["peers"].details == [
        f"VNI {vni}: missing {lost.ip} {lost.mac} via {lost.vtep}",
        f"VNI {vni}: stale {stale.ip} {stale.mac} via {stale.vtep}",
    ]
    assert found["peers"].summary.startswith("1 missing and 1 stale FDB/neighbour entries")
    assert [c.name for c in checks if c.status == FAIL] == ["peers"]
    assert exit_status(checks) == 1
    text = render(checks)
    assert "[FAIL] peers: 1 missing and 1 stale" in text and text.endswith("1 check(s) failed\n")



def test_reports_a_missing_and_a_stale_flood_entry(plugin, served):
    """-o multicast=true: the flood list (one all-zero FDB entry per remote
    host with a container on the network) is part of what the kernel must hold."""
    network_id, _, _ = make_network(plugin, options={"multicast": "true"})
    vni = json.loads(plugin.store.get(f"networks/{network_id}").value)["vni"]
    remote_peers(plugin, vni, 2)  # two containers, one host: one flood entry
    wait_for(lambda: plugin.dataplane.flood(vni) == {REMOTE}, 5, "peer sync to flood to the remote host")
    found = by_name(doctor(plugin, served))
    assert found["peers"].status == OK
    assert found["peers"].summary == "the kernel holds exactly the store's 2 remote peer(s) and 1 flood entry"

    plugin.peers.stop()  # nothing may repair the kernel behind the test's back
    in_overlay(plugin, vni, "bridge", "fdb", "del", "00:00:00:00:00:00", "dev", "vxlan0", "dst", REMOTE, "self")
    in_overlay(plugin, vni, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vxlan0", "dst", "10.97.201.2",
               "self", "permanent")
    found = by_name(doctor(plugin, served))
    assert found["peers"].status == FAIL
    assert found["peers"].details == [f"VNI {vni}: missing flood entry to {REMOTE}",
                                      f"VNI {vni}: stale flood entry to 10.97.201.2"]
    assert found["peers"].summary.startswith("1 missing and 1 stale FDB/neighbour entries")

def test_reports_debris_in_an_overlay_namespace(plugin, served, overlay):
    vni, _ = overlay
    in_overlay(plugin, vni, "ip", "link", "add", "pyb0123456789", "type", "veth", "peer", "name", "pyt-x")
    found = by_name(doctor(plugin, served))
    assert found["overlays"].status == FAIL
    assert found["overlays"].details == [
        f"VNI {vni}: veth pyb0123456789 belongs to no endpoint in the store: debris; restart the plugin "
        "(its start removes it)"]


def test_reports_a_vxlan_device_on_another_port_or_missing(plugin, served, overlay):
    """The settings come from the dataplane's own read (vxlan_settings), the
    comparison from driver/drift.py: a plugin restarted with another
    --vxlan-port is told so, and so is a namespace without its vxlan0."""
    vni, _ = overlay
    other_port = Dataplane(vtep=plugin.host.addr, vxlan_port=8472, host_netns=plugin.host.name,
                           netns_dir=plugin.host.netns_dir)
    try:
        check = Doctor(plugin.store, plugin.host.addr, other_port).check_vxlan_port(store_ok=True)
    finally:
        other_port.close()
    assert check.status == FAIL and check.summary == "1 of 1 overlays are not on UDP 8472"
    assert check.details == [
        f"VNI {vni}: vxlan0 has id {vni}, port 4789, local {plugin.host.addr}; expected {vni}, 8472, "
        f"{plugin.host.addr}: was the plugin restarted with other --vxlan-port/--advertise-addr? Recreate the network"]
    in_overlay(plugin, vni, "ip", "link", "del", "vxlan0")
    check = Doctor(plugin.store, plugin.host.addr, plugin.dataplane).check_vxlan_port(store_ok=True)
    assert check.status == FAIL
    assert check.details == [f"VNI {vni}: {plugin.dataplane.netns_name(vni)} has no vxlan0: "
                             "delete the network and create it again"]


def test_socket_absent_or_silent(plugin, tmp_path):
    missing = str(tmp_path / "nothing.sock")
    check = Doctor(plugin.store, plugin.host.addr, plugin.dataplane, socket_path=missing).check_socket()
    assert check.status == FAIL and check.summary.startswith(f"no socket at {missing}")
    # A socket file left by a dead plugin: it exists, nobody answers.
    silent = str(tmp_path / "silent.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(silent)
    s.close()
    check = Doctor(plugin.store, plugin.host.addr, plugin.dataplane, socket_path=silent).check_socket()
    assert check.status == FAIL and "does not answer" in check.summary


def test_store_down_skips_what_needs_it(plugin):
    store = open_store("etcd://127.0.0.1:9")
    try:
        checks = Doctor(store, plugin.host.addr, plugin.dataplane).run()
    finally:
        store.close()
    assert [(c.name, c.status) for c in checks] == [
        ("plugin socket", SKIP), ("store", FAIL), ("underlay", OK), ("vxlan port", OK),
        ("overlays", SKIP), ("peers", SKIP), ("engine", SKIP),
    ]
    assert "127.0.0.1:9" in checks[1].summary


def test_wrong_advertise_address(plugin):
    check = Doctor(plugin.store, "192.0.2.77", plugin.dataplane).check_underlay(store_ok=False)
    assert check.status == FAIL
    assert check.summary == "no interface holds 192.0.2.77: pass this host's underlay address as --advertise-addr"


# -- IP forwarding: read in the namespace doctor runs in (real kernel) --------------
REPO_ROOT = Path(__file__).resolve().parent.parent
READ_IP_FORWARD = "import json, dataclasses, ops.doctor as d; print(json.dumps(dataclasses.asdict(d.check_ip_forward())))"


def ip_forward_check(netns: str) -> dict:
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", READ_IP_FORWARD],
                         check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    return json.loads(out)


def test_ip_forward_off_fails_saying_how_to_turn_it_on_then_ok(host_ns):
    # A new network namespace starts with forwarding off, as a host under
    # Docker 29's nftables backend may be.
    subprocess.run(["ip", "netns", "exec", host_ns.name, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)
    off = ip_forward_check(host_ns.name)
    assert off["name"] == "ip forwarding" and off["status"] == FAIL, off
    assert "net.ipv4.ip_forward is 0" in off["summary"] and "docker_gwbridge" in off["summary"], off
    assert any("sysctl -w net.ipv4.ip_forward=1" in d for d in off["details"]), off
    subprocess.run(["ip", "netns", "exec", host_ns.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    assert ip_forward_check(host_ns.name)["status"] == OK


def test_cli_doctor_includes_ip_forwarding(plugin, served):
    checks = Doctor(plugin.store, plugin.host.addr, plugin.dataplane, socket_path=served,
                    ip_forward_path=IP_FORWARD).run()
    assert checks[-1].name == "ip forwarding", render(checks)
