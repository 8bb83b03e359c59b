"""Encrypted overlays (-o encrypted=true) on three real Docker engines sharing
one etcd, with the catalog on: the network is created once, on the first host,
and the option must travel to the others.

What a user relies on is checked on the wire: a capture on a host's underlay
interface while containers ping with a payload pattern (busybox ping -p) holds
the unencrypted network's pattern (so the capture does see inner frames) and
never the encrypted network's; key rotation (every 3 s here) under a steady
ping loses nothing, and the two ends of each pair agree on the pair's key;
a plugin kill and restart keeps the tunnel and its peers.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, etcd_and_hosts
from tests.hosts import IMAGE, PLUGIN_EXE, NamespaceHost, wait_for
from tests.seed import SEED, rng

CONVERGE = 10.0
ROTATION = 3  # seconds: several rotations fit in one test
DRIVER = ["-d", "pyoverlay", "--ipam-driver", "pyoverlay"]


class Cluster:
    def __init__(self, etcd, factory, hosts: list[NamespaceHost], args: dict):
        self.etcd, self.factory, self.hosts, self.args = etcd, factory, hosts, args

    def pyoverlay(self, *args: str) -> str:
        return self.hosts[0].run([PLUGIN_EXE, *args, "--store", self.etcd.url], timeout=60).stdout

    def status(self) -> dict:
        return json.loads(self.pyoverlay("status", "--json"))

    def start_plugin(self, h: NamespaceHost) -> None:
        h.start_plugin(self.etcd.url, extra_args=self.args[h.name])


def tunnel_device(h: NamespaceHost) -> str:
    return "pyw" + bytes(int(x) for x in h.addr.split(".")).hex()


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    t0 = time.monotonic()
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 3) as (etcd, factory, hosts):
        args = {h.name: ["--docker-host", f"unix://{h.dir}/docker.sock", "--key-rotation", str(ROTATION),
                         "--key-dir", f"{h.dir}/keys"] for h in hosts}
        c = Cluster(etcd, factory, hosts, args)
        for h in hosts:
            c.start_plugin(h)
        print(f"\ncluster up in {time.monotonic() - t0:.1f}s; seed {SEED}")
        try:
            yield c
        finally:
            for h in hosts:  # wireguard-go ends with its device
                h.run(["ip", "link", "del", tunnel_device(h)], check=False)


@pytest.fixture(scope="module")
def nets(cluster):
    """sec (encrypted) and plain beside it; c0 on h1, c1 on h2 on both, c2 on h3 on sec."""
    h = cluster.hosts
    h[0].docker("network", "create", *DRIVER, "--subnet", "10.61.0.0/24", "-o", "encrypted=true", "sec")
    h[0].docker("network", "create", *DRIVER, "--subnet", "10.62.0.0/24", "plain")
    wait_for(lambda: all({"sec", "plain"} <= set(networks(x)) for x in h), CONVERGE, "sec and plain on every host")
    ips = {}
    for i, host in enumerate(h):
        name = f"c{i}"
        host.docker("run", "-d", "--name", name, "--network", "sec", IMAGE, "sleep", "3600")
        if i < 2:
            host.docker("network", "connect", "plain", name)
        for net in ("sec", "plain") if i < 2 else ("sec",):
            ips[name, net] = host.docker(
                "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', name)
    yield ips
    for i, host in enumerate(h):
        host.docker("rm", "-f", f"c{i}")
    for n in ("sec", "plain"):
        cluster.pyoverlay("network", "rm", n, "--wait", "0")
    wait_for(lambda: not any(networks(x) for x in h), CONVERGE, "every pyoverlay network to go")


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory  # logs in a failure report
    return cluster.hosts


def networks(host: NamespaceHost) -> list[str]:
    return host.docker("network", "ls", "--filter", "driver=pyoverlay", "--format", "{{.Name}}").split()


def ping(host: NamespaceHost, container: str, ip: str, *opts: str) -> str:
    return host.docker_proc("exec", container, "ping", *opts, ip, check=False, timeout=90).stdout


class Capture:
    """tcpdump on a host's underlay interface (eth0), to a pcap file."""

    def __init__(self, host: NamespaceHost, path: Path):
        self.path = path
        self.err = path.with_suffix(".err")
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{host.name}", "tcpdump", "-i", "eth0",
                                          "--immediate-mode", "-n", "-U", "-s", "0", "-w", str(path)],
                                         stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: "listening on" in self.err.read_text(), 10, "tcpdump to listen")

    def wait(self, cond, what: str) -> None:
        """Until the file holds what cond looks for: a capture stopped at once
        may not have written the last packets yet (the test would then prove nothing)."""
        wait_for(lambda: cond(self.path.read_bytes()), 10, f"the capture to hold {what}")

    def stop(self) -> bytes:
        self.proc.terminate()
        self.proc.wait(10)
        return self.path.read_bytes()

    def count(self, expression: str) -> int:
        out = subprocess.run(["tcpdump", "-r", str(self.path), "-n", expression], capture_output=True,
                             text=True, timeout=30).stdout
        return len(out.splitlines())


def patterns(test: str) -> tuple[int, int]:
    """Two distinct payload bytes for ping -p (seeded: tests/seed.py)."""
    r = rng(test)
    a = r.randrange(0x30, 0xF0)
    b = r.choice([x for x in range(0x30, 0xF0) if x != a])
    return a, b


def run_of(byte: int) -> bytes:
    return bytes([byte]) * 64  # ping -s 200 -p XX: 200 bytes of XX after its 8-byte header


