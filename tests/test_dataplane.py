"""driver.dataplane against the real kernel.

Three "hosts" are network namespaces on one underlay: a bridge in a namespace
of its own, host N at 10.98.0.N/24 (host c's underlay MTU is 1400). Each host
has its own Dataplane and its own netns_dir, so nothing collides with the
machine or with other tests. "Containers" are namespaces into which a test
moves the container end, as libnetwork would. Everything lives under one
temporary directory and is removed at the end, pass or fail.

Observations go through ip/bridge/ss/ping (nsenter), never through the module
under test; setup uses pyroute2 directly.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from driver.dataplane import Dataplane, DataplaneError, default_route_address
from driver.dataplane import worker as dp_worker
from driver.model import Peer
from tests.hosts import remove_tree, wait_for

UNDERLAY = "10.98.0.{}"
OVERLAY = "10.98.100.{}"  # container addresses; only ever inside test namespaces
_ids = itertools.count(1)


def endpoint_id() -> str:
    n = next(_ids)
    return f"{os.getpid():06x}{n:04x}" + "e" * 54


def mac(n: int) -> str:
    return "02:98:00:00:{:02x}:{:02x}".format(n >> 8, n & 0xFF)


# -- observing ------------------------------------------------------------------


def run(ns: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nsenter", f"--net={ns}", *cmd], capture_output=True, text=True, timeout=20, check=check
    )


def ip_json(ns: str, *args: str) -> list:
    # check=True: a namespace or device that is not there must not read as "empty"
    out = run(ns, "ip", "-j", *args, check=True).stdout
    return json.loads(out) if out.strip() else []


def links(ns: str) -> dict[str, dict]:
    return {link["ifname"]: link for link in ip_json(ns, "-d", "link", "show")}


def ping(ns: str, ip: str) -> bool:
    return run(ns, "ping", "-c1", "-W2", "-q", ip).returncode == 0


def unreachable(ns: str, ip: str) -> bool:
    # ARP is answered locally or not at all, so one second is plenty
    return run(ns, "ping", "-c1", "-W1", "-q", ip).returncode == 1


def vxlan_entries(ov: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """vxlan0's permanent neighbours (ip -> mac) and remote FDB entries (mac -> dsts)."""
    neigh = {n["dst"]: n["lladdr"] for n in ip_json(ov, "neigh", "show", "dev", "vxlan0", "nud", "permanent")}
    fdb: dict[str, set[str]] = {}
    out = run(ov, "bridge", "-j", "fdb", "show", "dev", "vxlan0", check=True).stdout
    for entry in json.loads(out) if out.strip() else []:
        if "dst" in entry:
            fdb.setdefault(entry["mac"], set()).add(entry["dst"])
    return neigh, fdb


def expected_entries(peers) -> tuple[dict[str, str], dict[str, set[str]]]:
    return {p.ip: p.mac for p in peers}, {p.mac: {p.vtep} for p in peers}


def udp_4789(ns: str) -> bool:
    return ":4789 " in run(ns, "ss", "-Hluna", check=True).stdout + " "


# -- the lab --------------------------------------------------------------------


@dataclass
class Host:
    name: str
    ns: str
    addr: str
    netns_dir: str
    dp: Dataplane

    def overlay(self, vni: int) -> str:
        return os.path.join(self.netns_dir, f"pyo-{vni}")


@dataclass
class Lab:
    root: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def nsdir(self) -> str:
        return os.path.join(self.root, "ns")

    def new_ns(self, name: str) -> str:
        path = os.path.join(self.nsdir, name)
        pr_netns.create(path)
        return path

    def dataplane(self, host: Host) -> Dataplane:
        """Another Dataplane on the same host: stands in for another gunicorn worker."""
        return Dataplane(host.addr, host_netns=host.ns, netns_dir=host.netns_dir)


@pytest.fixture(scope="module")
def lab():
    lab = Lab(tempfile.mkdtemp(prefix="pyo-dataplane-"))
    try:
        underlay = lab.new_ns("underlay")
        with IPRoute(netns=underlay, flags=0, groups=0) as ul:
            ul.link("add", ifname="ul", kind="bridge")
            ul.link("set", index=ul.link_lookup(ifname="ul")[0], state="up")
            for n, name in enumerate("abc", 1):
                ns = lab.new_ns(f"host-{name}")
                mtu = 1400 if name == "c" else 1500
                ul.link(
                    "add",
                    ifname=f"ul-{name}",
                    kind="veth",
                    master=ul.link_lookup(ifname="ul")[0],
                    state="up",
                    peer={"ifname": "eth0", "net_ns_fd": ns, "mtu": mtu},
                )
                with IPRoute(netns=ns, flags=0, groups=0) as h:
                    eth0 = h.link_lookup(ifname="eth0")[0]
                    h.addr("add", index=eth0, address=UNDERLAY.format(n), prefixlen=24)
                    h.link("set", index=eth0, state="up")
                    h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
                netns_dir = os.path.join(lab.root, f"overlay-{name}")
                dp = Dataplane(UNDERLAY.format(n), host_netns=ns, netns_dir=netns_dir)
                lab.hosts[name] = Host(name, ns, UNDERLAY.format(n), netns_dir, dp)
        yield lab
    finally:
        for host in lab.hosts.values():
            host.dp.close()
        remove_tree(lab.root)


@pytest.fixture
def a(lab):
    return lab.hosts["a"]


