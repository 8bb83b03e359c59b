"""A soak: container churn on three hosts for a bounded time, with plugin
SIGKILLs and an etcd restart on the way, then a check that nothing leaked.

Used by tests/e2e/test_soak.py (2 minutes, in CI) and bench/soak.py (10
minutes by default). On the e2e harness's hosts (tests/hosts.py) and etcd
(tests/etcdserver.py); every random choice comes from one seed
(tests/seed.py).

What is measured: every few seconds, each plugin's memory (Rss and Pss of
the gunicorn master and worker) and open file descriptors. The last host's
plugin is never killed, so its samples span the whole run: their slope
(least squares, per minute, after a warm-up) is what "flat" is judged on
(every host's samples are kept, for bench/soak.py --json).

What is checked at the end, against the kernel and the store as they are
(not as pyoverlay reports them): the store holds exactly one endpoint and
one address per live container (plus the gateway); no host has a pyoverlay
veth left in its own namespace, each overlay bridge has one port per live
container there, no overlay namespace but the network's; the nft filter
table holds the same rules and exactly the VTEPs of the other hosts with
live containers; every live
container answers a ping from a container on every host.
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from bench.env import child_pids, rss_kb
from tests.hosts import IMAGE, wait_for

PREFIX = "/pyoverlay/"
NETWORK, SUBNET, VNI = "soak", "10.67.0.0/24", 6700
LIVE_MAX = 6  # containers per host at most
SAMPLE_EVERY = 5.0
WARM_UP = 20.0  # seconds before samples count towards the slope
FD_BASELINE = 0.6  # fraction of the run: the fd growth that counts is from there (Report.figures)
#: A docker run may fail when a fault (its host's plugin killed, etcd
#: restarted) happened while it ran or up to this long before it began.
FAULT_GRACE = 5.0
SWEEP_WAIT = 60 + 2 * 10 + 30  # driver/sweep.py's GRACE and EVERY, and the 30 s this always had
REACH = r'for ip in "$@"; do (ping -c1 -W2 "$ip" >/dev/null 2>&1 && echo "ok $ip" || echo "no $ip") & done; wait'


def plugin_usage(host) -> tuple[int, int, int]:
    """(Rss kB, Pss kB, open fds) of the host's plugin: the gunicorn master and
    its workers. Not their children: a worker's short forks (pyroute2's netns
    helper, a fork that holds every fd of the worker; nft) come and go between
    samples, and are not the plugin's own."""
    rss = pss = fds = 0
    master = host._plugin.pid
    for pid in [master] + child_pids(master):
        r, p = rss_kb(pid)
        rss, pss = rss + r, pss + p
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return rss, pss, fds


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) pairs, per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / var if var else 0.0


@dataclass
class Report:
    seconds: float = 0.0
    runs: int = 0
    removals: int = 0
    failed_runs: int = 0  # while a plugin or etcd was down: expected, counted
    plugin_kills: int = 0
    etcd_restarts: int = 0
    live: int = 0
    samples: dict[str, list[tuple[float, int, int, int]]] = field(default_factory=dict)
    steady: str = ""  # the host whose plugin was never killed
    engine_restarts: int = 0  # Docker 20.10's own deadlocks (see unstick)
    pings_missed: int = 0

    def figures(self) -> dict:
        steady = [s for s in self.samples.get(self.steady, []) if s[0] >= WARM_UP]
        first, last = (steady[0], steady[-1]) if steady else ((0, 0, 0, 0),) * 2
        # The plugin's fds grow as it warms up (each of gunicorn's 8 request
        # threads opens its own etcd connection when it first serves a call,
        # which on the never-killed host takes minutes): three runs started at
        # 89, 97 and 103 fds and all ended at 107. Leaks are judged from a
        # warm baseline, the first sample past FD_BASELINE of the run.
        late = [s for s in steady if s[0] >= FD_BASELINE * self.seconds] or [last]
        return {
            "minutes": round(self.seconds / 60, 1), "docker_runs": self.runs, "removals": self.removals,
            "failed_runs": self.failed_runs, "plugin_kills": self.plugin_kills, "etcd_restarts": self.etcd_restarts,
            "live_at_end": self.live, "engine_restarts": self.engine_restarts,
            "rss_kb_start": first[1], "rss_kb_end": last[1],
            "rss_slope_kb_per_min": round(slope_per_minute([(s[0], s[1]) for s in steady]), 1),
            "pss_slope_kb_per_min": round(slope_per_minute([(s[0], s[2]) for s in steady]), 1),
            "fds_start": first[3], "fds_warm": late[0][3], "fds_end": last[3],
            "fd_slope_per_min": round(slope_per_minute([(s[0], s[3]) for s in steady]), 2),
            "pings_missed_then_answered": self.pings_missed,
        }


