"""The harness itself, checked with Docker's own drivers and a stand-in
plugin: if these fail, a pyoverlay e2e failure says nothing about pyoverlay."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.hosts import IMAGE, PLUGIN_SOCKET, wait_for

# Answers just enough of the protocol for `docker network create -d pyoverlay`
# (default IPAM) to succeed; prints its arguments and each call to the log.
FAKE_PLUGIN = r'''
import http.server, json, os, socketserver, sys
args = sys.argv[1:]
sock = args[args.index("--socket") + 1]
print("fake plugin:", " ".join(args), flush=True)
ANSWERS = {
    "/Plugin.Activate": {"Implements": ["NetworkDriver"]},
    "/NetworkDriver.GetCapabilities": {"Scope": "local", "ConnectivityScope": "global"},
}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print("call", self.path, flush=True)
        body = json.dumps(ANSWERS.get(self.path, {})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):
        return "unix"

class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

if os.path.exists(sock):
    os.unlink(sock)
Server(sock, Handler).serve_forever()
'''


def fetch(runner, url: str) -> str:
    return runner.run(["busybox", "wget", "-qO-", url]).stdout


def test_bridge_driver_ping_and_published_port(make_hosts, underlay):
    (host,) = make_hosts(1, mtu=1400)
    assert host.links()["eth0"]["mtu"] == 1400
    assert host.run(["ping", "-c1", "-W2", underlay.addr], check=False).returncode == 0

    host.docker("network", "create", "--subnet", "10.30.0.0/24", "plain")
    host.docker("run", "-d", "--name", "c1", "--network", "plain", IMAGE, "sleep", "3600")
    host.docker("run", "-d", "--name", "c2", "--network", "plain", "-p", "8080:80", IMAGE, "sh", "-c",
                "mkdir /www && echo harness-ok > /www/index.html && exec httpd -f -p 80 -h /www")
    c2_ip = host.docker("inspect", "-f", "{{.NetworkSettings.Networks.plain.IPAddress}}", "c2")
    assert c2_ip.startswith("10.30.0.")
    host.docker("exec", "c1", "ping", "-c1", "-W2", c2_ip)

    url = f"http://{host.addr}:8080/"
    wait_for(lambda: host.run(["busybox", "wget", "-qO-", url], check=False).stdout == "harness-ok\n",
             10, f"{url} from the host namespace")
    # From another machine on the underlay, as a user would.
    assert fetch(underlay, url) == "harness-ok\n"


def test_gwbridge_reaches_underlay(make_hosts, underlay_http):
    (host,) = make_hosts(1)
    url, token = underlay_http
    subnet = host.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", "docker_gwbridge")
    assert subnet == f"172.31.{host.index}.0/24"
    out = host.docker("run", "--rm", "--network", "docker_gwbridge", IMAGE, "wget", "-qO-", url)
    assert out == token


def test_hosts_are_separate(make_hosts):
    h1, h2 = make_hosts(2)
    h1.run(["ping", "-c1", "-W2", h2.addr])
    # Each host has its own /run/netns: a namespace the plugin makes on one
    # host is invisible to the other and to the machine.
    h1.run(["ip", "netns", "add", "probe"])
    assert h1.netns_names() == ["probe"]
    assert h2.netns_names() == []
    assert not os.path.exists("/run/netns/probe")
    h1.docker("run", "-d", "--name", "only-on-h1", IMAGE, "sleep", "3600")
    assert h2.docker("ps", "-aq") == ""
    # A host's plugin directory is its own.
    assert h1.run(["stat", "-c", "%i", os.path.dirname(PLUGIN_SOCKET)]).stdout != \
        h2.run(["stat", "-c", "%i", os.path.dirname(PLUGIN_SOCKET)]).stdout


def test_plugin_start_kill_stop(make_hosts, e2e_workdir):
    (host,) = make_hosts(1)
    fake = Path(e2e_workdir) / "fake-plugin"
    fake.write_text(f"#!{sys.executable}\n{FAKE_PLUGIN}")
    fake.chmod(0o755)
    host.plugin_exe = str(fake)

    host.start_plugin("sqlite:///nowhere", extra_args=["--log-level", "debug"])
    assert host.plugin_running
    assert f"--advertise-addr {host.addr} --log-level debug" in host.plugin_log()
    # The engine finds the socket in the host's plugin directory.
    host.docker("network", "create", "-d", "pyoverlay", "fake")
    assert "call /NetworkDriver.CreateNetwork" in host.plugin_log()

    host.kill_plugin()
    assert not host.plugin_running
    try:
        host.plugin_request("Plugin.Activate")
        answered = True
    except OSError:
        answered = False
    assert not answered, "the killed plugin still answers"

    host.start_plugin("sqlite:///nowhere")
    host.docker("network", "rm", "fake")
    assert "call /NetworkDriver.DeleteNetwork" in host.plugin_log()
    host.stop_plugin()
    assert not host.plugin_running


def test_restart_engine_keeps_state(make_hosts):
    (host,) = make_hosts(1)
    host.docker("network", "create", "--subnet", "10.31.0.0/24", "kept")
    pid_before = host._dockerd.pid
    host.restart_engine()
    assert host._dockerd.pid != pid_before
    assert "kept" in host.docker("network", "ls", "--format", "{{.Name}}").split()
    assert host.docker("run", "--rm", "--network", "kept", IMAGE, "echo", "after-restart") == "after-restart"


def test_a_hung_engine_call_brings_the_engine_goroutine_stacks(make_hosts):
    (host,) = make_hosts(1)
    host.docker("run", "-d", "--name", "slow", IMAGE, "sleep", "3600")
    # `docker stop` waits out the 10 s stop timeout (sleep ignores SIGTERM): a call that hangs.
    with pytest.raises(TimeoutError, match=r"goroutine stacks in (\S+) \(\d+ goroutines") as failed:
        host.docker("stop", "slow", timeout=2)
    path = re.search(r"goroutine stacks in (\S+) ", str(failed.value)).group(1)
    assert "ContainerStop" in Path(path).read_text() or "containerStop" in Path(path).read_text()
    Path(path).unlink()


def test_close_removes_everything(make_hosts):
    (host,) = make_hosts(1)
    host.docker("run", "-d", "--name", "c1", "-p", "8081:80", IMAGE, "sleep", "3600")
    host.run(["ip", "netns", "add", "probe"])
    netns_ino = os.stat(f"/run/netns/{host.name}").st_ino
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _in_netns(p, netns_ino)]
    assert len(pids) >= 4, "expected at least the holder, dockerd, containerd and a shim"
    container_pid = int(host.docker("inspect", "-f", "{{.State.Pid}}", "c1"))

    host.close()

    for pid in pids + [container_pid]:
        assert not _alive(pid), f"pid {pid} survived close()"
    assert not os.path.exists(f"/run/netns/{host.name}")
    assert not host.dir.exists()
    cgroups = [d for d in Path("/sys/fs/cgroup").glob(f"**/{host.cgroup_parent}") if d.is_dir()]
    assert cgroups == []
    with open("/proc/self/mountinfo") as f:
        assert str(host.dir) not in f.read()


def _in_netns(pid: str, ino: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == ino
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
