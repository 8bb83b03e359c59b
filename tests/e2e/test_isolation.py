"""Isolation and security through real engines (issue 6).

Two hosts run pyoverlay against an etcd that demands TLS client
certificates (a CA, server and client certificates made here with openssl),
in the underlay namespace. Checked: the certificates work end to end, a
wrong one is refused with a message naming the store; the plugin socket is
root's alone; containers of different overlays do not reach each other;
VXLAN datagrams from an underlay address that is no peer VTEP never reach a
container, while a peer host's do.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, clear_hosts, ensure_network, etcd_and_hosts
from tests.etcdserver import EtcdServer, EtcdTLS
from tests.hosts import IMAGE, PLUGIN_SOCKET, PREFIX, UNDERLAY_ADDR, NamespaceHost, wait_for
from tests.reliability import record
from tests.test_isolation import SEND, vxlan_echo_request

# Plugin, store and kernel: the engine only calls (.ci/run runs these on the current engine).
pytestmark = pytest.mark.engine_neutral

OUTSIDER_INDEX = 200  # 10.99.0.200: on the underlay, never a pyoverlay host


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path, name: str) -> dict[str, str]:
    """A CA, a server certificate for the etcd address and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", f"/CN={name}-ca", "-days", "2", cwd=d)
    # etcd 3.4's JSON gateway dials etcd itself with the server certificate: it needs clientAuth too.
    for who, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (d / f"{who}.ext").write_text(f"subjectAltName=IP:{UNDERLAY_ADDR}\nextendedKeyUsage={usage}\n")
        openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={name}-{who}", cwd=d)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{who}.crt", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    return {f: str(d / f) for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def tls_args(pki: dict[str, str]) -> list[str]:
    return ["--etcd-cacert", pki["ca.crt"], "--etcd-cert", pki["client.crt"], "--etcd-key", pki["client.key"]]


class Secure:
    def __init__(self, etcd, pki, rogue, factory, hosts):
        self.etcd, self.pki, self.rogue, self.factory, self.hosts = etcd, pki, rogue, factory, hosts

    def start(self, host: NamespaceHost, pki=None) -> None:
        host.start_plugin(self.etcd.url, tls_args(pki or self.pki))


@pytest.fixture(scope="module")
def secure(underlay, e2e_workdir, image_tar):
    work = Path(e2e_workdir) / "tls"
    pki, rogue = make_pki(work / "pki", "pyo"), make_pki(work / "rogue", "rogue")
    tls = EtcdTLS(cert=pki["server.crt"], key=pki["server.key"], ca=pki["ca.crt"], client_ca=pki["ca.crt"],
                  client_cert=pki["client.crt"], client_key=pki["client.key"])
    etcd = EtcdServer(UNDERLAY_ADDR, netns=underlay.netns, tls=tls, workdir=str(work))
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 2, etcd) as (etcd, factory, hosts):
        cluster = Secure(etcd, pki, rogue, factory, hosts)
        for h in hosts:
            cluster.start(h)
        yield cluster


@pytest.fixture
def hosts(request, secure):
    request.node.stash[FACTORY] = secure.factory
    yield secure.hosts
    for h in secure.hosts:
        if not h.plugin_running:
            secure.start(h)
    clear_hosts(secure.hosts, timeout=30)


def run(host, name: str, net: str) -> tuple[str, str]:
    host.docker("run", "-d", "--name", name, "--network", net, IMAGE, "sleep", "3600")
    fmt = f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}} {{{{(index .NetworkSettings.Networks "{net}").MacAddress}}}}'
    ip, mac = host.docker("inspect", "-f", fmt, name).split()
    return ip, mac


def pings(host, container: str, ip: str) -> bool:
    return host.docker_proc("exec", container, "ping", "-c1", "-W1", ip, check=False).returncode == 0