def test_encrypted_network_never_crosses_in_clear(cluster, hosts, nets, e2e_workdir):
    status = {n["name"]: n for n in cluster.status()["networks"]}
    assert status["sec"]["encrypted"] and not status["plain"]["encrypted"]
    assert status["sec"]["mtu"] == status["plain"]["mtu"] - 60  # the tunnel's overhead
    secret, clear = patterns("test_encrypted_network_never_crosses_in_clear")
    capture = Capture(hosts[1], Path(e2e_workdir) / "enc-capture.pcap")
    try:
        out = ping(hosts[0], "c0", nets["c1", "sec"], "-c", "3", "-i", "0.2", "-s", "200", "-p", f"{secret:02x}")
        assert " 0% packet loss" in out, out
        out = ping(hosts[0], "c0", nets["c1", "plain"], "-c", "3", "-i", "0.2", "-s", "200", "-p", f"{clear:02x}")
        assert " 0% packet loss" in out, out
        # The plain pings came after the encrypted ones: once they are in the file, so is all before them.
        capture.wait(lambda data: data.count(run_of(clear)) >= 18,  # 6 echoes, 3 runs each
                     "the plain network's pattern: it must see inner frames, or it proves nothing")
    finally:
        seen = capture.stop()
    assert run_of(clear) in seen, "the capture does not see the plain network's frames: it proves nothing"
    assert run_of(secret) not in seen, "the encrypted network's payload crossed the underlay in clear"
    assert capture.count("udp port 51820") >= 6 and capture.count("udp port 4790") == 0
    # The third host too, and an unknown option value is refused with what to do.
    assert " 0% packet loss" in ping(hosts[2], "c2", nets["c0", "sec"], "-c", "2", "-i", "0.2")
    bad = hosts[0].docker_proc("network", "create", *DRIVER, "--subnet", "10.63.0.0/24", "-o", "encrypted=yes",
                               "bad", check=False)
    assert bad.returncode != 0 and "-o encrypted=true" in bad.stderr
    assert "bad" not in networks(hosts[0])


def preshared(h: NamespaceHost) -> dict[str, str]:
    """The pair keys h's tunnel holds: peer VTEP -> key."""
    out = h.run(["wg", "show", tunnel_device(h), "dump"]).stdout.splitlines()[1:]
    return {line.split("\t")[2].rsplit(":", 1)[0]: line.split("\t")[1] for line in out}


def test_rotation_under_a_steady_ping_loses_nothing(cluster, hosts, nets):
    epochs = {k["host"]: k["epoch"] for k in cluster.status()["keys"]}
    assert set(epochs) == {h.addr for h in hosts}
    out = ping(hosts[0], "c0", nets["c1", "sec"], "-c", "40", "-i", "0.2")  # 8 s: two rotations or more
    assert "40 packets transmitted, 40 packets received" in out, out
    after = {k["host"]: k["epoch"] for k in cluster.status()["keys"]}
    assert all(after[h] >= epochs[h] + 2 for h in epochs), (epochs, after)

    def agree() -> bool:
        a, b = preshared(hosts[0]), preshared(hosts[1])
        return a.get(hosts[1].addr) == b.get(hosts[0].addr) is not None
    wait_for(agree, 5, "h1 and h2 to hold the same key for their pair")
    sec = next(n for n in cluster.status()["networks"] if n["name"] == "sec")
    assert sec["key_age"] < 3 * ROTATION  # status shows the keys' age


def test_plugin_kill_and_restart_keeps_encryption(cluster, hosts, nets, e2e_workdir):
    h = hosts[1]
    before = preshared(h)
    h.kill_plugin()
    # The tunnel is wireguard-go's, not the plugin's: traffic goes on, encrypted.
    assert " 0% packet loss" in ping(hosts[0], "c0", nets["c1", "sec"], "-c", "3", "-i", "0.2")
    cluster.start_plugin(h)
    secret, _ = patterns("test_plugin_kill_and_restart_keeps_encryption")
    capture = Capture(h, Path(e2e_workdir) / "enc-restart.pcap")
    try:
        out = ping(hosts[0], "c0", nets["c1", "sec"], "-c", "10", "-i", "0.2", "-s", "200", "-p", f"{secret:02x}")
        assert "10 packets transmitted, 10 packets received" in out, out
        # The 20 echoes (and nothing in clear) in the file before it stops: WireGuard's packets carry
        # them at 200 + 28 + 14 + 50 + 60 bytes or more; count those.
        capture.wait(lambda data: capture.count("udp port 51820 and greater 340") >= 20, "the 20 encrypted echoes")
    finally:
        seen = capture.stop()
    assert run_of(secret) not in seen
    assert set(preshared(h)) == set(before)  # the same peers, from the key file and the store
    # doctor: the tunnel's peers and pair keys are what the store and the key file say.
    def doctor() -> dict:
        out = h.run([PLUGIN_EXE, "doctor", "--json", "--store", cluster.etcd.url, "--advertise-addr", h.addr,
                     "--no-engine", "--no-dns", "--key-dir", f"{h.dir}/keys"], check=False, timeout=60).stdout
        return {c["name"]: c for c in json.loads(out)["checks"]}
    # Retried: a rotation (every 3 s here) between its reads of the store and the tunnel reads as drift.
    checks = wait_for(lambda: (c := doctor())["encryption"]["status"] == "ok" and c, 15,
                      lambda: f"doctor's encryption check to pass: {doctor()}")
    assert checks["vxlan port"]["status"] == "ok", checks
    epoch = next(k["epoch"] for k in cluster.status()["keys"] if k["host"] == h.addr)
    wait_for(lambda: next(k["epoch"] for k in cluster.status()["keys"] if k["host"] == h.addr) > epoch,
             3 * ROTATION, "the restarted plugin to rotate again")
