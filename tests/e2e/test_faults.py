"""Faults, through real engines, a real etcd and the real kernel (issue 6).

- crash safety: SIGKILL the plugin at random moments of the calls that make
  and unmake a container, many rounds; after each restart nothing leaks and
  nothing is lost;
- etcd outage and partition: traffic keeps flowing, new containers fail fast
  naming the store, everything recovers by itself;
- a three-member etcd cluster losing a member: invisible to Docker;
- engine restart with containers running (and the plugin restarting while
  the engine starts).
Concurrent `docker run` on three hosts is in test_concurrency.py.

etcd runs in the underlay namespace (10.99.0.254) as in test_multi_host.py.
Figures go to tests/reliability.py for docs/reliability.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from driver.state import engine_network_key
from tests.e2e.conftest import FACTORY, clear_hosts, ensure_network, etcd_and_hosts
from tests.e2e.etcd_members import members_url, reconfigure, run_keys, start_together, three_members
from tests.etcdserver import EtcdServer
from tests.hosts import IMAGE, LOCK_WAIT, UNDERLAY_ADDR, NamespaceHost, wait_for
from tests.reliability import record
from tests.seed import rng as seeded

pytestmark = pytest.mark.slow

PREFIX = "/pyoverlay/"
KILL_ROUNDS = int(os.environ.get("PYO_KILL_ROUNDS", "60"))
CONCURRENT = int(os.environ.get("PYO_CONCURRENT_RUNS", "30"))


# -- helpers -------------------------------------------------------------------


def store(etcd: EtcdServer, prefix: str = "") -> dict[str, dict]:
    """pyoverlay's keys in etcd (without PREFIX), read directly."""
    start = (PREFIX + prefix).encode()
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                 "range_end": base64.b64encode(end).decode()})
    return {base64.b64decode(kv["key"]).decode()[len(PREFIX):]: json.loads(base64.b64decode(kv["value"]))
            for kv in data.get("kvs", [])}


def run(host: NamespaceHost, name: str, net: str, *opts: str) -> str:
    host.docker("run", "-d", "--name", name, "--network", net, *opts, IMAGE, "sleep", "3600")
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', name)


def pings(host: NamespaceHost, container: str, ip: str) -> bool:
    return host.docker_proc("exec", container, "ping", "-c1", "-W1", ip, check=False).returncode == 0


def call(host: NamespaceHost, method: str, body: dict) -> dict:
    status, answer = host.plugin_request(method, body)
    assert status == 200, (method, status, answer)
    return answer


def plugin_links(host: NamespaceHost, netns: str | None = None) -> set[str]:
    return {name for name in host.links(netns) if name.startswith(("pyo", "pyb"))}


class Cluster:
    def __init__(self, etcd, factory, hosts):
        self.etcd, self.factory, self.hosts = etcd, factory, hosts

    def url(self) -> str:
        return self.etcd.url


@pytest.fixture(scope="module")
def cluster(underlay, e2e_workdir, image_tar):
    workdir = Path(e2e_workdir) / "etcd-faults"
    workdir.mkdir(exist_ok=True)
    etcd = EtcdServer(UNDERLAY_ADDR, netns=underlay.netns, workdir=str(workdir))
    with etcd_and_hosts(underlay, e2e_workdir, image_tar, 3, etcd) as (etcd, factory, hosts):
        for h in hosts:
            h.start_plugin(etcd.url)
        yield Cluster(etcd, factory, hosts)


@pytest.fixture
def hosts(request, cluster):
    request.node.stash[FACTORY] = cluster.factory
    if cluster.etcd.proc is None:
        cluster.etcd.start()
    yield cluster.hosts
    if cluster.etcd.proc is None:
        cluster.etcd.start()
    for h in cluster.hosts:
        if not h.plugin_running:
            h.start_plugin(cluster.url())
    drift_before = len(ENGINE_COUNT_DRIFT)
    clear_hosts(cluster.hosts, timeout=90, recount=lambda host, name: _recount(cluster, host, name),
                unstick=lambda host, error: _unstick(request.node.name, host, error))
    if len(ENGINE_COUNT_DRIFT) > drift_before:
        record(f"engine endpoint count after {request.node.name}",
               did="docker network rm of the test's networks, every container removed",
               held=f"refused by the engine of {', '.join(ENGINE_COUNT_DRIFT[drift_before:])} with "
                    "'has active endpoints' and none attached (Docker Engine 20.10's endpoint miscount; "
                    "the plugin had answered every call); pyoverlay's catalog recorded that host and "
                    "'restart the engine', and after a restart the removal went through",
               engine_restarts=len(ENGINE_COUNT_DRIFT) - drift_before)