def echo_requests(host, container: str) -> int:
    lines = [l.split() for l in host.docker("exec", container, "cat", "/proc/net/snmp").splitlines()
             if l.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InEchos")])


def test_plugin_socket_is_root_only(hosts):
    for h in hosts:
        mode = stat.S_IMODE(h.socket_path.stat().st_mode)
        assert mode == 0o600, f"{h.name}: {PLUGIN_SOCKET} has mode {oct(mode)}"
        assert h.run(["stat", "-c", "%a %U", PLUGIN_SOCKET]).stdout.split() == ["600", "root"]
    record("plugin socket permissions", did="stat of the plugin socket on each host",
           held="mode 0600, owner root: not world-writable", mode="0600")


def test_etcd_with_client_certificates_works_end_to_end(hosts, secure):
    h1, h2 = hosts
    ensure_network(hosts, "tls", "10.71.0.0/24", 7100)
    a, _ = run(h1, "ta", "tls")
    b, _ = run(h2, "tb", "tls")
    wait_for(lambda: pings(h1, "ta", b) and pings(h2, "tb", a), 10, "containers to reach each other over TLS etcd")
    # Without a client certificate (or with one another CA signed) etcd refuses
    # the TLS handshake itself; with ours, the same curl is served. An etcd that
    # is down or does not speak TLS fails differently (exit 7, 35 without the alert).
    assert etcd_curl(secure, secure.pki) == (0, '{"health":"true"}'), "control: our client certificate is served"
    for who, pki in (("no client certificate", None), ("another CA's certificate", secure.rogue)):
        code, err = etcd_curl(secure, pki)
        assert code == 35 and "alert bad certificate" in err, f"{who}: expected etcd's TLS refusal, got {code}: {err}"
    record("etcd with TLS client certificates", did="CA, server and client certificates made by the test; "
           "etcd requires client certificates; plugins on two hosts with --etcd-cacert/--etcd-cert/--etcd-key",
           held="networks and containers work across hosts; etcd refuses the TLS handshake (alert bad certificate) "
           "to a client without a certificate or with another CA's, and serves the same request with ours")


def etcd_curl(secure, client_pki) -> tuple[int, str]:
    """GET /health from the underlay; (0, body) or (curl's exit code, its error).
    TLS 1.2: there the server's verdict on the client certificate is part of
    the handshake (an alert, exit 35); in 1.3 it comes after, as a bare reset."""
    cert = ["--cert", client_pki["client.crt"], "--key", client_pki["client.key"]] if client_pki else []
    out = subprocess.run(["ip", "netns", "exec", secure.hosts[0].underlay.netns, "curl", "-sS", "--tls-max", "1.2",
                          "--max-time", "10", "--cacert", secure.pki["ca.crt"], *cert, secure.etcd.endpoint + "/health"],
                         capture_output=True, text=True)
    return out.returncode, (out.stdout if out.returncode == 0 else out.stderr).strip()


def test_wrong_client_certificate_is_refused_naming_the_store(hosts, secure):
    h1, _ = hosts
    h1.kill_plugin()
    # Our CA for the server, but a client certificate another CA signed.
    secure.start(h1, {**secure.pki, "client.crt": secure.rogue["client.crt"], "client.key": secure.rogue["client.key"]})
    made = h1.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                          "--subnet", "10.72.0.0/24", "rogue", check=False, timeout=60)
    assert made.returncode != 0, "a network was created with a certificate etcd does not trust"
    address = secure.etcd.endpoint.split("//")[1]
    assert "etcd" in made.stderr and address in made.stderr, made.stderr
    print("wrong certificate ->", made.stderr.strip())
    h1.kill_plugin()
    secure.start(h1)
    record("etcd with a wrong client certificate", did="plugin started with a client certificate of another CA; "
           "docker network create", held=f"refused; the message names etcd and {address}: "
           + made.stderr.strip().split("\n")[0][:160].replace("|", "/"))


