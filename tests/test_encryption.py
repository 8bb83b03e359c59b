"""Encrypted overlays without an engine: the key schedule (driver/keys.py,
driver/encryption.py) and the tunnel's kernel programming
(driver/dataplane/crypto.py) on two namespace "hosts".

The kernel tests run wireguard-go (scripts/setup installs it). Observations go
through ip/nft/tcpdump/ping (nsenter), not through the module under test.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from driver.dataplane import Dataplane, DataplaneError
from driver.dataplane.crypto import NFT_TABLE, RULE_PRIORITY, TABLE
from driver.encryption import Encryption, check_overlay_encrypted, encrypted_option
from driver.errors import DriverError
from driver.keys import KeyFile, LocalKeys, new_private, pair_psk, public_of
from driver.model import HostKey, Peer, TunnelPeer
from driver.state import CRYPTO, State
from driver.store import open_store
from tests.hosts import remove_tree, wait_for
from tests.seed import rng

# -- keys ---------------------------------------------------------------------------


def test_public_keys_are_rfc7748s():
    # RFC 7748, section 6.1: Alice's and Bob's public keys from their private ones.
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert public_of(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert public_of(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"


@pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools not installed")
def test_public_key_is_wireguards():
    import base64

    key = new_private()
    out = subprocess.run(["wg", "pubkey"], input=base64.b64encode(key) + b"\n", capture_output=True, check=True)
    assert base64.b64decode(out.stdout.strip()) == public_of(key)


def _host(epoch: int = 1):
    return LocalKeys(new_private(), new_private(), epoch, time.time())


def test_pair_key_is_shared_by_the_pair_only():
    r = rng("test_pair_key_is_shared_by_the_pair_only")
    a, b, c = _host(r.randint(1, 9)), _host(r.randint(1, 9)), _host()

    def psk(x, y):
        return pair_psk(x.exchange, y.exchange_public, x.static_public, y.static_public, x.epoch, y.epoch)

    assert psk(a, b) == psk(b, a)
    assert len(psk(a, b)) == 32
    # A third host, with every public key, gets another key for each pair it is in.
    assert psk(c, a) != psk(a, b) and psk(c, b) != psk(a, b)
    # A rotation on either side changes the pair's key.
    a2 = a.rotated()
    assert a2.static == a.static and a2.epoch == a.epoch + 1
    assert psk(a2, b) == psk(b, a2) != psk(a, b)


def test_pair_key_refuses_a_low_order_point():
    with pytest.raises(ValueError):
        pair_psk(new_private(), bytes(32), public_of(new_private()), public_of(new_private()), 1, 1)


def test_key_file_is_private_and_survives_a_restart(tmp_path):
    path = tmp_path / "keys" / "10.0.0.1.json"
    keys = KeyFile(str(path)).load_or_make()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert KeyFile(str(path)).load_or_make() == keys
    path.write_text("{not json")
    with pytest.raises(ValueError, match="move it away"):
        KeyFile(str(path)).load()


def test_rotation_is_due_on_schedule():
    keys = LocalKeys(new_private(), new_private(), 3, made=1000.0)
    assert keys.due(60, now=1030.0) == 30.0
    assert keys.due(60, now=1060.0) <= 0


# -- the option -----------------------------------------------------------------------


def test_encrypted_option():
    assert encrypted_option({}) is None
    assert encrypted_option({"encrypted": "true"}) is True
    assert encrypted_option({"encrypted": "false"}) is False
    with pytest.raises(DriverError, match="-o encrypted=true"):
        encrypted_option({"encrypted": "yes"})
    check_overlay_encrypted(4096, None, True)
    with pytest.raises(DriverError, match="is encrypted on other hosts"):
        check_overlay_encrypted(4096, False, True)


# -- the key sync, with a stand-in tunnel ------------------------------------------------


class StandInTunnel:
    tunnel_device = "pywstandin"

    def __init__(self, problem: str = ""):
        self.problem = problem
        self.up: bytes | None = None
        self.peers: list[TunnelPeer] = []

    def encryption_problem(self) -> str:
        return self.problem

    def underlay_mtu(self) -> int:
        return 1500

    def tunnel_up(self, private_key, port, mtu):
        self.up = private_key

    def tunnel_down(self):
        self.up, self.peers = None, []

    def set_tunnel_peers(self, peers):
        self.peers = list(peers)
        return len(self.peers), 0


def _sync(store, vtep, tmp_path, rotation=3600.0, clock=time.time):
    tunnel = StandInTunnel()
    enc = Encryption(store, tunnel, vtep, vtep, key_file=str(tmp_path / f"{vtep}.json"), rotation=rotation,
                     clock=clock)
    return enc, tunnel


def test_two_hosts_agree_and_rotation_changes_both(tmp_path):
    store = open_store("memory://")
    (a, ta), (b, tb) = _sync(store, "10.0.0.1", tmp_path), _sync(store, "10.0.0.2", tmp_path)
    for enc in (a, b):
        enc.start()
        enc.network_added(4096)
    try:
        wait_for(lambda: ta.peers and tb.peers, 5, "both tunnels to get a peer")
        assert ta.peers[0].psk == tb.peers[0].psk
        assert ta.peers[0].public == public_of(tb.up) and ta.peers[0].vtep == "10.0.0.2"
        before = ta.peers[0].psk
        b.rotate()
        wait_for(lambda: ta.peers[0].psk != before, 5, "host a to follow b's rotation")
        assert ta.peers[0].psk == tb.peers[0].psk
        assert State(store).host_keys()["10.0.0.2"].epoch == 2
        # The last encrypted network gone: b's record goes, and a drops b.
        b.network_removed(4096)
        assert tb.up is None
        wait_for(lambda: not ta.peers, 5, "host a to drop host b")
    finally:
        a.stop()
        b.stop()


def test_rotation_runs_on_schedule(tmp_path):
    store = open_store("memory://")
    enc, tunnel = _sync(store, "10.0.0.1", tmp_path, rotation=1.0)
    enc.start()
    enc.network_added(4096)
    try:
        wait_for(lambda: State(store).host_keys()["10.0.0.1"].epoch >= 3, 6, "two rotations")
        assert KeyFile(str(tmp_path / "10.0.0.1.json")).load().epoch >= 3
    finally:
        enc.stop()


def test_a_host_that_stopped_rotating_is_dropped(tmp_path):
    store = open_store("memory://")
    now = [time.time()]
    enc, tunnel = _sync(store, "10.0.0.1", tmp_path, rotation=100.0, clock=lambda: now[0])
    other = _host()
    State(store).put_host_key(HostKey("10.0.0.9", "10.0.0.9", 51820, other.static_public.hex(),
                                      other.exchange_public.hex(), 1, now[0], rotation=100.0))
    enc.start()
    enc.network_added(4096)
    try:
        wait_for(lambda: tunnel.peers, 5, "the other host as a peer")
        now[0] += 2 * 100 + 61
        assert enc.peers() == []
    finally:
        enc.stop()


def test_a_host_that_cannot_encrypt_refuses(tmp_path):
    store = open_store("memory://")
    tunnel = StandInTunnel(problem="this host cannot encrypt: wireguard-go is not installed")
    enc = Encryption(store, tunnel, "10.0.0.1", "10.0.0.1", key_file=str(tmp_path / "k.json"))
    with pytest.raises(DriverError, match="wireguard-go"):
        enc.check()
    assert not os.path.exists(tmp_path / "k.json") and State(store).host_keys() == {}


# -- the kernel: two namespace hosts with wireguard-go ---------------------------------------

UNDERLAY = "10.97.0.{}"


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=check)


def _in(ns: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
    return _sh("nsenter", f"--net={ns}", *cmd, check=check)


needs_wg = pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("nft") is None,
                              reason="wireguard-go or nft not installed (scripts/setup installs them)")


@pytest.fixture
def two_hosts():
    """Hosts 1 and 2: namespaces joined by a veth, each with its own Dataplane."""
    tmp = tempfile.mkdtemp(prefix="pyo-enc-")
    names = [f"pyoenc{os.getpid() % 10000}{n}" for n in (1, 2)]
    paths = [f"/run/netns/{n}" for n in names]
    for name in names:
        _sh("ip", "netns", "add", name)
    planes = []
    try:
        _sh("ip", "link", "add", "pyoencA", "netns", names[0], "type", "veth", "peer", "pyoencB", "netns", names[1])
        for n, (name, dev) in enumerate(zip(names, ("pyoencA", "pyoencB")), 1):
            _sh("ip", "-n", name, "addr", "add", UNDERLAY.format(n) + "/24", "dev", dev)
            _sh("ip", "-n", name, "link", "set", dev, "up")
            _sh("ip", "-n", name, "link", "set", "lo", "up")
            os.makedirs(f"{tmp}/{n}")
            planes.append(Dataplane(UNDERLAY.format(n), netns_dir=f"{tmp}/{n}", host_netns=paths[n - 1]))
        yield planes, paths
    finally:
        for plane in planes:
            try:
                plane.tunnel_down()
            except DataplaneError:
                pass
            plane.close()
        for name in names:
            _sh("ip", "netns", "del", name, check=False)
        remove_tree(tmp)


def _overlay(plane: Dataplane, n: int, vni: int, encrypted: bool) -> tuple[str, str]:
    """The overlay on host n with an address on its br0: (namespace path, br0's MAC)."""
    plane.create_network(vni, 1380, encrypted=encrypted)
    ns = plane.netns_name(vni)
    _in(ns, "ip", "addr", "add", f"10.97.{vni % 256}.{n}/24", "dev", "br0", check=True)
    mac = json.loads(_in(ns, "ip", "-j", "link", "show", "br0", check=True).stdout)[0]["address"]
    return ns, mac


def _peer_up(planes, vni, encrypted):
    (a, b) = planes
    ns_a, mac_a = _overlay(a, 1, vni, encrypted)
    ns_b, mac_b = _overlay(b, 2, vni, encrypted)
    a.add_peer(vni, Peer(f"10.97.{vni % 256}.2", mac_b, UNDERLAY.format(2)))
    b.add_peer(vni, Peer(f"10.97.{vni % 256}.1", mac_a, UNDERLAY.format(1)))
    return ns_a


def _tunnels(planes, psk_b=None):
    keys = [new_private(), new_private()]
    psk = os.urandom(32)
    for n, plane in enumerate(planes):
        plane.tunnel_up(keys[n], 51820, 1440)
    other = [1, 0]
    for n, plane in enumerate(planes):
        o = other[n]
        key = psk if n == 0 or psk_b is None else psk_b
        assert plane.set_tunnel_peers([TunnelPeer(public_of(keys[o]), UNDERLAY.format(o + 1), 51820, key)]) == (1, 0)
    return keys, psk


def _tcpdump(netns: str, *args: str) -> subprocess.Popen:
    """tcpdump of UDP on host B's underlay end, printing packets as they come;
    returned once it says it is listening (its stderr), so nothing sent after
    this can be missed."""
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(["nsenter", f"--net={netns}", "tcpdump", "-i", "pyoencB", "-n", "-l", *args, "udp"],
                            stdout=subprocess.PIPE, stderr=err, text=True)

    def listening() -> bool:
        err.seek(0)
        return "listening on" in err.read()

    wait_for(listening, 10, "tcpdump to listen")
    return proc


@needs_wg
def test_tunnel_carries_only_the_encrypted_overlay(two_hosts):
    planes, hosts = two_hosts
    keys, psk = _tunnels(planes)
    plain_ns = _peer_up(planes, 4097, encrypted=False)
    secret_ns = _peer_up(planes, 4098, encrypted=True)
    capture = _tcpdump(hosts[1], "-c", "400")
    try:
        assert _in(secret_ns, "ping", "-c3", "-i0.2", "-W2", "10.97.2.2").returncode == 0
        assert _in(plain_ns, "ping", "-c3", "-i0.2", "-W2", "10.97.1.2").returncode == 0
    finally:
        capture.terminate()
    seen = capture.communicate(timeout=10)[0]
    assert ".4789:" in seen, seen  # the plain overlay: VXLAN in clear
    assert ".51820:" in seen, seen  # the encrypted one: WireGuard
    assert ".4790:" not in seen, seen  # and never its VXLAN in clear
    # The programming: the peer's key and address, the rule, the table, the filter.
    dev = planes[0].tunnel_device
    got = planes[0].tunnel_peers()
    assert [(p.public, p.vtep, p.psk) for p in got] == [(public_of(keys[1]), UNDERLAY.format(2), psk)]
    rules = _in(hosts[0], "ip", "rule", "show", "priority", str(RULE_PRIORITY), check=True).stdout
    assert "dport 4790" in rules and f"lookup {TABLE}" in rules
    table = _in(hosts[0], "ip", "route", "show", "table", str(TABLE), check=True).stdout
    assert f"{UNDERLAY.format(2)} dev {dev}" in table and "blackhole default" in table
    assert NFT_TABLE in _in(hosts[0], "nft", "list", "tables", check=True).stdout


@needs_wg
def test_a_wrong_pair_key_carries_nothing_and_a_key_change_keeps_the_session(two_hosts):
    planes, hosts = two_hosts
    keys, psk = _tunnels(planes, psk_b=os.urandom(32))
    secret_ns = _peer_up(planes, 4099, encrypted=True)
    assert _in(secret_ns, "ping", "-c2", "-i0.2", "-W1", "10.97.3.2").returncode != 0  # no handshake
    # The same key on both sides: it works; then a new key, one side first.
    for n, plane in enumerate(planes):
        o = 1 - n
        plane.set_tunnel_peers([TunnelPeer(public_of(keys[o]), UNDERLAY.format(o + 1), 51820, psk)])
    wait_for(lambda: _in(secret_ns, "ping", "-c1", "-W1", "10.97.3.2").returncode == 0, 10, "the tunnel to carry")
    new = os.urandom(32)
    planes[0].set_tunnel_peers([TunnelPeer(public_of(keys[1]), UNDERLAY.format(2), 51820, new)])
    assert _in(secret_ns, "ping", "-c5", "-i0.2", "-W1", "10.97.3.2").returncode == 0  # the session goes on
    assert planes[0].tunnel_peers()[0].psk == new


@needs_wg
def test_no_clear_text_without_a_tunnel_route(two_hosts):
    planes, hosts = two_hosts
    for n, plane in enumerate(planes):
        plane.tunnel_up(new_private(), 51820, 1440)  # no peers: nothing routed into the tunnel
    secret_ns = _peer_up(planes, 4100, encrypted=True)
    capture = _tcpdump(hosts[1])
    try:
        assert _in(secret_ns, "ping", "-c2", "-i0.2", "-W1", "10.97.4.2").returncode != 0
    finally:
        capture.terminate()
    assert ".4790:" not in capture.communicate(timeout=10)[0]


@needs_wg
def test_tunnel_down_removes_everything_and_restart_keeps_sessions(two_hosts):
    planes, hosts = two_hosts
    keys, psk = _tunnels(planes)
    dev = planes[0].tunnel_device
    # A second tunnel_up with the same key (a plugin restart) changes nothing.
    planes[0].tunnel_up(keys[0], 51820, 1440)
    assert len(planes[0].tunnel_peers()) == 1
    planes[0].tunnel_down()
    assert dev not in _in(hosts[0], "ip", "link", "show", check=True).stdout
    assert str(RULE_PRIORITY) not in _in(hosts[0], "ip", "rule", "show", check=True).stdout
    assert NFT_TABLE not in _in(hosts[0], "nft", "list", "tables", check=True).stdout
    assert planes[0].tunnel_peers() == []


def test_cannot_encrypt_without_wireguard_go(monkeypatch):
    plane = Dataplane("10.97.0.9")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "apt-get install wireguard-go" in plane.encryption_problem()
    with pytest.raises(DataplaneError, match="wireguard-go"):
        plane.tunnel_up(new_private(), 51820, 1440)
    plane.close()


def test_store_prefix_is_states():
    assert CRYPTO == "crypto/"


# -- the driver's hooks, with stand-ins (tests/test_network.py's) ------------------------------


class RefusingEncryption:
    def __init__(self, problem: str = ""):
        self.problem, self.calls = problem, []

    def check(self):
        if self.problem:
            raise DriverError(self.problem)

    def network_added(self, vni):
        self.calls.append(("added", vni))

    def network_removed(self, vni):
        self.calls.append(("removed", vni))


def _driver(encryption):
    from driver.network import NetworkDriver
    from tests.test_network import HOST, RecordingKernel, RecordingPeers

    store = open_store("memory://")
    kernel = RecordingKernel()
    driver = NetworkDriver(State(store), kernel, RecordingPeers(), host=HOST, vtep=HOST, encryption=encryption)
    return store, kernel, driver


def _options(value):
    return {"com.docker.network.generic": {"encrypted": value}}


def test_an_encrypted_network_gets_the_tunnel_first_and_a_smaller_mtu():
    from tests.test_network import NET, POOL, VNI

    enc = RefusingEncryption()
    store, kernel, driver = _driver(enc)
    driver.create_network(NET, _options("true"), POOL, [])
    assert ("create_network", VNI, 1500 - 50 - 60, "encrypted") in kernel.calls  # VXLAN's 50, the tunnel's 60
    assert enc.calls == [("added", VNI)]
    assert driver.state.overlay(VNI).encrypted
    driver.delete_network(NET)
    assert kernel.calls[-1] == ("delete_network", VNI) and enc.calls[-1] == ("removed", VNI)


def test_a_host_that_cannot_encrypt_changes_nothing():
    from tests.test_network import NET, POOL

    enc = RefusingEncryption("this host cannot encrypt: wireguard-go is not installed; install it")
    store, kernel, driver = _driver(enc)
    with pytest.raises(DriverError, match="cannot encrypt"):
        driver.create_network(NET, _options("true"), POOL, [])
    with pytest.raises(DriverError, match="-o encrypted=maybe is not valid"):
        driver.create_network(NET, _options("maybe"), POOL, [])
    assert [c for c in kernel.calls if c[0] != "underlay_mtu"] == [] and enc.calls == []
    assert store.list("")[0] == []


def test_joining_an_encrypted_overlay_without_the_option_still_encrypts_or_refuses():
    from tests.test_network import NET, POOL, VNI

    store, kernel, driver = _driver(RefusingEncryption())
    driver.create_network(NET, _options("true"), POOL, [])
    from driver.network import NetworkDriver
    from tests.test_network import RecordingKernel, RecordingPeers

    before = sorted((kv.key, kv.value) for kv in store.list("")[0])
    other = NetworkDriver(State(store), RecordingKernel(), RecordingPeers(), host="10.0.0.99", vtep="10.0.0.99",
                          encryption=RefusingEncryption("this host cannot encrypt: install wireguard-go"))
    with pytest.raises(DriverError, match="cannot encrypt"):
        other.create_network("f" * 64, {}, POOL, [])
    with pytest.raises(DriverError, match="is encrypted on other hosts"):
        NetworkDriver(State(store), RecordingKernel(), RecordingPeers(), host="10.0.0.98", vtep="10.0.0.98",
                      encryption=RefusingEncryption()).create_network("e" * 64, _options("false"), POOL, [])
    assert sorted((kv.key, kv.value) for kv in store.list("")[0]) == before
    assert driver.state.overlay(VNI).networks.keys() == {driver.host}


def test_status_shows_encrypted_networks_and_key_age():
    from ops.commands import collect_status, render_status
    from driver.model import Overlay

    store = open_store("memory://")
    state = State(store)
    state.create_overlay(Overlay(4200, "10.42.0.0/24", 1390, {"10.0.0.1": "n" * 64}, encrypted=True), True)
    keys = _host(5)
    state.put_host_key(HostKey("10.0.0.1", "10.0.0.1", 51820, keys.static_public.hex(), keys.exchange_public.hex(),
                               5, 1000.0, rotation=3600.0))
    status = collect_status(store, now=1090.0)
    network = status["networks"][0]
    assert (network["encrypted"], network["key_age"]) == (True, 90.0)
    assert status["keys"] == [{"host": "10.0.0.1", "epoch": 5, "age": 90.0, "rotation": 3600.0}]
    assert "on (key 1m old)" in render_status(status, now=1090.0)


def test_doctor_compares_the_tunnel_with_the_store(tmp_path):
    from driver.encryption import expected_peers
    from driver.model import Network, Overlay
    from ops.checks import FAIL, OK
    from ops.doctor_crypto import check_encryption

    store = open_store("memory://")
    state = State(store)
    me, other = "10.0.0.1", "10.0.0.2"
    state.create_overlay(Overlay(4200, "10.42.0.0/24", 1390, {me: "n" * 64}, encrypted=True), True)
    state.create_network(Network("n" * 64, 4200, me, 1390, "10.42.0.0/24"))
    keys = KeyFile(str(tmp_path / f"{me}.json")).load_or_make()
    theirs = _host(2)
    for host, k in ((me, keys), (other, theirs)):
        state.put_host_key(HostKey(host, host, 51820, k.static_public.hex(), k.exchange_public.hex(), k.epoch,
                                   time.time(), rotation=3600.0))

    class Kernel:
        tunnel_device, vtep = "pywtest", me
        peers: list = []

        def tunnel_present(self):
            return True

        def tunnel_filter_present(self):
            return True

        def tunnel_peers(self):
            return self.peers

    kernel = Kernel()
    kernel.peers = expected_peers(state.host_keys(), keys, me, me, time.time())
    assert check_encryption(state, kernel, me, str(tmp_path)).status == OK
    wrong = kernel.peers[0]
    kernel.peers = [TunnelPeer(wrong.public, wrong.vtep, wrong.port, os.urandom(32))]
    check = check_encryption(state, kernel, me, str(tmp_path))
    assert check.status == FAIL and "another pair key" in check.details[0]
    kernel.peers = []
    assert "is missing" in check_encryption(state, kernel, me, str(tmp_path)).details[0]


@needs_wg
def test_a_tunnel_that_fails_to_start_leaves_nothing(two_hosts, tmp_path, monkeypatch):
    planes, hosts = two_hosts
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wireguard-go").write_text("#!/bin/sh\necho 'cannot open /dev/net/tun' >&2\nexit 1\n")
    (fake / "wireguard-go").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    with pytest.raises(DataplaneError, match="cannot open /dev/net/tun"):
        planes[0].tunnel_up(new_private(), 51820, 1440)
    assert planes[0].tunnel_device not in _in(hosts[0], "ip", "link", "show", check=True).stdout
    assert str(RULE_PRIORITY) not in _in(hosts[0], "ip", "rule", "show", check=True).stdout
    assert NFT_TABLE not in _in(hosts[0], "nft", "list", "tables", check=True).stdout