#: Hosts whose engine refused `network rm` with no endpoint attached (see hosts()).
ENGINE_COUNT_DRIFT: list[str] = []


def _recount(cluster: Cluster, host: NamespaceHost, name: str) -> None:
    # Docker Engine 20.10 miscounted the network's endpoints (README, "Docker
    # Engine 20.10 and 'has active endpoints'"): pyoverlay must say so and
    # what to do, where an operator looks; then a restart recounts. Counted
    # in docs/reliability.md, not hidden.
    version = host.docker("version", "-f", "{{.Server.Version}}")
    if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= (28, 1):
        # 28.1 keeps no count (moby/moby#49812): this refusal is an endpoint
        # really left behind, not the 20.10 miscount; a restart would hide it.
        raise AssertionError(f"{host.name}: engine {version} refused to remove {name} with 'has active "
                             "endpoints' and no container attached: an endpoint was left behind")
    ENGINE_COUNT_DRIFT.append(host.name)
    print(f"\n{host.name}: engine counts endpoints on {name} with none attached; restarting it")
    key = engine_network_key(host.addr, name)
    wait_for(lambda: "systemctl restart docker" in store(cluster.etcd).get(key, {}).get("error", ""), 15,
             lambda: f"{host.name}'s catalog to say its engine miscounts {name}: {store(cluster.etcd).get(key)}")
    host.restart_engine()


def _unstick(test: str, host: NamespaceHost, error: TimeoutError) -> None:
    """`docker rm -f` hung (seen once in eight runs of the concurrency test).
    If the engine waits on pyoverlay, that is pyoverlay's failure: raised. If
    the plugin answers and no engine goroutine is inside a plugin call, the
    engine is stuck on its own locks (Docker 20.10.24 has such deadlocks under
    container churn, fixed in 20.10.27: moby/moby#46661): restart it, and
    record it with where its goroutines waited."""
    found = re.search(r"goroutine stacks in (\S+) ", str(error))
    stacks = Path(found.group(1)).read_text(errors="replace") if found else ""
    status, _ = host.plugin_request("Plugin.Activate")
    if status != 200 or not stacks or "plugins.(*Client)" in stacks:
        raise error
    # The first frame of each goroutine waiting on a lock: where the engine is stuck.
    waits = Counter(re.findall(LOCK_WAIT.pattern + r"\n(?:.*\n.*\n)*?(github\.com/docker/[^\n]*?)\([^()\n]*\)\n",
                               stacks))
    host.restart_engine()
    record(f"engine hang after {test}", did=f"docker rm -f of every container on {host.name}",
           held="did not finish in 120 s; the plugin answered and no engine goroutine was in a plugin call; "
                f"goroutines waiting on locks in: {', '.join(f'{f} x{n}' for f, n in waits.most_common(3))}; "
                f"stacks kept in {found.group(1)}; the engine restarted and the removal went through",
           engine_restarts=1)


# -- crash safety -----------------------------------------------------------------

# Seconds after sending a call at which the kill lands, drawn uniformly up to
# a little more than the call takes (measured here), so kills fall before,
# inside and after the work of the call.
KILL_WINDOW = {"RequestAddress": 0.012, "CreateEndpoint": 0.012, "Join": 0.010,
               "Leave": 0.040, "DeleteEndpoint": 0.045}
STEPS = list(KILL_WINDOW)


