"""Names across hosts (issue 10), on three real Docker engines sharing one etcd.

Each engine has the README's one-time setting, `"dns": ["169.254.53.53",
<upstream>]`; the upstream is a small real DNS server in the underlay
namespace (tests/dnsupstream.py) that the plugins forward to (--dns-upstream).
Containers ask as applications do, through the engine's embedded DNS
(127.0.0.11), with busybox or with a dnspython client run inside the
container's network namespace (nsenter), which also asks 169.254.53.53
directly over TCP. The cluster and most containers are made once for the
module; tests that change things (rename, removal, outages) use their own
containers. The last test kills a host.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import FACTORY, HostFactory, etcd_and_hosts
from tests.etcdserver import EtcdServer
from tests.hosts import IMAGE, PLUGIN_EXE, UNDERLAY_ADDR, NamespaceHost, wait_for

DNS_ADDR = "169.254.53.53"
EMBEDDED = "127.0.0.11"
UPSTREAM_PORT = 53
EXT_NAME, EXT_ADDR = "ext.test", "192.0.2.10"
BIG_NAME, BIG_COUNT = "big.test", 40  # 40 TXT records of ~60 bytes: over 512, so TC on UDP
# The upstream answers these cluster names too: a query the resolver should
# refuse (NXDOMAIN) but forwards instead gets this address.
DECOY, DECOYED = "192.0.2.66", ("gamma", "gamma.db", "alpha")
NAMES_TTL = 3  # seconds a dead host's names outlive it (--names-ttl)
CONVERGE = 15.0
ROOT = Path(__file__).resolve().parents[2]


class Cluster:
    def __init__(self, etcd: EtcdServer, factory: HostFactory, hosts: list[NamespaceHost]):
        self.etcd = etcd
        self.factory = factory
        self.hosts = hosts
        self.ips: dict[str, str] = {}  # container -> address on its first network

    def start_plugin(self, host: NamespaceHost) -> None:
        host.start_plugin(self.etcd.url, extra_args=[
            "--docker-host", f"unix://{host.dir}/docker.sock",
            "--dns-upstream", f"{UNDERLAY_ADDR}:{UPSTREAM_PORT}", "--names-ttl", str(NAMES_TTL)])

    def pyoverlay(self, host: NamespaceHost, *args: str, check: bool = False):
        return host.run([PLUGIN_EXE, *args, "--store", self.etcd.url], check=check, timeout=60)


def run(host: NamespaceHost, name: str, *opts: str) -> str:
    """A container that stops at once on SIGTERM (--init); its first network's address."""
    host.docker("run", "-d", "--init", "--name", name, *opts, IMAGE, "sleep", "3600")
    return host.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                       name).split()[0]


def pid_of(host: NamespaceHost, container: str) -> str:
    return host.docker("inspect", "-f", "{{.State.Pid}}", container)


def query(host: NamespaceHost, container: str, qname: str, qtype: str = "A", server: str = EMBEDDED,
          tcp: bool = False, until: str = "", timeout: float = 3.0, ready: str = "") -> dict:
    """Ask from inside the container's network namespace (dnspython: tests/dnsquery.py)."""
    cmd = ["nsenter", "-t", pid_of(host, container), "-n", sys.executable, "-P", str(ROOT / "tests" / "dnsquery.py"),
           server, qname, qtype, "--timeout", str(timeout)]
    cmd += ["--tcp"] if tcp else []
    cmd += ["--until", until] if until else []
    cmd += ["--ready", ready] if ready else []
    return json.loads(host.run(cmd, timeout=timeout + 30).stdout)


def resolves(host: NamespaceHost, container: str, qname: str, qtype: str = "A", **kw) -> list[str]:
    return query(host, container, qname, qtype, **kw)["answers"]