@pytest.fixture
def b(lab):
    return lab.hosts["b"]


@pytest.fixture
def c(lab):
    return lab.hosts["c"]


@pytest.fixture
def network(lab):
    """network(host, vni, mtu): create it now, delete it after the test."""
    made = []

    def make(host: Host, vni: int, mtu: int = 1450) -> str:
        made.append((host, vni))
        host.dp.create_network(vni, mtu)
        return host.overlay(vni)

    yield make
    for host, vni in made:
        host.dp.delete_network(vni)


@pytest.fixture
def container(lab):
    """container(host, vni, ip, mac) -> (netns path, endpoint id): an endpoint moved into a namespace."""
    made = []

    def make(host: Host, vni: int, ip: str, mac_addr: str, mtu: int = 1450) -> tuple[str, str]:
        eid = endpoint_id()
        src = host.dp.create_endpoint(vni, eid, mac_addr, mtu)
        ns = lab.new_ns(f"ctr-{eid[:10]}")
        made.append(ns)
        with IPRoute(netns=host.ns, flags=0, groups=0) as h:
            h.link("set", index=h.link_lookup(ifname=src)[0], net_ns_fd=ns, ifname="eth0")
        with IPRoute(netns=ns, flags=0, groups=0) as ctr:
            eth0 = ctr.link_lookup(ifname="eth0")[0]
            ctr.addr("add", index=eth0, address=ip, prefixlen=24)
            ctr.link("set", index=eth0, state="up")
        return ns, eid

    yield make
    for ns in made:
        pr_netns.remove(ns)


# -- networks -------------------------------------------------------------------


def test_create_network_is_complete_and_idempotent(a, network):
    ov = network(a, 4101, 1400)
    a.dp.create_network(4101, 1400)

    assert a.dp.networks() == {4101}
    have = links(ov)
    assert set(have) == {"lo", "br0", "vxlan0"}
    vx = have["vxlan0"]
    info = vx["linkinfo"]["info_data"]
    assert (info["id"], info["port"], info["local"]) == (4101, 4789, a.addr)
    assert info["learning"] is False and info["proxy"] is True
    assert vx["mtu"] == 1400 and vx["master"] == "br0" and "UP" in vx["flags"]
    assert have["br0"]["mtu"] == 1400 and "UP" in have["br0"]["flags"]
    # The vxlan's UDP socket is on the underlay (host ns), not in the overlay ns.
    assert udp_4789(a.ns) and not udp_4789(ov)
    assert not [n for n, link in links(a.ns).items() if link.get("linkinfo", {}).get("info_kind") == "vxlan"]


def bridge_nf(ns: str) -> dict[str, str]:
    out = run(ns, "sh", "-c", "grep . /proc/sys/net/bridge/bridge-nf-call-*", check=True).stdout
    return {line.split(":")[0].rsplit("/", 1)[1]: line.split(":")[1] for line in out.split()}


def test_bridge_netfilter_is_off_in_the_overlay_namespace_only(a, network):
    """The engine loads br_netfilter: frames br0 forwards would pass the
    overlay namespace's IP hooks, a cost for nothing there."""
    subprocess.run(["modprobe", "br_netfilter"], capture_output=True)  # as the engine does (or built in)
    assert os.path.exists("/proc/sys/net/bridge"), "br_netfilter is neither loaded nor loadable here"
    ov = network(a, 4102, 1400)
    calls = ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"]
    assert bridge_nf(ov) == dict.fromkeys(calls, "0")
    assert bridge_nf(a.ns) == dict.fromkeys(calls, "1"), "the host namespace keeps its own settings"
    run(ov, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", check=True)
    a.dp.create_network(4102, 1400)  # a restart's restore converges it
    assert bridge_nf(ov) == dict.fromkeys(calls, "0")


def test_a_read_only_proc_sys_leaves_bridge_netfilter_on_and_the_network_made(a, network, monkeypatch):
    """A managed plugin's container has /proc/sys read-only: the switches stay
    on (a little throughput), and CreateNetwork must not fail for it."""
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).startswith("/proc/sys/net/bridge/") and args[:1] == ("w",):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    ov = network(a, 4106, 1400)
    assert {"br0", "vxlan0"} <= set(links(ov))


def test_bridge_mac_never_follows_its_ports(a, network):
    """The resolver's address is on br0 and containers cache br0's MAC for it:
    a bridge left to itself takes its lowest port's MAC and changes it when
    that port goes, so br0's MAC is pinned at creation (and on a repeat)."""
    ov = network(a, 4103, 1400)
    pinned = links(ov)["br0"]["address"]
    with IPRoute(netns=ov, flags=0, groups=0) as h:
        h.link("add", ifname="lowport", kind="veth", peer="lowpeer", address="02:00:00:00:00:01")
        h.link("set", index=h.link_lookup(ifname="lowport")[0], master=h.link_lookup(ifname="br0")[0], state="up")
        assert links(ov)["br0"]["address"] == pinned  # not the new, lower port's
        h.link("del", ifname="lowport")
    assert links(ov)["br0"]["address"] == pinned
    a.dp.create_network(4103, 1400)  # a repeat (restore) keeps it
    assert links(ov)["br0"]["address"] == pinned