@pytest.mark.engine_neutral  # the plugin is called here, not by the engine (it only holds the kept containers)
def test_sigkill_at_random_points_loses_and_leaks_nothing(hosts, cluster):
    h1, h2, _ = hosts
    subnet, vni = "10.61.0.0/24", 6100
    ensure_network((h1, h2), "crash", subnet, vni)
    network_id = h1.docker("network", "inspect", "-f", "{{.Id}}", "crash")
    # Containers that must live through every kill.
    keep1, keep2 = run(h1, "keep1", "crash"), run(h2, "keep2", "crash")
    wait_for(lambda: pings(h2, "keep2", keep1), 10, "keep2 -> keep1 before the kills")
    kept_endpoints = {k for k, v in store(cluster.etcd, "endpoints/").items()}
    kept_addresses = set(store(cluster.etcd, f"addresses/{subnet.replace('/', '_')}/"))
    overlay = f"pyo-{vni}"
    kept_bridge_ports = plugin_links(h1, overlay)

    rng = seeded("test_sigkill_at_random_points_loses_and_leaks_nothing")
    killed_in: dict[str, int] = {s: 0 for s in STEPS}
    answered_before_kill = 0
    restart_seconds = []
    for round_ in range(KILL_ROUNDS):
        step = STEPS[round_ % len(STEPS)]  # every call gets its share of kills
        delay = rng.uniform(0, KILL_WINDOW[step])
        endpoint_id = rng.randbytes(32).hex()
        ep = {"NetworkID": network_id, "EndpointID": endpoint_id}
        address = None
        bodies = {
            "RequestAddress": lambda: ("IpamDriver.RequestAddress", {"PoolID": subnet, "Address": "", "Options": None}),
            "CreateEndpoint": lambda: ("NetworkDriver.CreateEndpoint", {**ep, "Interface": {"Address": address}}),
            "Join": lambda: ("NetworkDriver.Join", {**ep, "SandboxKey": "/var/run/docker/netns/crash"}),
            "Leave": lambda: ("NetworkDriver.Leave", ep),
            "DeleteEndpoint": lambda: ("NetworkDriver.DeleteEndpoint", ep),
        }
        for current in STEPS:
            method, body = bodies[current]()
            if current != step:
                answer = call(h1, method, body)
                if current == "RequestAddress":
                    address = answer["Address"]
                continue
            # The call goes out on the socket; the kill lands `delay` later.
            result: dict = {}

            def send():
                try:
                    result["answer"] = h1.plugin_request(method, body)
                except OSError as exc:
                    result["error"] = exc

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(delay)  # the random kill point itself, not a wait for a condition
            h1.kill_plugin()
            sender.join(15)
            killed_in[step] += 1
            if "answer" in result and result["answer"][0] == 200:
                answered_before_kill += 1
                if current == "RequestAddress":
                    address = result["answer"][1]["Address"]
            t0 = time.monotonic()
            h1.start_plugin(cluster.url())
            restart_seconds.append(time.monotonic() - t0)
            break
        # What the engine does next: a container whose start failed is rolled
        # back, one whose removal failed is removed again. Every such call must
        # succeed on the restarted plugin, whatever state the kill left.
        call(h1, "NetworkDriver.Leave", ep)
        call(h1, "NetworkDriver.DeleteEndpoint", ep)
        if address:
            call(h1, "IpamDriver.ReleaseAddress", {"PoolID": subnet, "Address": address.split("/")[0]})

        def clean() -> bool:
            return (set(store(cluster.etcd, "endpoints/")) == kept_endpoints
                    and set(store(cluster.etcd, f"addresses/{subnet.replace('/', '_')}/")) == kept_addresses
                    and not plugin_links(h1)
                    and plugin_links(h1, overlay) == kept_bridge_ports
                    and [n for n in h1.netns_names() if n.startswith("pyo-")] == [overlay])

        wait_for(clean, 10, lambda: f"round {round_} (kill in {step} after {delay * 1000:.1f} ms) to leave "
                 f"nothing behind: endpoints {sorted(set(store(cluster.etcd, 'endpoints/')) - kept_endpoints)}, "
                 f"addresses {sorted(set(store(cluster.etcd, 'addresses/' + subnet.replace('/', '_') + '/')) - kept_addresses)}, "
                 f"host links {plugin_links(h1)}, bridge ports {plugin_links(h1, overlay) ^ kept_bridge_ports}, "
                 f"namespaces {h1.netns_names()}")
        if round_ % 10 == 9:
            assert pings(h2, "keep2", keep1) and pings(h1, "keep1", keep2), f"kept containers cut off at round {round_}"

    # Still whole: the kept containers talk, and Docker starts a new one that reaches them.
    assert pings(h2, "keep2", keep1) and pings(h1, "keep1", keep2)
    fresh = run(h1, "fresh", "crash")
    wait_for(lambda: pings(h2, "keep2", fresh), 5, "a new container after the kills")
    record("crash safety (SIGKILL during calls)",
           did=f"{KILL_ROUNDS} rounds of SIGKILL at a random point of RequestAddress/CreateEndpoint/Join/Leave/"
               f"DeleteEndpoint ({', '.join(f'{k} {v}' for k, v in killed_in.items())}; "
               f"{answered_before_kill} answered before the kill), restart, engine-style roll-back",
           held="no leaked veth, bridge port, namespace, endpoint or address; 2 long-lived containers on two hosts "
                "reachable throughout; a new container works",
           kills=KILL_ROUNDS, leaked=0, lost=0,
           restart_median_s=round(sorted(restart_seconds)[len(restart_seconds) // 2], 2))


# -- etcd outage and partition ----------------------------------------------------

OUTAGE = float(os.environ.get("PYO_OUTAGE_SECONDS", "10"))
PING_INTERVAL = 0.2


class Pinger:
    """A ping running inside a container for the whole experiment; the lost
    count comes from ping's own summary."""

    def __init__(self, host: NamespaceHost, container: str, ip: str, seconds: float):
        self.count = int(seconds / PING_INTERVAL)
        self.thread = threading.Thread(target=self._run, args=(host, container, ip))
        self.out = ""
        self.thread.start()

    def _run(self, host, container, ip):
        self.out = host.docker_proc("exec", container, "ping", "-q", "-i", str(PING_INTERVAL), "-W", "1",
                                    "-c", str(self.count), ip, check=False, timeout=self.count * PING_INTERVAL + 60).stdout

    def result(self) -> tuple[int, int]:
        self.thread.join()
        sent, got = (int(x) for x in
                     __import__("re").search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", self.out).groups())
        return sent, got


def try_run(host: NamespaceHost, name: str, net: str):
    t0 = time.monotonic()
    proc = host.docker_proc("run", "-d", "--name", name, "--network", net, IMAGE, "sleep", "3600",
                            check=False, timeout=90)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        host.docker_proc("rm", "-f", name, check=False)
    return proc, took


def run_until_it_works(host: NamespaceHost, net: str, timeout: float) -> tuple[str, float]:
    """docker run, again and again, until one starts; (its IP, seconds taken)."""
    t0, attempt = time.monotonic(), [0]

    def attempt_run():
        attempt[0] += 1
        name = f"late{attempt[0]}"
        return name if try_run(host, name, net)[0].returncode == 0 else None

    name = wait_for(attempt_run, timeout, f"docker run on {host.name} to work again", interval=0.2)
    ip = host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', name)
    return ip, time.monotonic() - t0


@pytest.mark.engine_neutral  # the store's faults: the engine only calls
def test_etcd_outage_traffic_flows_new_runs_fail_fast_then_recover(hosts, cluster):
    h1, h2, _ = hosts
    ensure_network((h1, h2), "outage", "10.62.0.0/24", 6200)
    run(h1, "ca", "outage")
    b = run(h2, "cb", "outage")
    wait_for(lambda: pings(h1, "ca", b), 10, "a -> b before the outage")
    pids = (h1._plugin.pid, h2._plugin.pid)

    pinger = Pinger(h1, "ca", b, OUTAGE + 4)
    time.sleep(1)  # traffic flowing before the outage begins
    cluster.etcd.stop()
    down_at = time.monotonic()
    refused, took = try_run(h1, "during", "outage")
    assert refused.returncode != 0, "docker run worked with etcd down?"
    assert took < 10, f"docker run took {took:.1f}s to fail with etcd down"
    assert "etcd" in refused.stderr and cluster.etcd.endpoint.split("//")[1] in refused.stderr, refused.stderr
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))  # the outage lasts OUTAGE seconds
    cluster.etcd.start()
    up_at = time.monotonic()
    sent, got = pinger.result()
    assert sent - got == 0, f"{sent - got} of {sent} pings lost across the etcd outage:\n{pinger.out}"

    # Back: a new container on h2 starts, and h1 (whose watch saw etcd go) programs it.
    c, recovered = run_until_it_works(h2, "outage", 30)
    wait_for(lambda: pings(h1, "ca", c), 10, "h1's container to reach one started after the outage")
    reachable = time.monotonic() - up_at
    assert (h1._plugin.pid, h2._plugin.pid) == pids and h1.plugin_running and h2.plugin_running
    record("etcd outage", did=f"etcd stopped for {OUTAGE:.0f} s while a container pinged another host's every "
           f"{PING_INTERVAL} s; docker run during the outage; etcd started again",
           held=f"{got}/{sent} pings answered (0 lost); docker run failed in {took:.2f} s naming etcd and its "
                f"address; after etcd returned a new container ran in {recovered:.1f} s and was reachable from the "
                f"other host {reachable:.1f} s after etcd was back, with no plugin restart",
           outage_s=OUTAGE, pings_lost=sent - got, fail_fast_s=round(took, 2), recover_s=round(recovered, 1),
           reachable_s=round(reachable, 1))


@pytest.mark.engine_neutral  # the store's faults: the engine only calls
def test_partitioned_host_catches_up_on_missed_peer_events(hosts, cluster):
    """h1 cannot reach etcd while h2 starts a container; once the partition
    heals, h1 programs it by itself (its watch resumes where it stopped)."""
    h1, h2, _ = hosts
    ensure_network((h1, h2), "part", "10.63.0.0/24", 6300)
    a = run(h1, "ca", "part")
    run(h2, "cb", "part")
    port = cluster.etcd.client_port
    # Both ways: etcd pushes watch events on an established stream even if our ACKs are lost.
    rules = (f"table inet pyo_faults {{\n chain out {{\n  type filter hook output priority 0;\n"
             f"  ip daddr {UNDERLAY_ADDR} tcp dport {port} drop\n }}\n"
             f" chain in {{\n  type filter hook input priority 0;\n"
             f"  ip saddr {UNDERLAY_ADDR} tcp sport {port} drop\n }}\n}}\n")
    h1.run(["nft", "-f", "-"], input=rules)
    try:
        c = run(h2, "cc", "part")  # h1 misses this peer event
        refused, took = try_run(h1, "cut", "part")
        assert refused.returncode != 0 and took < 10 and "etcd" in refused.stderr, (took, refused.stderr)
        assert not pings(h1, "ca", c), "h1 reached a peer it cannot have heard of"
        time.sleep(2)  # the partition lasts a little longer: h1's watch must notice it stalled
    finally:
        h1.run(["nft", "delete", "table", "inet", "pyo_faults"])
    healed = time.monotonic()
    wait_for(lambda: pings(h1, "ca", c), 30, "h1 to program the container started while it was cut off")
    caught_up = time.monotonic() - healed
    assert pings(h2, "cc", a)
    record("etcd partition of one host", did="h1's packets to etcd dropped (nft) while h2 started a container; "
           "docker run on h1 during the partition; partition healed",
           held=f"docker run on h1 {'failed' if refused.returncode else 'worked'} after {took:.1f} s"
                f"{' naming etcd' if 'etcd' in refused.stderr else ''}; h1 applied the missed peer event "
                f"{caught_up:.1f} s after the partition healed, no restart",
           partitioned_run_s=round(took, 1), catch_up_s=round(caught_up, 1))


@contextmanager
def three_member_etcd(on, cluster, underlay):
    """Three etcd members started together, the plugins of the hosts `on`
    restarted against all three; after, those hosts cleared and back on the
    module's etcd, the members gone."""
    members = three_members(underlay)
    try:
        start_together(members)
        url = members_url(members)
        for h in on:
            h.kill_plugin()
            h.start_plugin(url)
        yield members, url
    finally:
        for h in on:
            for name in h.docker("ps", "-aq").split():
                h.docker_proc("rm", "-f", name, check=False)
            for net in h.docker("network", "ls", "-q", "--filter", "driver=pyoverlay").split():
                h.docker_proc("network", "rm", net, check=False)
            h.kill_plugin()
            h.start_plugin(cluster.url())
        for m in members:
            m.close()


@pytest.mark.engine_neutral  # the store's faults: the engine only calls
def test_losing_one_of_three_etcd_members_is_invisible(hosts, cluster, underlay):
    h1, h2, _ = hosts
    with three_member_etcd((h1, h2), cluster, underlay) as (members, url):
        ensure_network((h1, h2), "ha", "10.64.0.0/24", 6400)
        run(h1, "ca", "ha")
        b = run(h2, "cb", "ha")
        wait_for(lambda: pings(h1, "ca", b), 10, "a -> b on the three-member cluster")
        pinger = Pinger(h1, "ca", b, 8)
        time.sleep(1)
        members[0].kill()  # the first endpoint every plugin tries
        started = []
        for i in range(3):
            proc, took = try_run(h1 if i % 2 == 0 else h2, f"after{i}", "ha")
            assert proc.returncode == 0, f"docker run failed after one etcd member died: {proc.stderr}"
            started.append(took)
        ip = h2.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "ha").IPAddress}}', "after1")
        wait_for(lambda: pings(h1, "ca", ip), 10, "a to reach a container started after the member died")
        sent, got = pinger.result()
        assert sent == got, f"{sent - got} pings lost when one etcd member died"
        record("etcd cluster, one of three members killed", did="SIGKILL of the first etcd endpoint of every "
               "plugin, pings running, then 3 docker run on two hosts",
               held=f"0 of {sent} pings lost; every docker run worked (slowest {max(started):.2f} s); the new "
                    "container reachable across hosts", runs=3, errors=0, slowest_run_s=round(max(started), 2))


