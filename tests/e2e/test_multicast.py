"""Broadcast and multicast across hosts (-o multicast=true), on three real
Docker engines sharing one etcd, with the catalog on: the network is created
once, on the first host, and the option must travel to the others.

Containers run an image with busybox and Debian's socat (the receiver joins
a multicast group; busybox cannot). What is checked is what a user relies
on: a broadcast ping answered from the other hosts, a group joined on two
hosts receiving a third host's datagrams, nothing of either crossing without
the option, and a host with no container left dropping out of every other
host's flood list (vxlan0's all-zero FDB entries), and coming back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, etcd_and_hosts
from tests.hosts import PLUGIN_EXE, NamespaceHost, wait_for

IMAGE = "pyo-socat"
GROUP, PORT = "239.7.7.7", 5007
GROUP_HEX = "070707EF"  # GROUP as /proc/net/igmp spells it
FLOOD_MAC = "00:00:00:00:00:00"
CONVERGE = 10.0
DRIVER = ["-d", "pyoverlay", "--ipam-driver", "pyoverlay"]


def build_socat_tar(workdir: Path) -> Path:
    """A rootfs with busybox and socat plus the libraries ldd names, as a tar."""
    root = workdir / "socat-rootfs"
    for sub in ("bin", "usr/bin", "tmp", "proc", "sys", "dev", "etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox, socat = shutil.which("busybox"), shutil.which("socat")
    if not busybox or not socat:
        raise RuntimeError("busybox-static and socat are needed: ./scripts/setup installs them")
    shutil.copy2(busybox, root / "bin" / "busybox")
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    shutil.copy2(socat, root / "usr/bin/socat")
    for line in subprocess.run(["ldd", socat], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)  # follows symlinks: the real file under the name ldd uses
    tar = workdir / "socat-rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    shutil.rmtree(root)
    return tar


class Cluster:
    def __init__(self, etcd, factory, hosts: list[NamespaceHost]):
        self.etcd, self.factory, self.hosts = etcd, factory, hosts

    def pyoverlay(self, *args: str) -> str:
        return self.hosts[0].run([PLUGIN_EXE, *args, "--store", self.etcd.url], timeout=60).stdout

    def status(self) -> dict:
        return json.loads(self.pyoverlay("status", "--json"))


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    t0 = time.monotonic()
    tar = build_socat_tar(Path(e2e_workdir))
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 3) as (etcd, factory, hosts):
        for h in hosts:
            h.docker("import", "-c", 'CMD ["sh"]', str(tar), IMAGE)
            h.start_plugin(etcd.url, extra_args=["--docker-host", f"unix://{h.dir}/docker.sock"])
        print(f"\ncluster up in {time.monotonic() - t0:.1f}s")
        yield Cluster(etcd, factory, hosts)


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory  # logs in a failure report
    yield cluster.hosts
    for h in cluster.hosts:
        containers = h.docker("ps", "-aq").split()
        if containers:
            h.docker("rm", "-f", *containers)
    for n in cluster.status()["networks"]:
        if n["in_catalog"]:
            cluster.pyoverlay("network", "rm", n["name"], "--wait", "0")
    wait_for(lambda: not any(networks(h) for h in cluster.hosts), CONVERGE,
             lambda: f"every pyoverlay network to go: {[networks(h) for h in cluster.hosts]}")


# -- helpers ------------------------------------------------------------------

def networks(host: NamespaceHost) -> list[str]:
    return host.docker("network", "ls", "--filter", "driver=pyoverlay", "--format", "{{.Name}}").split()


def create_everywhere(cluster: Cluster, name: str, *args: str) -> int:
    """docker network create on the first host; the catalog makes it on the others. Its VNI."""
    cluster.hosts[0].docker("network", "create", *DRIVER, *args, name)
    wait_for(lambda: all(name in networks(h) for h in cluster.hosts), CONVERGE, f"network {name} on every host")
    return next(n["vni"] for n in cluster.status()["networks"] if n["name"] == name)


def start(host: NamespaceHost, name: str, network: str, *opts: str) -> str:
    """A container on network; its address there."""
    host.docker("run", "-d", "--name", name, "--network", network, *opts, IMAGE, "sleep", "3600")
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}', name)


def broadcast_answered_by(host: NamespaceHost, container: str, broadcast: str) -> set[str]:
    """Who answers three echoes to the broadcast address (busybox ping prints every reply)."""
    out = host.docker_proc("exec", container, "ping", "-c", "3", "-i", "0.2", "-w", "2", broadcast,
                           check=False).stdout
    return {line.split()[3].rstrip(":") for line in out.splitlines() if " bytes from " in line}


def receive(host: NamespaceHost, container: str, ip: str) -> None:
    """A receiver in container: joins GROUP on its overlay address; every
    datagram to port PORT (multicast or unicast) is appended to /tmp/got."""
    host.docker("exec", "-d", container, "socat", "-u", f"UDP4-RECV:{PORT},ip-add-membership={GROUP}:{ip}",
                "OPEN:/tmp/got,creat,append")
    wait_for(lambda: GROUP_HEX in host.docker("exec", container, "cat", "/proc/net/igmp"), CONVERGE,
             f"{host.name}: {container} to join {GROUP}")


def received(host: NamespaceHost, container: str) -> list[str]:
    return host.docker_proc("exec", container, "cat", "/tmp/got", check=False).stdout.split()


def send(host: NamespaceHost, container: str, src: str, dst: str, text: str) -> None:
    """One UDP datagram from container's overlay address src (multicast leaves by that interface)."""
    host.docker("exec", container, "sh", "-c",
                f"echo {text} | socat -u - UDP4-DATAGRAM:{dst}:{PORT},ip-multicast-if={src}")