class Soak:
    def __init__(self, hosts, etcd, seconds: float, rng: random.Random, log: Callable[[str], None] = print,
                 kill_every: float = 25.0, unstick: Callable | None = None):
        """unstick(host, TimeoutError): a docker call hung; raise unless the engine
        was got going again (tests/e2e/test_faults.py's _unstick)."""
        self.hosts, self.etcd, self.seconds, self.rng, self.log = hosts, etcd, seconds, rng, log
        self.kill_every = kill_every
        self.unstick = unstick
        self.report = Report(steady=hosts[-1].name)
        self._live: dict[str, list[str]] = {h.name: [] for h in hosts}
        self._names = iter(range(10**9))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[str] = []
        self._fault_log: list[tuple[float, str]] = []  # (seconds, host name or "etcd")
        self._t0 = 0.0

    # -- the run --------------------------------------------------------------
    def run(self) -> Report:
        from tests.e2e.conftest import ensure_network

        ensure_network(self.hosts, NETWORK, SUBNET, VNI)
        self._nft_before = {h.name: nft_rules(h) for h in self.hosts}
        self._t0 = time.monotonic()
        threads = [threading.Thread(target=self._churn, args=(h, random.Random(self.rng.random())), daemon=True)
                   for h in self.hosts]
        threads += [threading.Thread(target=self._sample, daemon=True), threading.Thread(target=self._faults, daemon=True)]
        for t in threads:
            t.start()
        self._stop.wait(self.seconds)
        self._stop.set()
        for t in threads:
            t.join(180)
        self.report.seconds = time.monotonic() - self._t0
        assert not self._errors, "soak: " + "; ".join(self._errors[:5])
        for h in self.hosts:  # anything a fault left half made goes, as an operator would clean up
            if not h.plugin_running:
                h.start_plugin(self.etcd.url)
        return self.report

    def _churn(self, host, rng: random.Random) -> None:
        while not self._stop.is_set():
            live = self._live[host.name]
            try:
                if len(live) < LIVE_MAX and (not live or rng.random() < 0.6):
                    name = f"s{next(self._names)}"
                    began = self._now()
                    made = host.docker_proc("run", "-d", "--name", name, "--network", NETWORK, IMAGE, "sleep", "3600",
                                            check=False, timeout=120)
                    if made.returncode == 0:
                        live.append(name)
                        with self._lock:
                            self.report.runs += 1
                    else:
                        self._failed(host, began, made.stderr.strip())
                        host.docker_proc("rm", "-f", name, check=False, timeout=120)
                else:
                    name = live.pop(rng.randrange(len(live)))
                    host.docker_proc("rm", "-f", name, check=False, timeout=120)
                    with self._lock:
                        self.report.removals += 1
            except TimeoutError as exc:
                try:
                    if self.unstick is None:
                        raise
                    self.unstick(host, exc)  # restarted the engine: its containers stopped
                    self.report.engine_restarts += 1
                    live[:] = host.docker("ps", "-q", "--filter", f"network={NETWORK}").split()
                except Exception as exc2:  # noqa: BLE001 - reported by run()
                    self._errors.append(f"{host.name}: {exc2}")
                    return
            except Exception as exc:  # noqa: BLE001 - reported by run()
                self._errors.append(f"{host.name}: {exc}")
                return

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _failed(self, host, began: float, why: str) -> None:
        """A docker run failed: fine while this host's plugin or etcd was down
        (the engine rolled it back), a finding otherwise."""
        with self._lock:
            self.report.failed_runs += 1
            excused = any(began - FAULT_GRACE <= t <= self._now() and who in (host.name, "etcd")
                          for t, who in self._fault_log)
            if not excused:
                self._errors.append(f"{host.name}: docker run failed at {began:.0f} s with no fault near: {why}")

    def _sample(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic() - self._t0
            for h in self.hosts:
                if h.plugin_running:
                    rss, pss, fds = plugin_usage(h)
                    self.report.samples.setdefault(h.name, []).append((round(t, 1), rss, pss, fds))
            self._stop.wait(SAMPLE_EVERY)

    def _faults(self) -> None:
        """A plugin SIGKILL every kill_every seconds (never on the last host); etcd restarted once, halfway."""
        etcd_at = self.seconds / 2
        next_kill = self.kill_every
        while not self._stop.is_set():
            now = time.monotonic() - self._t0
            try:
                if etcd_at is not None and now >= etcd_at:
                    self.log(f"soak: restarting etcd at {now:.0f} s")
                    with self._lock:
                        self._fault_log.append((now, "etcd"))
                    self.etcd.restart()
                    self.report.etcd_restarts += 1
                    etcd_at = None
                elif now >= next_kill:
                    host = self.rng.choice(self.hosts[:-1])
                    self.log(f"soak: SIGKILL of {host.name}'s plugin at {now:.0f} s")
                    with self._lock:
                        self._fault_log.append((now, host.name))
                    host.kill_plugin()
                    host.start_plugin(self.etcd.url)
                    self.report.plugin_kills += 1
                    next_kill += self.kill_every
            except Exception as exc:  # noqa: BLE001 - reported by run()
                self._errors.append(f"faults: {exc}")
                return
            self._stop.wait(1.0)

    # -- the end ----------------------------------------------------------------
    def check(self) -> None:
        """Nothing leaked; every live container reachable from every host."""
        live = {h.name: h.docker("ps", "-q", "--filter", f"network={NETWORK}").split() for h in self.hosts}
        self.report.live = sum(len(v) for v in live.values())
        ips = {}
        for h in self.hosts:
            for cid in live[h.name]:
                ips[cid] = h.docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}',
                                    cid)

        def store_agrees() -> bool:
            kv = store(self.etcd)
            endpoints = [v for k, v in kv.items() if k.startswith("endpoints/")]
            addresses = {k.rsplit("/", 1)[1] for k in kv if k.startswith(f"addresses/{SUBNET.replace('/', '_')}/")}
            return len(endpoints) == len(ips) and addresses == set(ips.values()) | {SUBNET.rsplit(".", 1)[0] + ".1"}

        # An endpoint the engine forgot while a plugin was down goes by the sweep,
        # SWEEP_WAIT at most after the run (its default grace plus two passes).
        def disagreement() -> str:
            kv = store(self.etcd)
            live_ips = set(ips.values()) | {SUBNET.rsplit(".", 1)[0] + ".1"}
            stray = {k: v for k, v in kv.items() if k.startswith("addresses/") and k.rsplit("/", 1)[1] not in live_ips}
            return (f"the store to hold exactly the {len(ips)} live containers' endpoints and addresses; "
                    f"addresses no live container has: {stray}; "
                    f"keys: {sorted(k for k in kv if not k.startswith(('hosts/', 'seen/')))}")

        wait_for(store_agrees, SWEEP_WAIT, disagreement)
        for h in self.hosts:
            def kernel_agrees(h=h) -> bool:
                host_links = [n for n in h.links() if n.startswith(("pyo", "pyb"))]
                ports = [n for n, l in h.links(f"pyo-{VNI}").items() if l.get("master") and n.startswith("pyb")]
                spaces = [n for n in h.netns_names() if n.startswith("pyo-")]
                return not host_links and len(ports) == len(live[h.name]) and spaces == [f"pyo-{VNI}"]

            wait_for(kernel_agrees, 30, lambda h=h: f"{h.name}: veths {sorted(h.links())}, bridge ports "
                     f"{sorted(h.links(f'pyo-{VNI}'))}, namespaces {h.netns_names()}, live {live[h.name]}")
            rules, _ = nft_rules(h)
            assert rules == self._nft_before[h.name][0], f"{h.name}: nft rules changed: {rules}"
            peers = {o.addr for o in self.hosts if o is not h and live[o.name]}  # hosts with endpoints
            wait_for(lambda h=h, peers=peers: nft_rules(h)[1] == peers, 10,
                     lambda h=h, peers=peers: f"{h.name}: nft VTEP set {nft_rules(h)[1]}, peers {peers}")
        for h in self.hosts:
            if not live[h.name]:
                continue
            out = h.docker("exec", live[h.name][0], "sh", "-c", REACH, "sh", *ips.values(), timeout=60)
            for ip in [line.split()[1] for line in out.splitlines() if line.startswith("no ")]:
                self.report.pings_missed += 1  # one lost in a burst: asked again alone, must answer
                wait_for(lambda ip=ip, h=h: h.docker_proc("exec", live[h.name][0], "ping", "-c1", "-W1", ip,
                                                         check=False).returncode == 0,
                         10, f"{h.name} to reach {ip}")


def nft_rules(host) -> tuple[list, set]:
    """The filter table's rules (without counters) and its VTEP set elements."""
    out = json.loads(host.run(["nft", "-j", "list", "table", "inet", "pyoverlay"]).stdout)["nftables"]
    rules = [[e for e in item["rule"]["expr"] if "counter" not in e] for item in out if "rule" in item]
    vteps = set()
    for item in out:
        for elem in (item.get("set") or {}).get("elem", []):
            vteps.add(elem if isinstance(elem, str) else json.dumps(elem))
    return rules, vteps


def store(etcd) -> dict[str, dict]:
    """pyoverlay's keys in etcd (without the prefix), read directly."""
    start = PREFIX.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    data = etcd.request("POST", "/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                                 "range_end": base64.b64encode(end).decode()})
    return {base64.b64decode(kv["key"]).decode()[len(PREFIX):]: json.loads(base64.b64decode(kv["value"]))
            for kv in data.get("kvs", [])}