def rcode(host: NamespaceHost, container: str, qname: str, qtype: str = "A", **kw) -> str:
    return query(host, container, qname, qtype, **kw)["rcode"]


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    upstream = underlay.spawn(
        [sys.executable, "-P", str(ROOT / "tests" / "dnsupstream.py"), UNDERLAY_ADDR, str(UPSTREAM_PORT),
         "--a", f"{EXT_NAME}={EXT_ADDR}", "--txt-big", f"{BIG_NAME}={BIG_COUNT}",
         *(f"--a={name}={DECOY}" for name in DECOYED)], "dnsupstream.log")
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 3,
                        daemon_config={"dns": [DNS_ADDR, UNDERLAY_ADDR]}) as (etcd, factory, hosts):
        c = Cluster(etcd, factory, hosts)
        for h in hosts:
            c.start_plugin(h)
        h1, h2, h3 = hosts
        # The catalog takes each network to every host.
        for name, subnet, extra in (("web", "10.60.0.0/24", ()), ("db", "10.61.0.0/24", ()),
                                    ("sealed", "10.62.0.0/24", ("--internal",))):
            h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", subnet,
                      *extra, name)
        wait_for(lambda: all(h.docker_proc("network", "inspect", n, check=False).returncode == 0
                             for h in hosts for n in ("web", "db", "sealed")), CONVERGE, "networks on every host")
        assert upstream.poll() is None, (underlay.dir / "dnsupstream.log").read_text()
        c.ips["alpha"] = run(h1, "alpha", "--network", "web", "--network-alias", "www")
        c.ips["beta"] = run(h2, "beta", "--network", "web")
        c.ips["gamma"] = run(h3, "gamma", "--network", "db")
        c.ips["delta"] = run(h3, "delta", "--network", "web")
        c.ips["inner"] = run(h2, "inner", "--network", "sealed")
        c.ips["inner3"] = run(h3, "inner3", "--network", "sealed")
        c.ips["plain"] = run(h1, "plain")  # the default bridge
        yield c


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory  # logs in a failure report
    yield cluster.hosts
    for h in cluster.hosts:
        if not h.plugin_running and h.docker_proc("info", check=False, timeout=10).returncode == 0:
            cluster.start_plugin(h)


def answered(host, container, qname, want: list[str], **kw):
    """Wait for qname to answer exactly want (a restart or a watch in flight)."""
    seen = []

    def ok():
        seen[:] = [query(host, container, qname, **kw)]
        return sorted(seen[0]["answers"]) == sorted(want)

    def why() -> str:
        # Which hop failed: the engine's resolver, or pyoverlay's (asked directly from the container).
        direct = query(host, container, qname, server=DNS_ADDR) if kw.get("server", EMBEDDED) == EMBEDDED else None
        return (f"{qname} from {container} on {host.name} to answer {want}: got {seen}; "
                f"pyoverlay's resolver asked directly: {direct}")

    wait_for(ok, CONVERGE, why)


# -- what resolves ---------------------------------------------------------------

def test_a_container_on_another_host_by_name(cluster, hosts):
    h1, h2, h3 = hosts
    answered(h2, "beta", "alpha", [cluster.ips["alpha"]])  # the first query may race the publisher
    assert resolves(h3, "delta", "alpha") == [cluster.ips["alpha"]]
    assert resolves(h1, "alpha", "beta") == [cluster.ips["beta"]]
    # As an application asks (busybox's resolver, then traffic to the answer).
    assert h2.docker_proc("exec", "beta", "ping", "-c1", "-W2", "alpha", check=False).returncode == 0
    assert h3.docker_proc("exec", "delta", "ping", "-c1", "-W2", "beta", check=False).returncode == 0


def test_network_alias(cluster, hosts):
    h1, h2, h3 = hosts
    answered(h2, "beta", "www", [cluster.ips["alpha"]])
    assert resolves(h3, "delta", "WWW") == [cluster.ips["alpha"]]


def test_name_dot_network(cluster, hosts):
    h1, h2, h3 = hosts
    answered(h2, "beta", "alpha.web", [cluster.ips["alpha"]])
    assert resolves(h2, "beta", "delta.web") == [cluster.ips["delta"]]


def test_reverse_lookup(cluster, hosts):
    h1, h2, h3 = hosts
    reverse = ".".join(reversed(cluster.ips["alpha"].split("."))) + ".in-addr.arpa"
    answered(h2, "beta", reverse, ["alpha.web."], qtype="PTR")
    out = h2.docker("exec", "beta", "nslookup", cluster.ips["delta"])
    assert "delta.web" in out, out


def test_a_dual_stack_container_on_another_host_answers_aaaa(cluster, hosts):
    """AAAA for a dual-stack container's IPv6 address, A as before, across
    hosts (the network made on h1, on h2 through the catalog)."""
    h1, h2, _ = hosts
    h1.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--ipv6",
              "--subnet", "10.63.0.0/24", "--subnet", "fd00:63::/64", "ds")
    try:
        wait_for(lambda: h2.docker_proc("network", "inspect", "ds", check=False).returncode == 0, CONVERGE,
                 "network ds on h2 from the catalog")
        v4 = run(h1, "kappa", "--network", "ds")
        v6 = h1.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}", "kappa")
        run(h2, "lambda", "--network", "ds")
        answered(h2, "lambda", "kappa", [v6], qtype="AAAA")
        assert resolves(h2, "lambda", "kappa") == [v4]
        assert resolves(h2, "lambda", "kappa.ds", "AAAA") == [v6]
    finally:
        h1.docker_proc("rm", "-f", "kappa", check=False)
        h2.docker_proc("rm", "-f", "lambda", check=False)
        h1.docker_proc("network", "rm", "ds", check=False)
        wait_for(lambda: h2.docker_proc("network", "inspect", "ds", check=False).returncode != 0, CONVERGE,
                 "network ds to go from h2")


