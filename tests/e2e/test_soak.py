"""The soak's short form (tests/soak.py): 2 minutes of container churn on
three hosts with plugin SIGKILLs and an etcd restart, then nothing leaked,
memory and file descriptors flat, every live container reachable.

`PYO_SOAK_SECONDS` sets the length (bench/soak.py runs 10 minutes). On the
engines and etcd of test_faults.py's fixtures, made afresh for this module;
their teardown copes with Docker Engine 20.10's own bugs as they do there.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.test_faults import _unstick, cluster, hosts  # noqa: F401 (fixtures)
from tests.reliability import record
from tests.seed import rng as seeded
from tests.soak import Soak

SECONDS = float(os.environ.get("PYO_SOAK_SECONDS", "120"))
#: Growth of the never-killed plugin over the run that fails the test: above
#: noise (allocator growth of a few MB; each of gunicorn's 8 request threads
#: opens its own etcd connection when it first serves a call), below a leak
#: per container or per call (the run makes about a hundred of each).
RSS_GROWTH_KB, FD_GROWTH = 8192, 16


@pytest.mark.slow
def test_soak_churn_kills_and_etcd_restart_leak_nothing(hosts, cluster):
    name = "test_soak_churn_kills_and_etcd_restart_leak_nothing"
    soak = Soak(hosts, cluster.etcd, SECONDS, seeded(name), unstick=lambda host, error: _unstick(name, host, error))
    report = soak.run()
    soak.check()
    f = report.figures()
    print("soak:", f)
    assert report.runs > 3 * len(hosts), f"too little churn to judge: {f}"
    assert report.plugin_kills >= 1 and report.etcd_restarts == 1, f
    assert f["rss_kb_end"] - f["rss_kb_start"] < RSS_GROWTH_KB, f"plugin memory grew: {f}"
    assert f["fds_end"] - f["fds_start"] < FD_GROWTH, f"plugin file descriptors grew: {f}"
    record("soak", did=f"{f['minutes']} min of container churn on 3 hosts ({f['docker_runs']} docker run, "
           f"{f['removals']} docker rm; {f['failed_runs']} runs refused while a plugin or etcd was down), "
           f"{f['plugin_kills']} plugin SIGKILLs, {f['etcd_restarts']} etcd restart",
           held=f"no leaked address, endpoint, veth, bridge port, namespace or nft rule; all {f['live_at_end']} live "
                f"containers reachable from every host; the never-killed plugin's Rss {f['rss_kb_start']} -> "
                f"{f['rss_kb_end']} kB (slope {f['rss_slope_kb_per_min']} kB/min), fds {f['fds_start']} -> "
                f"{f['fds_end']} (slope {f['fd_slope_per_min']}/min)", **f)