def test_different_overlays_do_not_reach_each_other(hosts):
    h1, h2 = hosts
    ensure_network(hosts, "red", "10.73.0.0/24", 7300)
    ensure_network(hosts, "blue", "10.74.0.0/24", 7400)
    red1, _ = run(h1, "red1", "red")
    red2, _ = run(h2, "red2", "red")
    blue1, _ = run(h1, "blue1", "blue")
    blue2, _ = run(h2, "blue2", "blue")
    wait_for(lambda: pings(h1, "red1", red2) and pings(h2, "blue2", blue1), 10, "each overlay to work")
    crossings = [(h1, "red1", blue1), (h1, "red1", blue2), (h2, "blue2", red1), (h2, "blue2", red2)]
    reached = [(c, ip) for host, c, ip in crossings if pings(host, c, ip)]
    assert not reached, f"crossed from one overlay into another: {reached}"
    record("isolation between overlays", did="two overlays on two hosts; pings from each into the other, "
           "on the same host and across hosts", held="0 of 4 crossings answered; each overlay reaches itself",
           crossings=len(crossings), reached=len(reached))


def test_injected_vxlan_from_outside_never_reaches_a_container(hosts, underlay):
    h1, h2 = hosts
    vni = 7500
    ensure_network(hosts, "target", "10.75.0.0/24", vni)
    ip, mac = run(h1, "victim", "target")
    peer, _ = run(h2, "friend", "target")
    wait_for(lambda: pings(h2, "friend", ip), 10, "the peer host's container to reach the target")
    outsider = f"{PREFIX}x{OUTSIDER_INDEX}"  # named so an interrupted run's sweep removes it
    subprocess.run(["ip", "netns", "add", outsider], check=True)
    try:
        underlay.plug(OUTSIDER_INDEX, outsider, 1500)
        for cmd in (["addr", "add", f"10.99.0.{OUTSIDER_INDEX}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", outsider, *cmd], check=True)
        frame = vxlan_echo_request(vni, mac, "10.75.0.99", ip, seq=7).hex()
        drops_before, echoes_before = nft_drops(h1), echo_requests(h1, "victim")
        injected = 100
        subprocess.run(["ip", "netns", "exec", outsider, sys.executable, "-c", SEND, h1.addr, "4789", frame,
                        str(injected)], check=True)
        wait_for(lambda: nft_drops(h1) - drops_before >= injected, 5, "h1's filter to count the injected frames")
        dropped, reached = nft_drops(h1) - drops_before, echo_requests(h1, "victim") - echoes_before
        assert (dropped, reached) == (injected, 0), f"{reached} of {injected} injected frames reached the container"
        # The same frame from the peer host's VTEP is delivered: the frame is good, the source is what counts.
        h2.run([h2.python, "-c", SEND, h1.addr, "4789", frame, "3"])
        wait_for(lambda: echo_requests(h1, "victim") >= echoes_before + 3, 5, "the peer host's frames")
        assert pings(h2, "friend", ip) and pings(h1, "victim", peer)
    finally:
        underlay.unplug(OUTSIDER_INDEX)
        subprocess.run(["ip", "netns", "del", outsider], check=False)
    record("VXLAN source filter through Docker", did=f"{injected} crafted VXLAN frames to a container's IP and MAC "
           "(right VNI) from an underlay address that is no pyoverlay host; control: the same frame from the "
           "peer host", held=f"{dropped} dropped by the filter, {reached} reached the container; the peer's 3 "
           "frames and pings arrived", injected=injected, dropped=dropped, reached=reached)


def nft_drops(host) -> int:
    out = json.loads(host.run(["nft", "-j", "list", "chain", "inet", "pyoverlay", "vxlan-in"]).stdout)
    return sum(e["counter"]["packets"] for item in out["nftables"] if "rule" in item
               for e in item["rule"]["expr"] if "counter" in e)