def test_a_name_on_a_network_the_querier_is_not_on_is_not_answered(cluster, hosts):
    h1, h2, h3 = hosts
    answered(h3, "gamma", "gamma", [cluster.ips["gamma"]])  # published: a cluster name now
    # delta shares no network with gamma (db), although on its host
    for host, container in ((h2, "beta"), (h3, "delta")):
        reply = query(host, container, "gamma")
        assert reply["rcode"] == "NXDOMAIN" and reply["answers"] == [], reply
        assert query(host, container, "gamma.db")["rcode"] == "NXDOMAIN"
    # and the other way round: gamma does not see web's containers
    assert query(h3, "gamma", "alpha")["rcode"] == "NXDOMAIN"


def test_other_names_are_forwarded_to_the_upstream_udp_and_tcp(cluster, hosts):
    h1, h2, h3 = hosts
    assert resolves(h2, "beta", EXT_NAME) == [EXT_ADDR]  # through the embedded DNS
    assert resolves(h2, "beta", EXT_NAME, server=DNS_ADDR) == [EXT_ADDR]
    assert resolves(h2, "beta", EXT_NAME, server=DNS_ADDR, tcp=True) == [EXT_ADDR]
    # Too big for UDP: relayed truncated there, whole over TCP.
    udp = query(h2, "beta", BIG_NAME, "TXT", server=DNS_ADDR)
    assert udp["tc"] and len(udp["answers"]) < BIG_COUNT, udp
    tcp = query(h2, "beta", BIG_NAME, "TXT", server=DNS_ADDR, tcp=True)
    assert not tcp["tc"] and len(tcp["answers"]) == BIG_COUNT, tcp
    assert query(h2, "beta", "missing.test")["rcode"] == "NXDOMAIN"  # the upstream's own answer


def test_a_default_bridge_container_still_resolves_upstream_names(cluster, hosts):
    h1, h2, h3 = hosts
    out = h1.docker("exec", "plain", "nslookup", EXT_NAME)
    assert EXT_ADDR in out, out
    assert resolves(h1, "plain", EXT_NAME, server=DNS_ADDR, tcp=True) == [EXT_ADDR]
    # and no cluster name: on no pyoverlay network, everything it asks is forwarded
    assert resolves(h1, "plain", "alpha", server=DNS_ADDR) == [DECOY]


def test_internal_network_resolves_cluster_names(cluster, hosts):
    h1, h2, h3 = hosts
    answered(h2, "inner", "inner3", [cluster.ips["inner3"]])
    assert resolves(h3, "inner3", "inner") == [cluster.ips["inner"]]
    assert h2.docker_proc("exec", "inner", "ping", "-c1", "-W2", "inner3", check=False).returncode == 0
    assert resolves(h2, "inner", EXT_NAME) == [EXT_ADDR]  # forwarded by the resolver; no route out
    assert query(h2, "inner", "alpha")["rcode"] == "NXDOMAIN"  # web is not its network


def test_rename(cluster, hosts):
    h1, h2, h3 = hosts
    ip = run(h3, "kappa", "--network", "web")
    answered(h2, "beta", "kappa", [ip])
    h3.docker("rename", "kappa", "kappa2")
    answered(h2, "beta", "kappa2", [ip])
    assert query(h2, "beta", "kappa")["rcode"] == "NXDOMAIN"
    h3.docker("rm", "-f", "kappa2")


def _watch(host, container, qname, until, workdir: Path, tag: str, results: dict) -> threading.Thread:
    """A query loop in the container, started now; results[tag] gets its outcome."""
    ready = workdir / f"ready-{tag}"
    ready.unlink(missing_ok=True)

    def loop():
        results[tag] = query(host, container, qname, until=until, timeout=10, ready=str(ready))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    wait_for(ready.exists, 20, f"the query loop in {container} on {host.name}")
    return thread


def test_a_new_name_answers_on_every_other_host_within_a_second(cluster, hosts, e2e_workdir):
    h1, h2, h3 = hosts
    results: dict = {}
    threads = [_watch(h2, "beta", "newbie", "answer", e2e_workdir, "h2", results),
               _watch(h3, "delta", "newbie", "answer", e2e_workdir, "h3", results)]
    ip = run(h1, "newbie", "--network", "web")
    returned = time.time()
    for t in threads:
        t.join(30)
    for tag, result in results.items():
        assert result["held"] and result["answers"] == [ip], (tag, result)
        print(f"newbie answered on {tag} {result['at'] - returned:+.3f} s after docker run returned")
        assert result["at"] - returned < 1.0, (tag, result)


