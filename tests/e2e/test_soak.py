"""The soak's short form (tests/soak.py): 2 minutes of container churn on
three hosts with plugin SIGKILLs and an etcd restart, then nothing leaked,
memory and file descriptors flat, every live container reachable.

`PYO_SOAK_SECONDS` sets the length (bench/soak.py runs 10 minutes). On the
engines and etcd of test_faults.py's fixtures, made afresh for this module;
their teardown copes with Docker Engine 20.10's own bugs as they do there.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.e2e.conftest import ensure_network
from tests.e2e.test_faults import _unstick, call, cluster, hosts, pings, plugin_links, run, run_ip, store  # noqa: F401
from tests.hosts import IMAGE, wait_for
from tests.reliability import record
from tests.seed import rng as seeded
from tests.soak import Soak

SECONDS = float(os.environ.get("PYO_SOAK_SECONDS", "120"))
#: Growth of the never-killed plugin that fails the test: above noise
#: (allocator growth of a few MB over the run; fds from a warm baseline, see
#: tests/soak.py's FD_BASELINE), below a leak per container or per call (the
#: run makes about a hundred of each, some forty after the fd baseline).
RSS_GROWTH_KB, FD_GROWTH = 8192, 16


SWEEP_GRACE = 6  # seconds (--sweep-grace; default 60): short, so the test is


def test_endpoint_forgotten_while_plugin_down_is_swept(hosts, cluster):
    """The plugin is SIGKILLed and a container removed in the gap: the engine
    cannot tell pyoverlay (Docker Engine 28 then forgets the endpoint for good).
    Once the plugin is back, the endpoint sweep (driver/sweep.py) removes what
    was left: record, peer, DNS name, address, kernel; the live ones stay."""
    h1, h2, _ = hosts
    ensure_network((h1, h2), "sweep", "10.68.0.0/24", 6800)
    h1.stop_plugin()
    h1.start_plugin(cluster.url(), ["--sweep-grace", str(SWEEP_GRACE)])
    run(h1, "gone", "sweep")
    run(h1, "stay", "sweep")
    run(h2, "peer", "sweep")
    gone_ip, stay_ip = run_ip(h1, "gone", "sweep"), run_ip(h1, "stay", "sweep")
    gone = h1.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "sweep").EndpointID}}', "gone")
    stay = h1.docker("inspect", "-f", '{{(index .NetworkSettings.Networks "sweep").EndpointID}}', "stay")
    subnet_key = "addresses/10.68.0.0_24/"
    assert f"endpoints/{gone}" in store(cluster.etcd, "endpoints/") and f"{subnet_key}{gone_ip}" in store(cluster.etcd)

    h1.kill_plugin()
    removed = h1.docker_proc("rm", "-f", "gone", check=False, timeout=120)
    left = f"endpoints/{gone}" in store(cluster.etcd, "endpoints/")  # what the engine left behind
    h1.start_plugin(cluster.url(), ["--sweep-grace", str(SWEEP_GRACE)])
    t0 = time.monotonic()
    assert removed.returncode == 0, removed.stderr

    def swept() -> bool:
        kv = store(cluster.etcd)
        return (f"endpoints/{gone}" not in kv and not any(k.endswith(f"/{gone}") for k in kv)
                and f"{subnet_key}{gone_ip}" not in kv)

    wait_for(swept, SWEEP_GRACE + 30, lambda: f"the forgotten endpoint {gone[:12]} to go: "
             f"{sorted(k for k in store(cluster.etcd) if gone in k or gone_ip in k)}")
    took = time.monotonic() - t0
    kv = store(cluster.etcd)
    assert f"endpoints/{stay}" in kv and f"peers/6800/{stay}" in kv and f"{subnet_key}{stay_ip}" in kv, \
        "the live endpoint must stay"
    wait_for(lambda: len([n for n in h1.links("pyo-6800") if n.startswith("pyb")]) == 1 and not plugin_links(h1),
             10, lambda: f"one bridge port (stay's) on h1: {sorted(h1.links('pyo-6800'))}")
    assert pings(h2, "peer", stay_ip), "the live container must still be reachable"
    # Its address is free again: a container asking for it gets it.
    again = h1.docker_proc("run", "-d", "--name", "again", "--network", "sweep", "--ip", gone_ip, IMAGE,
                           "sleep", "3600", check=False)
    assert again.returncode == 0, again.stderr
    assert pings(h2, "peer", gone_ip)
    record("endpoint sweep", did="plugin SIGKILLed, a container removed while it was down, plugin started "
           f"with --sweep-grace {SWEEP_GRACE}",
           held=f"the engine {'left' if left else 'had not left'} the endpoint in the store; the sweep removed its "
                f"record, peer, name and address {took:.1f} s after the plugin was back; the live endpoint and its "
                "traffic untouched; the address taken again by a new container",
           left_by_engine=int(left), swept_s=round(took, 1))
    # A claim the engine forgot with no endpoint at all (a ReleaseAddress that
    # failed while etcd restarted; RequestAddress answered to an engine whose
    # CreateEndpoint never came): asked for here as the engine would, then
    # never used. The sweep releases it; the live containers' stay.
    orphan = call(h1, "IpamDriver.RequestAddress", {"PoolID": "10.68.0.0/24", "Address": "", "Options": {}})
    orphan_ip = orphan["Address"].split("/")[0]
    assert f"{subnet_key}{orphan_ip}" in store(cluster.etcd)
    t0 = time.monotonic()
    wait_for(lambda: f"{subnet_key}{orphan_ip}" not in store(cluster.etcd), SWEEP_GRACE + 30,
             f"the sweep to release {orphan_ip}, claimed with no endpoint")
    orphan_took = time.monotonic() - t0
    kv = store(cluster.etcd)
    assert all(f"{subnet_key}{ip}" in kv for ip in (stay_ip, gone_ip)), "addresses in use must stay"
    record("address sweep", did=f"an address asked for over the plugin's socket as the engine would, and no "
           f"endpoint ever made with it (plugin with --sweep-grace {SWEEP_GRACE})",
           held=f"the sweep released it {orphan_took:.1f} s later; the addresses live containers use stayed",
           released_s=round(orphan_took, 1))
    # The soak after it runs h1 as every other host: the default grace.
    h1.stop_plugin()
    h1.start_plugin(cluster.url())


@pytest.mark.slow
@pytest.mark.engine_neutral  # a check for leaks in the plugin
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
    assert f["fds_end"] - f["fds_warm"] < FD_GROWTH, f"plugin file descriptors grew: {f}"
    record("soak", did=f"{f['minutes']} min of container churn on 3 hosts ({f['docker_runs']} docker run, "
           f"{f['removals']} docker rm; {f['failed_runs']} runs refused while a plugin or etcd was down), "
           f"{f['plugin_kills']} plugin SIGKILLs, {f['etcd_restarts']} etcd restart",
           held=f"no leaked address, endpoint, veth, bridge port, namespace or nft rule; all {f['live_at_end']} live "
                f"containers reachable from every host; the never-killed plugin's Rss {f['rss_kb_start']} -> "
                f"{f['rss_kb_end']} kB (slope {f['rss_slope_kb_per_min']} kB/min), fds {f['fds_start']} -> "
                f"{f['fds_warm']} (warm) -> {f['fds_end']} (slope {f['fd_slope_per_min']}/min)", **f)