def test_create_network_racing_with_itself_makes_one_good_network(lab, a, network):
    others = [lab.dataplane(a) for _ in range(2)]  # other "processes": flock, not a thread lock
    callers = [a.dp, a.dp, *others]
    start = threading.Barrier(len(callers))
    errors = []

    def create(dp):
        start.wait()
        try:
            dp.create_network(4102, 1450)
        except Exception as e:  # collected: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=create, args=(dp,)) for dp in callers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        network(a, 4102)  # registers the clean-up; create again is a no-op
        for dp in others:
            dp.close()
    assert errors == []
    assert a.dp.networks() == {4102}
    assert set(links(a.overlay(4102))) == {"lo", "br0", "vxlan0"}


def test_failed_create_network_leaves_nothing(a):
    # Another vxlan on the host already holds VNI 4103 on port 4789.
    with IPRoute(netns=a.ns, flags=0, groups=0) as h:
        h.link("add", ifname="foreign", kind="vxlan", vxlan_id=4103, vxlan_port=4789, vxlan_local=a.addr)
        try:
            with pytest.raises(DataplaneError, match="VNI 4103"):
                a.dp.create_network(4103, 1450)
            assert a.dp.networks() == set()
            assert not os.path.lexists(a.overlay(4103))
            assert h.link_lookup(ifname="foreign")  # not ours: left alone
        finally:
            h.link("del", index=h.link_lookup(ifname="foreign")[0])
    a.dp.create_network(4103, 1450)  # and the VNI works once it is free
    a.dp.delete_network(4103)
    assert a.dp.networks() == set()


def test_missing_host_namespace_is_an_error_and_creates_nothing(lab, tmp_path):
    typo = os.path.join(lab.nsdir, "host-typo")
    dp = Dataplane(UNDERLAY.format(1), host_netns=typo, netns_dir=str(tmp_path / "ov"))
    try:
        with pytest.raises(DataplaneError, match="host-typo"):
            dp.underlay_mtu()
        with pytest.raises(DataplaneError, match="host-typo"):
            dp.create_network(4104, 1450)
    finally:
        dp.close()
    assert not os.path.lexists(typo)
    assert dp.networks() == set()


def test_delete_network_leaves_nothing_behind(lab, b, container):
    ov = b.overlay(4105)
    b.dp.create_network(4105, 1450)
    ctr, _ = container(b, 4105, OVERLAY.format(50), mac(50))
    b.dp.create_endpoint(4105, endpoint_id(), mac(51), 1450)  # still in the host ns
    b.dp.add_peer(4105, Peer(OVERLAY.format(60), mac(60), UNDERLAY.format(1)))
    other = lab.dataplane(b)  # another process holding a handle on the namespace
    try:
        assert len(other.endpoints(4105)) == 2

        b.dp.delete_network(4105)
        b.dp.delete_network(4105)  # idempotent

        assert b.dp.networks() == set() and not os.path.lexists(ov)
        assert not [n for n in links(b.ns) if n.startswith("pyo")]
        assert set(links(ctr)) == {"lo"}
        # vxlan0 is gone even though `other` still pins the old namespace:
        # its UDP socket is closed and the VNI is free again.
        assert not udp_4789(b.ns)
        b.dp.create_network(4105, 1450)
        eid = endpoint_id()
        b.dp.create_endpoint(4105, eid, mac(52), 1450)
        assert other.endpoints(4105) == {eid[:10]}  # sees the new namespace, not the old one
        b.dp.delete_network(4105)
    finally:
        other.close()


# -- host facts -----------------------------------------------------------------


def test_underlay_mtu_is_read_from_the_kernel(lab, a, c):
    assert c.dp.underlay_mtu() == 1400
    assert a.dp.underlay_mtu() == 1500
    stranger = Dataplane(UNDERLAY.format(77), host_netns=a.ns, netns_dir=a.netns_dir)
    try:
        with pytest.raises(DataplaneError, match=r"10\.98\.0\.77"):
            stranger.underlay_mtu()
    finally:
        stranger.close()


def test_default_route_address(lab, a, b):
    with pytest.raises(DataplaneError, match="no IPv4 default route"):
        default_route_address(a.ns)
    with IPRoute(netns=b.ns, flags=0, groups=0) as h:
        h.route("add", dst="0.0.0.0/0", gateway=UNDERLAY.format(254))
        try:
            assert default_route_address(b.ns) == b.addr
        finally:
            h.route("del", dst="0.0.0.0/0", gateway=UNDERLAY.format(254))


# -- endpoints ------------------------------------------------------------------