def test_a_removed_name_is_gone_within_a_second(cluster, hosts, e2e_workdir):
    h1, h2, h3 = hosts
    ip = run(h1, "shortlived", "--network", "web")
    answered(h2, "beta", "shortlived", [ip])
    answered(h3, "delta", "shortlived", [ip])
    results: dict = {}
    threads = [_watch(h2, "beta", "shortlived", "nxdomain", e2e_workdir, "h2", results),
               _watch(h3, "delta", "shortlived", "nxdomain", e2e_workdir, "h3", results)]
    h1.docker("rm", "-f", "shortlived")
    returned = time.time()
    for t in threads:
        t.join(30)
    for tag, result in results.items():
        assert result["held"] and result["answers"] == [], (tag, result)
        print(f"shortlived gone on {tag} {result['at'] - returned:+.3f} s after docker rm -f returned")
        assert result["at"] - returned < 1.0, (tag, result)


def test_status_lists_names_per_network(cluster, hosts):
    h1, h2, h3 = hosts
    status = json.loads(cluster.pyoverlay(h2, "status", "--json", check=True).stdout)
    web = next(n for n in status["networks"] if n["name"] == "web")
    names = {entry["name"]: entry for entry in web["names"]}
    assert names["alpha"]["address"] == cluster.ips["alpha"] and "www" in names["alpha"]["aliases"]
    assert names["alpha"]["host"] == h1.addr and names["delta"]["host"] == h3.addr
    assert "gamma" not in names
    text = cluster.pyoverlay(h2, "status", check=True).stdout
    assert "NAMES" in text and "www" in text


def test_doctor_checks_the_resolver_and_the_daemon_config(cluster, hosts):
    h1, h2, h3 = hosts
    out = cluster.pyoverlay(h1, "doctor", "--advertise-addr", h1.addr, "--json",
                            "--docker-host", f"unix://{h1.dir}/docker.sock",
                            "--daemon-json", str(h1.dir / "daemon.json")).stdout
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["dns resolver"]["status"] == "ok", checks["dns resolver"]
    assert checks["dns daemon config"]["status"] == "ok", checks["dns daemon config"]
    other = h1.dir / "other-daemon.json"
    other.write_text('{"dns": ["10.0.0.2"]}\n')
    out = cluster.pyoverlay(h1, "doctor", "--advertise-addr", h1.addr, "--json", "--no-engine",
                            "--daemon-json", str(other)).stdout
    check = {c["name"]: c for c in json.loads(out)["checks"]}["dns daemon config"]
    assert check["status"] == "warn" and "dns-config --write" in check["summary"], check


# -- faults ------------------------------------------------------------------------

def test_etcd_outage_known_names_keep_resolving_new_ones_follow(cluster, hosts):
    h1, h2, h3 = hosts
    ip = run(h1, "omega", "--network", "web")
    answered(h2, "beta", "omega", [ip])
    cluster.etcd.stop()
    try:
        h1.docker("rename", "omega", "omega-new")  # needs no store: the name change waits for it
        for _ in range(3):
            assert resolves(h2, "beta", "alpha") == [cluster.ips["alpha"]]
            assert resolves(h3, "delta", "omega") == [ip]  # the last view, while the store is away
            assert resolves(h2, "beta", EXT_NAME) == [EXT_ADDR]
            time.sleep(0.5)
    finally:
        cluster.etcd.start()
    answered(h2, "beta", "omega-new", [ip])
    answered(h3, "delta", "omega-new", [ip])
    assert all(h.plugin_running for h in hosts)  # no restart needed
    h1.docker("rm", "-f", "omega-new")


def test_plugin_killed_upstream_names_keep_resolving_cluster_names_come_back(cluster, hosts):
    h1, h2, h3 = hosts
    h2.kill_plugin()
    # The engine moves on to the next server (the upstream) when nothing listens.
    assert resolves(h2, "beta", EXT_NAME) == [EXT_ADDR]
    assert h2.docker("exec", "beta", "nslookup", EXT_NAME).count(EXT_ADDR) == 1
    cluster.start_plugin(h2)
    answered(h2, "beta", "alpha", [cluster.ips["alpha"]])
    answered(h1, "alpha", "beta", [cluster.ips["beta"]])  # its own names are published again


def test_a_host_that_dies_takes_its_names_with_it(cluster, hosts):
    h1, h2, h3 = hosts
    answered(h2, "beta", "delta", [cluster.ips["delta"]])
    h3.kill_plugin()
    h3.kill_engine()
    died = time.monotonic()
    answered(h2, "beta", "delta", [])
    gone = time.monotonic() - died
    print(f"delta's name went {gone:.1f} s after its host died (lease {NAMES_TTL} s)")
    assert query(h2, "beta", "delta")["rcode"] == "NXDOMAIN"
    assert resolves(h2, "beta", "alpha") == [cluster.ips["alpha"]]