@pytest.mark.engine_neutral  # the store's faults: the engine only calls
def test_quorum_loss_keeps_traffic_fails_fast_and_recovers(hosts, cluster, underlay):
    """Two of three etcd members killed while containers on two hosts talk:
    the traffic goes on, `docker run` fails within seconds naming etcd; the
    members come back and pyoverlay recovers with no restart; then one
    member's data is wiped and it is removed and added again (etcdctl's
    member remove/add, through the v3 gateway): the cluster serves again."""
    h1, h2, _ = hosts
    with three_member_etcd((h1, h2), cluster, underlay) as (members, url):
        plugin_pids = {h.name: h._plugin.pid for h in (h1, h2)}
        ensure_network((h1, h2), "quorum", "10.66.0.0/24", 6600)
        run(h1, "qa", "quorum")
        b = run(h2, "qb", "quorum")
        wait_for(lambda: pings(h1, "qa", b), 10, "qa -> qb on the three-member cluster")
        pinger = Pinger(h1, "qa", b, 30)
        pinging_until = time.monotonic() + 30
        time.sleep(1)  # pings flowing before the loss
        members[0].kill()
        members[1].kill()
        lost_at = time.monotonic()
        refused, took = try_run(h1, "during", "quorum")
        assert refused.returncode != 0, "docker run worked with two of three etcd members down"
        assert took < 15, f"docker run took {took:.1f} s to fail without an etcd quorum"
        assert "etcd" in refused.stderr and f"{UNDERLAY_ADDR}:{members[2].client_port}" in refused.stderr, refused.stderr
        assert pings(h2, "qb", run_ip(h1, "qa", "quorum")), "existing containers cut off by the quorum loss"

        start_together(members[:2])  # same ports, same data
        back_at = time.monotonic()
        t0 = time.monotonic()
        wait_for(lambda: try_run(h2, "after", "quorum")[0].returncode == 0, 30,
                 "docker run to work again once the quorum is back")
        recovered = time.monotonic() - t0
        ip = run_ip(h2, "after", "quorum")
        wait_for(lambda: pings(h1, "qa", ip), 10, "qa to reach a container started after the quorum came back")
        sent, got = pinger.result()
        assert back_at < pinging_until, "the pings ended before the quorum was back: lengthen the Pinger"
        assert sent == got, f"{sent - got} of {sent} pings lost while etcd had no quorum:\n{pinger.out}"
        assert {h.name: h._plugin.pid for h in (h1, h2)} == plugin_pids, "a plugin restarted"

        # One member loses its disk: removed from the cluster, wiped, added back empty.
        gone = members[2]
        ids = {m["name"]: m["ID"] for m in members[0].request("POST", "/v3/cluster/member/list", {})["members"]}
        gone.kill()
        # If it was the leader, the others first elect one: until then the call times out.
        wait_for(lambda: reconfigure(members[0], "remove", {"ID": ids[gone.name]},
                                     lambda listed: all(m["ID"] != ids[gone.name] for m in listed)),
                 30, f"etcd to remove {gone.name}")
        shutil.rmtree(gone.data_dir)
        peer = f"http://{UNDERLAY_ADDR}:{gone.peer_port}"
        wait_for(lambda: reconfigure(members[0], "add", {"peerURLs": [peer]},
                                     lambda listed: any(peer in m.get("peerURLs", []) for m in listed)),
                 30, f"etcd to add {gone.name} back")
        gone.extra_args += ("--initial-cluster-state", "existing")  # the last one given counts
        gone.start()
        wait_for(lambda: run_keys(gone) == run_keys(members[0]), 15, "the re-added member to catch up")
        started = [h.name for h in (h1, h2)
                   if try_run(h, f"readded-{h.index}", "quorum")[0].returncode == 0]
        assert started == [h1.name, h2.name], "docker run after the member was re-added"
        listed = members[0].request("POST", "/v3/cluster/member/list", {})["members"]
        assert sorted(m.get("name") for m in listed) == ["m0", "m1", "m2"], listed
        assert pings(h1, "qa", run_ip(h2, f"readded-{h2.index}", "quorum"))
        record("etcd cluster, quorum lost (two of three members killed)",
               did="SIGKILL of two of three etcd members while a container pinged another host's every "
                   f"{PING_INTERVAL} s; docker run meanwhile; both members started again; then the third member "
                   "removed, its data wiped, added back (member remove/add) and started empty",
               held=f"{got}/{sent} pings answered (0 lost); docker run failed in {took:.1f} s naming etcd; after "
                    f"the quorum was back docker run worked in {recovered:.1f} s with no plugin restart; the "
                    "re-added member caught up and docker run worked on both hosts",
               pings_lost=sent - got, fail_fast_s=round(took, 1), recover_s=round(recovered, 1),
               no_quorum_s=round(back_at - lost_at, 1))