def test_endpoint_lifecycle(a, network, container):
    ov = network(a, 4201, 1400)
    eid = endpoint_id()

    name = a.dp.create_endpoint(4201, eid, mac(1).upper(), 1400)

    assert name == "pyo" + eid[:10] and len(name) <= 15
    host_end = links(a.ns)[name]
    assert (host_end["address"], host_end["mtu"]) == (mac(1), 1400)
    bridge_end = links(ov)["pyb" + eid[:10]]
    assert bridge_end["mtu"] == 1400 and bridge_end["master"] == "br0" and "UP" in bridge_end["flags"]
    assert a.dp.endpoints(4201) == {eid[:10]}

    assert a.dp.create_endpoint(4201, eid, mac(1), 1400) == name  # idempotent: the same pair, untouched
    assert links(a.ns)[name]["ifindex"] == host_end["ifindex"]
    assert links(ov)["pyb" + eid[:10]]["ifindex"] == bridge_end["ifindex"]
    assert a.dp.endpoints(4201) == {eid[:10]}

    a.dp.delete_endpoint(4201, eid)
    a.dp.delete_endpoint(4201, eid)  # idempotent
    assert a.dp.endpoints(4201) == set()
    assert name not in links(a.ns) and set(links(ov)) == {"lo", "br0", "vxlan0"}

    # The container end inside a container goes with its bridge end.
    ctr, eid = container(a, 4201, OVERLAY.format(9), mac(9), 1400)
    assert links(ctr)["eth0"]["mtu"] == 1400
    a.dp.delete_endpoint(4201, eid)
    assert set(links(ctr)) == {"lo"} and set(links(ov)) == {"lo", "br0", "vxlan0"}

    # Someone else's device holds the container end's name: refused, untouched.
    eid = endpoint_id()
    with IPRoute(netns=a.ns, flags=0, groups=0) as h:
        h.link("add", ifname="pyo" + eid[:10], kind="veth", peer="pyo-other")
        try:
            with pytest.raises(DataplaneError, match="already exists"):
                a.dp.create_endpoint(4201, eid, mac(10), 1400)
            assert h.link_lookup(ifname="pyo" + eid[:10])
            assert set(links(ov)) == {"lo", "br0", "vxlan0"}
        finally:
            h.link("del", ifname="pyo-other")

    a.dp.delete_endpoint(4999, eid)  # no such network: nothing to do
    with pytest.raises(DataplaneError, match="create the network first"):
        a.dp.create_endpoint(4999, eid, mac(9), 1400)


def test_mac_learned_on_vxlan0_is_forgotten_when_it_becomes_local(a, network):
    """An address (and so its MAC) freed on another host and reused here: br0
    learned that MAC on vxlan0 while it was remote, and would keep sending
    the new local container's traffic into the tunnel until it aged out."""
    ov = network(a, 4202, 1400)
    run(ov, "bridge", "fdb", "add", mac(21), "dev", "vxlan0", "master", "dynamic", check=True)
    assert mac(21) in run(ov, "bridge", "fdb", "show", "br", "br0").stdout

    a.dp.create_endpoint(4202, endpoint_id(), mac(21), 1400)

    learned = run(ov, "bridge", "fdb", "show", "dev", "vxlan0").stdout
    assert mac(21) not in learned


def test_concurrent_endpoints_on_one_network(lab, a, network):
    ov = network(a, 4202)
    other = lab.dataplane(a)
    jobs = [(a.dp, [endpoint_id() for _ in range(8)]) for _ in range(2)]
    jobs.append((other, [endpoint_id() for _ in range(8)]))
    start = threading.Barrier(len(jobs))
    errors = []

    def create(dp, eids):
        start.wait()
        try:
            for n, eid in enumerate(eids):
                dp.create_endpoint(4202, eid, mac(0x100 + n), 1450)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=create, args=job) for job in jobs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        other.close()
    assert errors == []
    want = {eid[:10] for _, eids in jobs for eid in eids}
    assert a.dp.endpoints(4202) == want
    have = links(ov)
    assert all(have["pyb" + short]["master"] == "br0" for short in want)
    for _, eids in jobs:
        for eid in eids:
            a.dp.delete_endpoint(4202, eid)
    assert a.dp.endpoints(4202) == set()
    assert not [n for n in links(a.ns) if n.startswith("pyo")]


class Held:
    """Keeps a Dataplane's netlink worker busy on a call until release():
    what is queued meanwhile shows which work goes first."""

    def __init__(self, dp: Dataplane):
        self.dp, self.gate, self.started = dp, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=dp._call, args=(self._hold,))
        self.thread.start()
        assert self.started.wait(5), "the worker never took the holding call"

    def _hold(self) -> None:
        self.started.set()
        self.gate.wait(30)

    def queued_calls(self) -> int:
        return len(self.dp._thread._calls)  # calls waiting behind the held one

    def release(self) -> None:
        self.gate.set()
        self.thread.join(10)


def test_leave_deletion_answers_at_once_and_yields_to_calls(a, network, container):
    ov = network(a, 4203, 1400)
    ctr, moved = container(a, 4203, OVERLAY.format(31), mac(31), 1400)  # its end inside a "container"
    eids = [moved] + [endpoint_id() for _ in range(3)]
    for n, eid in enumerate(eids[1:], 32):
        a.dp.create_endpoint(4203, eid, mac(n), 1400)
    held = Held(a.dp)
    try:
        t0 = time.monotonic()
        for eid in eids:
            a.dp.delete_endpoint_soon(4203, eid)
        queued_in = time.monotonic() - t0
        # Nothing was deleted yet: the queueing did not wait for the worker.
        assert queued_in < 0.5 and a.dp.pending_endpoint_deletions() == {e[:10] for e in eids}
        assert {"pyb" + e[:10] for e in eids} <= set(links(ov)) and "eth0" in links(ctr)
        # A Join that comes now goes before the queued deletions.
        fresh = endpoint_id()
        joined = []
        join = threading.Thread(target=lambda: joined.append(a.dp.create_endpoint(4203, fresh, mac(40), 1400)))
        join.start()
        wait_for(lambda: held.queued_calls() == 1, 5, "the Join queued behind the held call")
    finally:
        held.release()
    join.join(10)
    assert joined == ["pyo" + fresh[:10]]
    assert len(a.dp.pending_endpoint_deletions()) >= len(eids) - 1, "the Join waited for the deletions"
    wait_for(lambda: not a.dp.pending_endpoint_deletions(), 10, "the queued deletions to run")
    assert set(links(ov)) == {"lo", "br0", "vxlan0", "pyb" + fresh[:10]}
    assert set(links(ctr)) == {"lo"}
    assert not [n for n in links(a.ns) if n.startswith("pyo") and n != "pyo" + fresh[:10]]
    a.dp.delete_endpoint(4203, fresh)