def flood_list(host: NamespaceHost, vni: int) -> set[str]:
    """The VTEPs host's vxlan0 floods to (its all-zero FDB entry)."""
    fdb = json.loads(host.run(["bridge", "-n", f"pyo-{vni}", "-j", "fdb", "show", "dev", "vxlan0"]).stdout or "[]")
    return {e["dst"] for e in fdb if e.get("mac") == FLOOD_MAC and "dst" in e}


# -- tests ----------------------------------------------------------------------

def test_broadcast_and_multicast_reach_every_other_host(cluster, hosts):
    h1, h2, h3 = hosts
    vni = create_everywhere(cluster, "mc", "--subnet", "10.50.0.0/24", "-o", "multicast=true")
    for h in (h2, h3):  # the option travelled with the name: every engine asked for it
        assert h.docker("network", "inspect", "-f", "{{.Options.multicast}}", "mc") == "true", h.name
    answer = ["--sysctl", "net.ipv4.icmp_echo_ignore_broadcasts=0"]
    ip1 = start(h1, "mc1", "mc")
    ip2, ip3 = start(h2, "mc2", "mc", *answer), start(h3, "mc3", "mc", *answer)

    # Each host floods to the two others, and status says so.
    for h in hosts:
        wait_for(lambda: flood_list(h, vni) == {o.addr for o in hosts if o is not h}, CONVERGE,
                 lambda: f"{h.name}'s flood list: {flood_list(h, vni)}")
    (mc,) = [n for n in cluster.status()["networks"] if n["name"] == "mc"]
    assert mc["multicast"] and mc["flood"] == [h.addr for h in hosts]
    assert "on (3 hosts)" in cluster.pyoverlay("status")

    # A broadcast ping from h1 is answered from h2 and h3 (the first echo may wait on ARP).
    wait_for(lambda: broadcast_answered_by(h1, "mc1", "10.50.0.255") == {ip2, ip3}, CONVERGE,
             lambda: f"answers from {ip2} and {ip3}: {broadcast_answered_by(h1, 'mc1', '10.50.0.255')}")

    # A group joined on h2 and h3 gets h1's datagrams.
    receive(h2, "mc2", ip2)
    receive(h3, "mc3", ip3)
    sent = iter(range(1000))

    def delivered() -> bool:
        send(h1, "mc1", ip1, GROUP, f"group-{next(sent)}")
        return all(any(w.startswith("group-") for w in received(h, c)) for h, c in ((h2, "mc2"), (h3, "mc3")))

    wait_for(delivered, CONVERGE, lambda: f"h1's datagrams to {GROUP}: h2 got {received(h2, 'mc2')}, "
                                          f"h3 got {received(h3, 'mc3')}")

    # A host whose last container leaves drops out of every flood list; back with its next one.
    h3.docker("rm", "-f", "mc3")
    for h in (h1, h2):
        wait_for(lambda: flood_list(h, vni) == {o.addr for o in (h1, h2) if o is not h}, CONVERGE,
                 lambda: f"h3 to leave {h.name}'s flood list: {flood_list(h, vni)}")
    (mc,) = [n for n in cluster.status()["networks"] if n["name"] == "mc"]
    assert mc["flood"] == [h1.addr, h2.addr]
    ip3 = start(h3, "mc3", "mc", *answer)
    for h in hosts:
        wait_for(lambda: flood_list(h, vni) == {o.addr for o in hosts if o is not h}, CONVERGE,
                 lambda: f"{h.name}'s flood list with h3 back: {flood_list(h, vni)}")
    wait_for(lambda: broadcast_answered_by(h1, "mc1", "10.50.0.255") == {ip2, ip3}, CONVERGE,
             "answers from h2 and h3 again")


def test_without_the_option_nothing_crosses(cluster, hosts):
    h1, h2, h3 = hosts
    vni = create_everywhere(cluster, "plain", "--subnet", "10.51.0.0/24")
    answer = ["--sysctl", "net.ipv4.icmp_echo_ignore_broadcasts=0"]
    ip1 = start(h1, "p1", "plain")
    ip2, ip3 = start(h2, "p2", "plain", *answer), start(h3, "p3", "plain", *answer)
    receive(h2, "p2", ip2)
    receive(h3, "p3", ip3)
    wait_for(lambda: h1.docker_proc("exec", "p1", "ping", "-c1", "-W1", ip3, check=False).returncode == 0,
             CONVERGE, "unicast from h1 to h3")  # the path works: only flooding is off

    assert broadcast_answered_by(h1, "p1", "10.51.0.255") == set()
    for n in range(5):
        send(h1, "p1", ip1, GROUP, f"group-{n}")
    # Unicast after the group's datagrams, on the same path: once it is in,
    # anything of the group that was going to cross would have.
    for h, c, ip in ((h2, "p2", ip2), (h3, "p3", ip3)):
        send(h1, "p1", ip1, ip, "unicast")
        wait_for(lambda: "unicast" in received(h, c), CONVERGE, f"{h.name}: the unicast datagram")
        assert received(h, c) == ["unicast"], f"{h.name} got the group's datagrams without the option"
    assert all(flood_list(h, vni) == set() for h in hosts)
    (plain,) = [n for n in cluster.status()["networks"] if n["name"] == "plain"]
    assert plain["multicast"] is False and plain["flood"] == []


def test_a_bad_value_is_refused_and_makes_nothing(cluster, hosts):
    h1 = hosts[0]
    refused = h1.docker_proc("network", "create", *DRIVER, "--subnet", "10.52.0.0/24", "-o", "multicast=yes", "bad",
                             check=False)
    assert refused.returncode != 0
    assert "-o multicast=yes is not valid: use -o multicast=true" in refused.stderr, refused.stderr
    assert networks(h1) == [] and cluster.status()["networks"] == []