def run_ip(host: NamespaceHost, name: str, net: str) -> str:
    return host.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}', name)


# -- engine restarts --------------------------------------------------------------


def test_engine_restart_with_plugin_down_cleans_stale_endpoints(hosts, cluster):
    """The plugin is down while dockerd stops (so the engine cannot tell it
    about the endpoints going) and comes back while dockerd starts: no
    deadlock, the stale endpoints go, the network and the container come back."""
    h1, h2, _ = hosts
    ensure_network((h1, h2), "restart", "10.65.0.0/24", 6500)
    run(h1, "ca", "restart", "--restart", "always", "--init")
    b = run(h2, "cb", "restart")
    old = {k for k, v in store(cluster.etcd, "endpoints/").items() if v["host"] == h1.addr}
    assert len(old) == 1
    h1.kill_plugin()
    t0 = time.monotonic()
    restarting = threading.Thread(target=h1.restart_engine)
    restarting.start()
    time.sleep(1)  # the plugin comes back while the engine is stopping and starting
    h1.start_plugin(cluster.url())
    restarting.join(120)
    assert not restarting.is_alive(), "the engine did not come back (deadlock with the plugin?)"
    wait_for(lambda: h1.docker("inspect", "-f", "{{.State.Running}}", "ca") == "true", 60,
             "container a to run again after the engine restart")
    back = time.monotonic() - t0
    assert "restart" in h1.docker("network", "ls", "--format", "{{.Name}}").split()
    a = h1.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "restart").IPAddress}}', "ca")

    def clean() -> bool:
        mine = {k for k, v in store(cluster.etcd, "endpoints/").items() if v["host"] == h1.addr}
        return len(mine) == 1 and not (mine & old) and not plugin_links(h1)

    wait_for(clean, 30, lambda: f"stale endpoints to go: {store(cluster.etcd, 'endpoints/')}, links {plugin_links(h1)}")
    wait_for(lambda: pings(h2, "cb", a) and pings(h1, "ca", b), 10, "a and b to reach each other again")
    record("engine restart, plugin down meanwhile", did="plugin SIGKILLed, dockerd restarted with a "
           "restart-always container running, plugin started while dockerd was stopping/starting",
           held=f"no deadlock; engine, network and container back in {back:.1f} s; the stale endpoint removed; "
                "no leaked link; cross-host traffic again", back_s=round(back, 1), stale_left=0)