def test_a_failed_deferred_deletion_is_retried(a, network, monkeypatch):
    ov = network(a, 4204, 1400)
    eid = endpoint_id()
    a.dp.create_endpoint(4204, eid, mac(41), 1400)
    attempts = []
    real = dp_worker.Handle.link_del

    def flaky(handle, index):
        attempts.append(index)
        if len(attempts) <= 2:
            raise dp_worker.NetlinkError(16, "Device or resource busy")  # EBUSY, twice
        return real(handle, index)

    monkeypatch.setattr(dp_worker.Handle, "link_del", flaky)
    a.dp.delete_endpoint_soon(4204, eid)
    wait_for(lambda: "pyb" + eid[:10] not in links(ov) and not a.dp.pending_endpoint_deletions(), 10,
             "the deletion to succeed on a retry")
    assert len(attempts) == 3
    assert "pyo" + eid[:10] not in links(a.ns)


def test_join_after_leave_of_the_same_endpoint_gets_a_fresh_pair_that_stays(a, network):
    ov = network(a, 4205, 1400)
    eid = endpoint_id()
    a.dp.create_endpoint(4205, eid, mac(42), 1400)
    old = links(ov)["pyb" + eid[:10]]["ifindex"]
    held = Held(a.dp)
    try:
        a.dp.delete_endpoint_soon(4205, eid)
        joined = threading.Thread(target=a.dp.create_endpoint, args=(4205, eid, mac(42), 1400))
        joined.start()
        wait_for(lambda: held.queued_calls() == 1, 5, "the Join queued behind the held call")
    finally:
        held.release()
    joined.join(10)
    assert not a.dp.pending_endpoint_deletions(), "the Join must take over the queued deletion"
    bridge_end = links(ov)["pyb" + eid[:10]]
    assert bridge_end["ifindex"] != old and bridge_end["master"] == "br0"
    assert "pyo" + eid[:10] in links(a.ns)
    a.dp.delete_endpoint(4205, eid)


def test_delete_network_does_the_deletions_queued_for_it(lab, a, network, container):
    network(a, 4206, 1400)
    ctr, moved = container(a, 4206, OVERLAY.format(43), mac(43), 1400)
    unmoved = endpoint_id()
    a.dp.create_endpoint(4206, unmoved, mac(44), 1400)
    held = Held(a.dp)
    try:
        a.dp.delete_endpoint_soon(4206, moved)
        a.dp.delete_endpoint_soon(4206, unmoved)
        deleted = threading.Thread(target=a.dp.delete_network, args=(4206,))
        deleted.start()
        wait_for(lambda: held.queued_calls() == 1, 5, "DeleteNetwork queued behind the held call")
    finally:
        held.release()
    deleted.join(10)
    assert not a.dp.pending_endpoint_deletions()
    assert not os.path.exists(a.overlay(4206))
    assert set(links(ctr)) == {"lo"} and "pyo" + unmoved[:10] not in links(a.ns)


def test_close_finishes_the_queued_deletions(lab, a, network):
    ov = network(a, 4207, 1400)
    other = lab.dataplane(a)  # as a second plugin process would: closed here
    eids = [endpoint_id() for _ in range(3)]
    for n, eid in enumerate(eids, 45):
        other.create_endpoint(4207, eid, mac(n), 1400)
    held = Held(other)
    closed = threading.Thread(target=other.close)
    try:
        for eid in eids:
            other.delete_endpoint_soon(4207, eid)
        closed.start()
        wait_for(lambda: other._thread is None, 5, "close() to begin")
    finally:
        held.release()
    closed.join(10)
    assert set(links(ov)) == {"lo", "br0", "vxlan0"}
    assert not [n for n in links(a.ns) if n.startswith("pyo")]


# -- peers ----------------------------------------------------------------------


def test_cross_host_traffic_and_ip_reuse(a, b, c, network, container):
    vni, mtu = 4301, 1350  # host c's underlay is 1400
    for host in (a, b, c):
        network(host, vni, mtu)
    ctr_a, _ = container(a, vni, OVERLAY.format(2), mac(2), mtu)
    ctr_b, eid_b = container(b, vni, OVERLAY.format(3), mac(3), mtu)
    pa = Peer(OVERLAY.format(2), mac(2), a.addr)
    pb = Peer(OVERLAY.format(3), mac(3), b.addr)

    assert unreachable(ctr_a, pb.ip)  # nothing is flooded: no peer, no traffic

    assert a.dp.set_peers(vni, [pb]) == (1, 0)
    b.dp.add_peer(vni, pa)
    assert ping(ctr_a, pb.ip)
    assert ping(ctr_b, pa.ip)

    # B's container goes; C's new one gets the same IP with another MAC.
    b.dp.delete_endpoint(vni, eid_b)
    pc = Peer(pb.ip, mac(4), c.addr)
    ctr_c, _ = container(c, vni, pc.ip, pc.mac, mtu)
    a.dp.add_peer(vni, pc)
    c.dp.add_peer(vni, pa)
    assert vxlan_entries(a.overlay(vni)) == expected_entries([pc])  # no stale IP or MAC entry
    assert a.dp.peers(vni) == {pc}
    # A container that never cached the old MAC reaches the new one at once.
    # (ctr_a still caches pb's MAC until its own ARP entry expires: the
    # container's ARP cache is outside the dataplane's reach.)
    ctr_a2, _ = container(a, vni, OVERLAY.format(5), mac(5), mtu)
    c.dp.add_peer(vni, Peer(OVERLAY.format(5), mac(5), a.addr))
    assert ping(ctr_a2, pc.ip)
    assert ping(ctr_c, OVERLAY.format(5))

    a.dp.remove_peer(vni, pc)
    assert vxlan_entries(a.overlay(vni)) == ({}, {})
    assert unreachable(ctr_a2, pc.ip)


