"""pyoverlay as a managed plugin on a real engine, built without a registry.

`packaging/build-plugin` (what `make plugin` runs) builds the rootfs from the
cached debootstrap tarball (the first run on a machine debootstraps, about a
minute) and creates the plugin on the engine DOCKER_HOST names: here a
namespace host's. Then, as a user would: set, enable, a network through
`-d pyoverlay:latest --ipam-driver pyoverlay:latest`, containers that ping,
an engine restart after which the plugin is enabled again and the network
and its containers work. Every stage is timed; the times are printed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hosts import DOCKER_CLI, IMAGE, UNDERLAY_ADDR, NamespaceHost, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "pyoverlay:latest"
SUBNET = "10.40.0.0/24"
SILENT_PORT = 2379
# An etcd that hangs: connections are accepted (by the kernel, into the
# backlog) and never answered, the worst case for a plugin starting up.
SILENT_SERVER = f"""
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{UNDERLAY_ADDR}", {SILENT_PORT}))
s.listen(128)
print("listening", flush=True)
time.sleep(3600)
"""


class Stopwatch:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, stage: str):
        watch = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.monotonic()

            def __exit__(self, *exc):
                watch.times[stage] = time.monotonic() - self.t0

        return _Stage()

    def report(self) -> str:
        return "\n".join(f"  {name:<34} {secs:6.1f}s" for name, secs in self.times.items())


def build_and_create(host: NamespaceHost, watch: Stopwatch) -> None:
    """packaging/build-plugin against the host's engine, through DOCKER_HOST."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=f"unix://{host.dir / 'docker.sock'}", DOCKER_CONFIG=str(host.dir / "cli"),
               DOCKER=DOCKER_CLI, PYTHON=sys.executable)
    with watch("build-plugin (all)"):
        proc = subprocess.run([str(REPO / "packaging" / "build-plugin"), PLUGIN], env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"build-plugin failed:\n{proc.stderr[-4000:]}"
    # The script's own per-stage times ("build-plugin: <stage> <secs>s").
    for stage, secs in re.findall(r"^build-plugin: (\S+(?: \S+)?)\s+([\d.]+)s$", proc.stderr, re.M):
        watch.times[f"  build-plugin: {stage}"] = float(secs)


def managed_plugin_log(host: NamespaceHost, lines: int = 300) -> str:
    out = []
    with open(host.dir / "dockerd.log", errors="replace") as f:
        for line in f:
            m = re.search(r'msg="(.*)" plugin=\w+', line)
            if m:
                out.append(m.group(1).replace('\\"', '"'))
    return "\n".join(out[-lines:])


def plugin_pids(host: NamespaceHost) -> list[int]:
    """The plugin's processes: those whose root is its rootfs."""
    plugin_id = host.docker("plugin", "inspect", "-f", "{{.Id}}", PLUGIN)
    marker = f"/plugins/{plugin_id}/rootfs / "
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/mountinfo") as f:
                    if any(marker in line for line in f):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def plugin_enabled(host: NamespaceHost) -> bool:
    return host.docker("plugin", "inspect", "-f", "{{.Enabled}}", PLUGIN) == "true"


def ping(host: NamespaceHost, container: str, ip: str) -> bool:
    return host.docker_proc("exec", container, "ping", "-c1", "-W1", ip, check=False).returncode == 0


def container_ip(host: NamespaceHost, name: str) -> str:
    return host.docker("inspect", "-f", "{{.NetworkSettings.Networks.mp.IPAddress}}", name)


@pytest.fixture
def silent_etcd(underlay, e2e_workdir):
    proc = underlay.spawn([sys.executable, "-c", SILENT_SERVER], "silent-etcd.log")
    log = Path(e2e_workdir) / "underlay" / "silent-etcd.log"
    wait_for(lambda: "listening" in tail(log), 10, lambda: f"the silent etcd to listen: {tail(log)}")
    assert proc.poll() is None
    return f"etcd://{UNDERLAY_ADDR}:{SILENT_PORT}"


def test_managed_plugin_survives_an_engine_restart(make_hosts, silent_etcd, capsys, record_property):
    watch = Stopwatch()
    (host,) = make_hosts(1)
    if not isinstance(host, NamespaceHost):
        # It builds here and creates the plugin through the engine's socket
        # file, and finds the plugin's processes in this machine's /proc.
        pytest.skip("the managed plugin test runs on namespace hosts only")
    try:
        run_scenario(host, silent_etcd, watch)
    except BaseException:
        # A managed plugin logs through the engine: its lines, for the report.
        print(f"managed plugin log (from the engine's log):\n{managed_plugin_log(host)}")
        raise
    finally:
        for stage, secs in watch.times.items():
            record_property(f"seconds {stage.strip()}", round(secs, 2))
        with capsys.disabled():  # the stage times belong in the CI log
            print(f"\nmanaged plugin stage times:\n{watch.report()}")


def run_scenario(host: NamespaceHost, hanging_etcd: str, watch: Stopwatch) -> None:
    build_and_create(host, watch)
    assert not plugin_enabled(host)  # created disabled: set first, then enable

    state = f"{host.state_dir}/plugin-state"
    host.run(["mkdir", "-p", state])
    common = [f"state.source={state}", f"docker-sock.source={host.dir / 'docker.sock'}",
              f"PYOVERLAY_ADVERTISE_ADDR={host.addr}", "PYOVERLAY_LOG_LEVEL=debug"]

    # The engine gives a plugin about 10 s to listen, then asks it for its
    # capabilities; an etcd that hangs must not make it miss either.
    host.docker("plugin", "set", PLUGIN, f"PYOVERLAY_STORE={hanging_etcd}", *common)
    with watch("enable (etcd hanging)"):
        host.docker("plugin", "enable", PLUGIN, timeout=60)
    assert watch.times["enable (etcd hanging)"] < 10
    assert plugin_enabled(host)
    # Registered as a network driver: the engine got its capabilities.
    wait_for(lambda: PLUGIN in host.docker("info", "--format", "{{json .Plugins.Network}}"), 10,
             lambda: f"{PLUGIN} among the engine's network drivers: {host.docker('info', '--format', '{{json .Plugins}}')}")
    with watch("disable"):
        host.docker("plugin", "disable", PLUGIN, timeout=60)

    host.docker("plugin", "set", PLUGIN, "PYOVERLAY_STORE=sqlite:///var/lib/pyoverlay/e2e.db")
    with watch("enable"):
        host.docker("plugin", "enable", PLUGIN, timeout=60)
    assert plugin_enabled(host)

    # The VXLAN source filter is nftables rules the plugin loads with the
    # rootfs's own `nft` (Debian's nftables in the rootfs, CAP_NET_ADMIN):
    # read them back with that same nft in the host's network namespace.
    rootfs = REPO / "packaging" / "build" / "plugin" / "rootfs"
    nft_list = ["nsenter", f"--net=/run/netns/{host.name}", "chroot", str(rootfs),
                "nft", "list", "table", "inet", "pyoverlay"]
    wait_for(lambda: subprocess.run(nft_list, capture_output=True).returncode == 0, 10,
             "the plugin's VXLAN source filter (nft table inet pyoverlay) in the host's namespace")

    with watch("network create"):
        host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--subnet", SUBNET, "mp")
    # The settings took: the store is the file named, in the mounted directory.
    assert Path(state, "e2e.db").exists(), f"no store in {state}: {os.listdir(state)}"
    with watch("two containers"):
        for name in ("ca", "cb"):
            # --init: the engine stops them quickly at restart; always: it starts them again.
            host.docker("run", "-d", "--init", "--restart", "always", "--name", name, "--network", "mp",
                        IMAGE, "sleep", "3600")
    a_ip, b_ip = container_ip(host, "ca"), container_ip(host, "cb")
    assert a_ip.startswith("10.40.0.") and b_ip.startswith("10.40.0.") and a_ip != b_ip
    with watch("first ping"):
        wait_for(lambda: ping(host, "ca", b_ip), 10, f"a to ping b ({b_ip})")
    assert ping(host, "cb", a_ip)

    # A crash: the engine starts the plugin again, and the overlay
    # namespaces, bind-mounted under the propagated mount, outlive it, so
    # the containers keep their links and the plugin carries on.
    with watch("plugin crash, restarted"):
        killed = plugin_pids(host)
        assert killed, "no plugin process found"
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # a short-lived child (nft) that ended on its own
        wait_for(lambda: set(plugin_pids(host)) - set(killed), 30, "the engine to start the plugin again")
    assert ping(host, "ca", b_ip), "a lost b when the plugin crashed"
    with watch("new container after crash"):
        host.docker("run", "-d", "--init", "--name", "cc", "--network", "mp", IMAGE, "sleep", "3600")
        wait_for(lambda: ping(host, "cc", a_ip), 10, f"cc to ping a ({a_ip})")
    host.docker("rm", "-f", "cc")

    with watch("engine restart"):
        host.restart_engine()
    with watch("plugin enabled again"):
        # Enabled is the saved setting; that the driver answers is shown by
        # what follows, which goes through it.
        wait_for(lambda: plugin_enabled(host), 30, "the plugin to be enabled after the restart")
    with watch("containers running again"):
        wait_for(lambda: host.docker("inspect", "-f", "{{.State.Running}}", "ca", "cb").split() == ["true", "true"],
                 60, lambda: f"containers ca and cb to run again: {host.docker('ps', '-a')}")
    # Addresses are handed out again as the containers start, in any order.
    a_ip, b_ip = container_ip(host, "ca"), container_ip(host, "cb")
    assert a_ip.startswith("10.40.0.") and b_ip.startswith("10.40.0.") and a_ip != b_ip
    with watch("ping after restart"):
        wait_for(lambda: ping(host, "ca", b_ip), 20, f"a to ping b ({b_ip}) after the engine restart")
    assert ping(host, "cb", a_ip)
    # The network takes new endpoints too, with a new address.
    with watch("new container after restart"):
        host.docker("run", "-d", "--init", "--name", "cn", "--network", "mp", IMAGE, "sleep", "3600")
        c_ip = container_ip(host, "cn")
        assert c_ip not in (a_ip, b_ip)
        wait_for(lambda: ping(host, "cn", a_ip), 10, f"cn to ping a ({a_ip})")
    assert host.docker("network", "inspect", "-f", "{{.Driver}} {{.IPAM.Driver}}", "mp") == f"{PLUGIN} {PLUGIN}"