class Capture:
    """tcpdump on every interface of one overlay namespace of a host (its
    bridge, VXLAN device and veths), text lines to a file."""

    def __init__(self, host, vni: int, path: Path):
        self.path = path
        self.out = open(path, "wb")
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(host._holder.pid), "-m", "-n", "--", "ip", "netns", "exec", f"pyo-{vni}",
             "tcpdump", "-i", "any", "-n", "-l", "-e", "-U", "net 10.76.0.0/24 or net 10.77.0.0/24"],
            stdout=self.out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        # tcpdump says "listening on" once its socket is open: only then does traffic count.
        said = []
        while not said or "listening on" not in said[-1]:
            line = self.proc.stderr.readline().decode()
            assert line, f"tcpdump on {host.name} pyo-{vni} exited: {''.join(said)}"
            said.append(line)

    def stop(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(10)
        self.out.close()
        return self.path.read_text().splitlines()


def test_twin_containers_on_two_vnis_exchange_no_frame(hosts, secure):
    """Two overlays on both hosts whose containers have the same MAC addresses
    and the same host part (.10 and .20), on VNIs 7600 and 7700. Each overlay's
    containers ping each other across hosts (ARP, unicast, broadcast) while
    tcpdump listens in all four overlay namespaces: no frame of one overlay
    (ARP included) shows up in the other's, in either direction; each
    capture does see its own overlay's traffic (the capture works).

    The subnets differ: one pyoverlay cluster refuses one subnet on two VNIs
    (its IPAM and overlays are keyed by subnet), and two clusters (two
    stores) never send each other a datagram. A leak shows all the same: a
    frame crossing VNIs carries its addresses into the other namespace, where
    the capture sees it whatever the subnet."""
    h1, h2 = hosts
    overlays = {"twin-a": ("10.76.0", 7600), "twin-b": ("10.77.0", 7700)}
    for name, (net, vni) in overlays.items():
        ensure_network(hosts, name, f"{net}.0/24", vni)
    macs = {h1: "02:42:0a:00:00:10", h2: "02:42:0a:00:00:20"}
    host_part = {h1: "10", h2: "20"}
    for name, (net, _) in overlays.items():
        for h in hosts:
            h.docker("run", "-d", "--name", f"{name}-{h.index}", "--network", name, "--ip", f"{net}.{host_part[h]}",
                     "--mac-address", macs[h], IMAGE, "sleep", "3600")
    for name, (net, _) in overlays.items():
        wait_for(lambda: pings(h1, f"{name}-{h1.index}", f"{net}.20"), 10, f"{name} across hosts")

    work = Path(secure.etcd.workdir)
    captures = {(h, name): Capture(h, vni, work / f"twin-{h.index}-{vni}.txt")
                for h in hosts for name, (_, vni) in overlays.items()}
    try:
        for name, (net, _) in overlays.items():
            for h, other in ((h1, "20"), (h2, "10")):
                c = f"{name}-{h.index}"
                h.docker_proc("exec", c, "ip", "neigh", "flush", "dev", "eth0", check=False)  # so ARP goes out again
                assert h.docker_proc("exec", c, "ping", "-c", "5", "-i", "0.2", "-W", "1", f"{net}.{other}",
                                     check=False).returncode == 0, f"{c} -> {net}.{other}"
                h.docker_proc("exec", c, "ping", "-b", "-c", "2", "-W", "1", f"{net}.255", check=False)
                h.docker_proc("exec", c, "arping", "-c", "2", "-w", "2", "-I", "eth0", f"{net}.{other}", check=False)
    finally:
        seen = {key: cap.stop() for key, cap in captures.items()}
    crossed, own = {}, {}
    for (h, name), lines in seen.items():
        mine, theirs = overlays[name][0] + ".", [n for o, (n, _) in overlays.items() if o != name][0] + "."
        crossed[f"{h.name} {name}"] = [l for l in lines if theirs in l]
        own[f"{h.name} {name}"] = sum(mine in l for l in lines)
        assert any("ARP" in l and mine in l for l in lines), f"control: no ARP of {name} captured on {h.name}"
    assert all(n > 0 for n in own.values()), f"control: a capture saw none of its own overlay's frames: {own}"
    leaked = {k: v[:5] for k, v in crossed.items() if v}
    assert not leaked, f"frames crossed between VNIs 7600 and 7700: {leaked}"
    record("isolation between twin overlays through Docker",
           did="overlays on VNIs 7600 and 7700 on two hosts, containers with the same MACs and host parts on "
               "each; unicast, broadcast and ARP across hosts, tcpdump in all four overlay namespaces",
           held=f"0 frames of one overlay in the other's namespaces (ARP included), in both directions; "
                f"{sum(own.values())} frames of their own seen", frames_own=sum(own.values()),
           frames_crossed=sum(len(v) for v in crossed.values()))