def add_v6(ns: str, address: str) -> None:
    """address/64 on the container's eth0, usable at once (no duplicate address detection)."""
    run(ns, "ip", "-6", "addr", "add", f"{address}/64", "dev", "eth0", "nodad", check=True)


def test_dual_stack_peers_answer_neighbour_discovery_and_reuse(a, b, network, container):
    vni = 4310
    for host in (a, b):
        network(host, vni)
    ctr_a, _ = container(a, vni, OVERLAY.format(40), mac(40))
    ctr_b, _ = container(b, vni, OVERLAY.format(41), mac(41))
    add_v6(ctr_a, "fd98::40")
    add_v6(ctr_b, "fd98::41")
    pa = Peer(OVERLAY.format(40), mac(40), a.addr, ip6="fd98::40")
    pb = Peer(OVERLAY.format(41), mac(41), b.addr, ip6="fd98::41")
    assert unreachable(ctr_a, "fd98::41")  # neighbour discovery is not flooded either

    assert a.dp.set_peers(vni, [pb]) == (1, 0)
    b.dp.add_peer(vni, pa)
    # The kernel answers neighbour solicitations from vxlan0's entries, as it does ARP.
    assert ping(ctr_a, "fd98::41") and ping(ctr_b, "fd98::40") and ping(ctr_a, pb.ip)
    assert vxlan_entries(a.overlay(vni)) == ({pb.ip: pb.mac, pb.ip6: pb.mac}, {pb.mac: {b.addr}})
    assert a.dp.peers(vni) == {pb}

    # pb's IPv4 address goes to an IPv4-only endpoint with another MAC: pb's
    # IPv6 entry goes with its MAC, and a late delete of pb changes nothing.
    pc = Peer(pb.ip, mac(42), b.addr)
    a.dp.add_peer(vni, pc)
    assert vxlan_entries(a.overlay(vni)) == ({pc.ip: pc.mac}, {pc.mac: {b.addr}})
    a.dp.remove_peer(vni, pb)
    assert a.dp.peers(vni) == {pc}

    # An IPv6-only peer beside it; set_peers and peers() see both kinds.
    p6 = Peer("fd98::43", mac(43), b.addr)
    a.dp.add_peer(vni, p6)
    assert a.dp.peers(vni) == {pc, p6}
    assert a.dp.set_peers(vni, [pc, p6]) == (0, 0)
    with pytest.raises(DataplaneError, match="same IP"):
        a.dp.set_peers(vni, [pc, p6, Peer(OVERLAY.format(44), mac(44), b.addr, ip6=p6.ip)])
    a.dp.remove_peer(vni, p6)
    a.dp.remove_peer(vni, pc)
    assert vxlan_entries(a.overlay(vni)) == ({}, {})


def test_peer_replace_semantics(a, network):
    vni = 4302
    ov = network(a, vni)
    p1 = Peer(OVERLAY.format(20), mac(20), UNDERLAY.format(2))
    a.dp.add_peer(vni, p1)
    a.dp.add_peer(vni, p1)
    assert vxlan_entries(ov) == expected_entries([p1])

    p2 = Peer(p1.ip, mac(21), UNDERLAY.format(3))  # IP reused with a new MAC
    a.dp.add_peer(vni, p2)
    assert vxlan_entries(ov) == expected_entries([p2])
    a.dp.remove_peer(vni, p1)  # a late delete of the old record changes nothing
    assert vxlan_entries(ov) == expected_entries([p2])

    p3 = Peer(OVERLAY.format(22), p2.mac, UNDERLAY.format(4))  # MAC reused under a new IP
    a.dp.add_peer(vni, p3)
    assert vxlan_entries(ov) == expected_entries([p3])

    p4 = Peer(p3.ip, p3.mac, UNDERLAY.format(5))  # the container moved host
    a.dp.add_peer(vni, p4)
    a.dp.remove_peer(vni, p3)
    assert vxlan_entries(ov) == expected_entries([p4])
    assert a.dp.peers(vni) == {p4}

    a.dp.remove_peer(vni, Peer(p4.ip, p4.mac.upper(), p4.vtep))
    a.dp.remove_peer(vni, p4)
    assert vxlan_entries(ov) == ({}, {})


