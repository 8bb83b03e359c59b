"""3 hosts x 30 concurrent `docker run` on one network (issue 6): all
addresses unique, every container reachable, no errors.

On engines and an etcd of its own (the fixtures of test_faults.py, made
afresh for this module). A burst like this one sometimes leaves Docker
Engine 20.10 miscounting the network's endpoints, so that it refuses
`docker network rm` with no container left (README, "Docker Engine 20.10 and
'has active endpoints'"); the teardown (test_faults.hosts) then checks that
pyoverlay named the host and what to do, restarts that engine and records it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import ensure_network
from tests.e2e.test_faults import CONCURRENT, cluster, hosts, pings  # noqa: F401 (fixtures)
from tests.hosts import IMAGE, wait_for
from tests.reliability import record

REACH = r'for ip in "$@"; do (ping -c1 -W2 "$ip" >/dev/null 2>&1 && echo "ok $ip" || echo "no $ip") & done; wait'


def test_concurrent_runs_on_three_hosts(hosts, cluster):
    ensure_network(hosts, "busy", "10.66.0.0/24", 6600)
    jobs = [(h, f"c{i}") for h in hosts for i in range(CONCURRENT)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job[0].docker_proc(
            "run", "-d", "--name", job[1], "--network", "busy", IMAGE, "sleep", "3600",
            check=False, timeout=300), jobs))
    took = time.monotonic() - t0
    errors = [r.stderr.strip() for r in results if r.returncode != 0]
    assert not errors, f"{len(errors)} of {len(jobs)} concurrent docker run failed: {errors[:3]}"
    ips = []
    for h in hosts:
        fmt = '{{(index .NetworkSettings.Networks "busy").IPAddress}}'
        ips += h.docker("inspect", "-f", fmt, *[f"c{i}" for i in range(CONCURRENT)]).split()
    assert len(ips) == len(jobs) and len(set(ips)) == len(ips), "duplicate addresses across hosts"
    missed = 0
    for h in hosts:  # from one container per host, every container on every host, 90 pings at once
        out = h.docker("exec", "c0", "sh", "-c", REACH, "sh", *ips, timeout=60)
        for ip in [line.split()[1] for line in out.splitlines() if line.startswith("no ")]:
            # A single ping lost in a burst of 90 is not an unreachable container:
            # ask again, alone; one that stays silent fails the test.
            missed += 1
            wait_for(lambda: pings(h, "c0", ip), 10, lambda: f"{h.name}'s c0 to reach {ip}; its overlay's "
                     f"neighbours: {h.run(['ip', '-n', 'pyo-6600', 'neigh', 'show', ip]).stdout!r}")
    record("concurrent docker run", did=f"3 hosts x {CONCURRENT} concurrent docker run on one network",
           held=f"{len(jobs)} started in {took:.1f} s, 0 errors, {len(set(ips))} unique addresses, all reachable "
                f"from a container on each host ({missed} of {3 * len(ips)} pings in the 90-at-once bursts went "
                "unanswered and were answered when sent again)", containers=len(jobs), errors=0,
           seconds=round(took, 1), burst_pings_missed=missed)