def test_set_peers_reconciles_exactly(a, network):
    vni = 4303
    ov = network(a, vni)
    p1, p2, p3 = (Peer(OVERLAY.format(n), mac(n), UNDERLAY.format(2)) for n in (31, 32, 33))
    for p in (p1, p2, p3):
        a.dp.add_peer(vni, p)
    # Debris a crash or an old version could leave: a flooding entry, a
    # neighbour without FDB entry, an FDB entry without neighbour.
    with IPRoute(netns=ov, flags=0, groups=0) as o:
        vx = o.link_lookup(ifname="vxlan0")[0]
        o.fdb("append", ifindex=vx, lladdr="00:00:00:00:00:00", dst=UNDERLAY.format(9))
        o.neigh("replace", dst=OVERLAY.format(34), lladdr=mac(34), ifindex=vx, state=128)
        o.fdb("append", ifindex=vx, lladdr=mac(35), dst=UNDERLAY.format(9))

    want = {
        p1,
        Peer(p2.ip, p2.mac, UNDERLAY.format(3)),
        Peer(OVERLAY.format(36), mac(36), UNDERLAY.format(3)),
        Peer("fd98::36", mac(0x36), UNDERLAY.format(3)),
    }
    assert a.dp.set_peers(vni, want) == (3, 2)
    assert vxlan_entries(ov) == expected_entries(want)
    assert a.dp.peers(vni) == want
    assert a.dp.set_peers(vni, want) == (0, 0)

    # This host's own endpoints are reached through br0, never through vxlan0.
    local = Peer(OVERLAY.format(38), mac(38), a.addr)
    assert a.dp.set_peers(vni, want | {local}) == (0, 0)
    a.dp.add_peer(vni, local)
    assert vxlan_entries(ov) == expected_entries(want)

    clash = want | {Peer(p1.ip, mac(37), UNDERLAY.format(3))}
    with pytest.raises(DataplaneError, match="same IP"):
        a.dp.set_peers(vni, clash)
    assert vxlan_entries(ov) == expected_entries(want)

    assert a.dp.set_peers(vni, []) == (0, 4)
    assert vxlan_entries(ov) == ({}, {})


def test_set_peers_1000(a, network, capsys):
    vni = 4304
    ov = network(a, vni)
    peers = {
        Peer(f"10.98.{128 + n // 250}.{n % 250 + 1}", mac(0x1000 + n), UNDERLAY.format(n % 200 + 2))
        for n in range(1000)
    }
    t0 = time.perf_counter()
    assert a.dp.set_peers(vni, peers) == (1000, 0)
    t1 = time.perf_counter()
    assert a.dp.set_peers(vni, peers) == (0, 0)
    t2 = time.perf_counter()
    ordered = sorted(peers, key=lambda p: p.ip)
    moved = {Peer(p.ip, p.mac, UNDERLAY.format(250)) for p in ordered[:10]}
    changed = (peers - set(ordered[:20])) | moved
    assert a.dp.set_peers(vni, changed) == (10, 20)
    t3 = time.perf_counter()
    assert vxlan_entries(ov) == expected_entries(changed)
    with capsys.disabled():
        print(
            f"\nset_peers 1000 peers: from empty {1000 * (t1 - t0):.0f} ms, "
            f"no-op {1000 * (t2 - t1):.0f} ms, 10 moved + 10 removed {1000 * (t3 - t2):.0f} ms"
        )


# -- flooding (-o multicast=true) --------------------------------------------------

GROUP, GROUP_PORT = "239.7.7.7", 5007

# Run in a container namespace: join GROUP on the address given, print what arrives.
_RECEIVER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton(sys.argv[1]) + socket.inet_aton(sys.argv[3]))
print("joined", flush=True)
s.settimeout(float(sys.argv[4]))
try:
    print(s.recv(100).decode(), flush=True)  # one is enough
except socket.timeout:
    pass
"""

_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[3]))
for n in range(int(sys.argv[4])):
    s.sendto(f"datagram {n}".encode(), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.05)
"""


def multicast_reaches(sender: tuple[str, str], receivers: list[tuple[str, str]], seconds: float = 1.5) -> list[bool]:
    """For each (namespace, address) receiver: did a datagram sent to GROUP from sender arrive?"""
    procs = [subprocess.Popen(["nsenter", f"--net={ns}", sys.executable, "-c", _RECEIVER, GROUP, str(GROUP_PORT),
                               ip, str(seconds)], stdout=subprocess.PIPE, text=True) for ns, ip in receivers]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "joined"
        run(sender[0], sys.executable, "-c", _SENDER, GROUP, str(GROUP_PORT), sender[1], "10", check=True)
        return ["datagram" in p.communicate(timeout=seconds + 10)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def broadcast_answered_by(ns: str, broadcast: str) -> set[str]:
    """The addresses that answer a broadcast ping from ns (a few echoes, every reply counted)."""
    out = run(ns, "ping", "-b", "-c3", "-i0.3", "-W1", "-n", broadcast).stdout
    return {line.split()[3].rstrip(":") for line in out.splitlines() if " bytes from " in line}


def test_flooding_carries_broadcast_and_multicast_to_the_flood_list_only(a, b, c, network, container):
    vni, mtu = 4306, 1350
    hosts = {"a": a, "b": b, "c": c}
    for host in hosts.values():
        network(host, vni, mtu)
    n = {"a": 40, "b": 41, "c": 42}
    ips = {h: OVERLAY.format(n[h]) for h in hosts}
    ctrs = {h: container(host, vni, ips[h], mac(n[h]), mtu)[0] for h, host in hosts.items()}
    peers = {h: Peer(ips[h], mac(n[h]), host.addr) for h, host in hosts.items()}
    for ns in ctrs.values():
        run(ns, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_broadcasts=0", check=True)
    broadcast = OVERLAY.format(255)
    def from_a() -> list[bool]:
        return multicast_reaches((ctrs["a"], ips["a"]), [(ctrs["b"], ips["b"]), (ctrs["c"], ips["c"])])

    # Unicast peers only (a network without the option): nothing is flooded.
    for h, host in hosts.items():
        host.dp.set_peers(vni, [p for o, p in peers.items() if o != h])
    assert ping(ctrs["a"], ips["b"]) and ping(ctrs["a"], ips["c"])
    assert broadcast_answered_by(ctrs["a"], broadcast) == set()
    assert from_a() == [False, False]

    # Every host floods to the others.
    for h, host in hosts.items():
        others = [p for o, p in peers.items() if o != h]
        host.dp.set_peers(vni, others, [p.vtep for p in others] + [host.addr])  # its own VTEP is left out
        assert host.dp.flood(vni) == {p.vtep for p in others}
    _, fdb = vxlan_entries(a.overlay(vni))
    assert fdb["00:00:00:00:00:00"] == {b.addr, c.addr}
    assert a.dp.peers(vni) == {peers["b"], peers["c"]}, "the flood list is no peer"
    assert wait_for_set(lambda: broadcast_answered_by(ctrs["a"], broadcast), {ips["b"], ips["c"]})
    assert from_a() == [True, True]
    # ARP is still answered locally, never flooded: a container on C that no
    # peer record names stays unreachable from A (flooded, C would answer it).
    container(c, vni, OVERLAY.format(43), mac(43), mtu)
    assert unreachable(ctrs["a"], OVERLAY.format(43))
    # br0's IGMP snooping stays on. Above, with no querier, each bridge floods
    # multicast to every port. With one (here B's bridge; as when a container
    # runs one) bridges forward by membership: queries and reports cross the
    # hosts too, so remote members are learned behind vxlan0.
    run(b.overlay(vni), "ip", "link", "set", "br0", "type", "bridge", "mcast_querier", "1", check=True)
    try:
        deadline = time.monotonic() + 15
        while (got := from_a()) != [True, True]:
            assert time.monotonic() < deadline, f"with a querier on B's bridge: {got}"
        mdb = run(a.overlay(vni), "bridge", "mdb", "show", check=True).stdout
        assert f"port vxlan0 grp {GROUP}" in mdb, mdb
    finally:
        run(b.overlay(vni), "ip", "link", "set", "br0", "type", "bridge", "mcast_querier", "0", check=True)

    # C leaves A's flood list: A's broadcasts and multicast reach B only.
    a.dp.remove_flood(vni, c.addr)
    a.dp.remove_flood(vni, c.addr)  # idempotent
    assert a.dp.flood(vni) == {b.addr}
    assert from_a() == [True, False]
    assert wait_for_set(lambda: broadcast_answered_by(ctrs["a"], broadcast), {ips["b"]})
    a.dp.add_flood(vni, c.addr)
    a.dp.add_flood(vni, c.addr)  # idempotent
    a.dp.add_flood(vni, a.addr)  # its own VTEP: never
    assert a.dp.flood(vni) == {b.addr, c.addr}

    # Reconciling without a flood list empties it (the option off, or debris).
    assert a.dp.set_peers(vni, [peers["b"], peers["c"]]) == (0, 0)
    assert a.dp.flood(vni) == set()
    assert vxlan_entries(a.overlay(vni)) == expected_entries([peers["b"], peers["c"]])


def wait_for_set(probe, want: set, timeout: float = 10.0) -> bool:
    """probe() until it returns want (the first echoes may wait on ARP); fail showing the last."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got == want:
            return True
        assert time.monotonic() < deadline, f"got {got}, expected {want}"


def test_timings(lab, c, capsys):
    """Not asserted: printed for the record (the Join path is create_endpoint)."""
    dp = lab.dataplane(c)  # a fresh instance: the first call pays for opening netlink
    vni = 4305
    try:
        t0 = time.perf_counter()
        dp.create_network(vni, 1350)
        t1 = time.perf_counter()
        eids = [endpoint_id() for _ in range(20)]
        create, delete = [], []
        for n, eid in enumerate(eids):
            t = time.perf_counter()
            dp.create_endpoint(vni, eid, mac(0x200 + n), 1350)
            create.append(time.perf_counter() - t)
        for eid in eids:
            t = time.perf_counter()
            dp.delete_endpoint(vni, eid)
            delete.append(time.perf_counter() - t)
        t2 = time.perf_counter()
        dp.delete_network(vni)
        t3 = time.perf_counter()
    finally:
        dp.delete_network(vni)
        dp.close()
    assert dp.networks() == set()
    with capsys.disabled():
        ms = lambda s: f"{1000 * s:.1f} ms"  # noqa: E731
        print(
            f"\ncreate_network {ms(t1 - t0)} (first call, opens netlink), delete_network {ms(t3 - t2)}; "
            f"create_endpoint median {ms(statistics.median(create))} "
            f"(first {ms(create[0])}, max {ms(max(create))}); "
            f"delete_endpoint median {ms(statistics.median(delete))}"
        )
