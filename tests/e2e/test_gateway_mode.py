"""-o gateway=pyoverlay through the real engine: pyoverlay's own egress and
published ports, no docker_gwbridge endpoint (issue 14).

One host for the module (its engine makes docker_gwbridge on first use, so
its absence shows no container was given one) and the underlay's namespace
as "another host". What is checked is what a user sees: where a container's
traffic leaves, which addresses a -p answers on, `docker port`, the nft rules
left in the host, and the same after a plugin kill and restart.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.e2e.conftest import FACTORY, HostFactory
from tests.hosts import IMAGE, Host, wait_for

SUBNET = "10.20.0.0/24"
GATEWAY = "10.20.0.1"
HTTPD = ("sh", "-c", "mkdir -p /www && echo published-ok > /www/index.html && exec httpd -f -p 80 -h /www")
TABLE = "pyoverlay-gw"


@pytest.fixture(scope="module")
def factory(underlay, e2e_workdir, image_tar):
    made = HostFactory(underlay, e2e_workdir, image_tar)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def host(factory) -> Host:
    (h,) = factory(1, engine_gwbridge=True)
    h.start_plugin(f"sqlite://{h.state_dir}/state.db")
    h.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", SUBNET,
             "-o", "gateway=pyoverlay", "web")
    return h


@pytest.fixture(autouse=True)
def _report(request, factory):
    request.node.stash[FACTORY] = factory  # plugin and engine logs on a failure


def fetch(runner, url: str) -> str:
    return runner.run(["busybox", "wget", "-qO-", url], check=False).stdout


def dnat_rules(host: Host) -> list[str]:
    out = host.run(["nft", "list", "table", "ip", TABLE], check=False).stdout
    return re.findall(r"dport (\d+) dnat to ([\d.:]+)", out)


def endpoint_ids(host: Host, container: str, network: str = "web") -> dict:
    out = host.docker("inspect", "-f", f"{{{{.NetworkSettings.Networks.{network}.NetworkID}}}} "
                      f"{{{{.NetworkSettings.Networks.{network}.EndpointID}}}}", container)
    network_id, endpoint_id = out.split()
    return {"NetworkID": network_id, "EndpointID": endpoint_id}


def interfaces(host: Host, container: str) -> list[str]:
    out = host.docker("exec", container, "ip", "-o", "-4", "addr", "show")
    return sorted(re.findall(r"^\d+: (\S+)\s+inet", out, re.M))


def test_egress_and_published_ports_without_gwbridge(host, underlay, underlay_http):
    url, token = underlay_http
    host.docker("run", "-d", "--name", "www", "--network", "web", "-p", "8080:80", "-p", "80", IMAGE, *HTTPD)
    try:
        # No second endpoint: the engine never even made docker_gwbridge.
        assert interfaces(host, "www") == ["eth0", "lo"]
        assert host.docker_proc("network", "inspect", "docker_gwbridge", check=False).returncode != 0, \
            "the engine made docker_gwbridge: a container got an endpoint there"
        assert re.search(rf"^default via {GATEWAY} dev eth0", host.docker("exec", "www", "ip", "route"), re.M)
        # Egress, masqueraded to the host's address (the underlay knows no overlay route).
        assert host.docker("exec", "www", "wget", "-qO-", url) == token

        # -p 8080:80 on loopback, on the host's address, from another host.
        for runner, where in ((host, "127.0.0.1"), (host, host.addr), (underlay, host.addr)):
            wait_for(lambda: fetch(runner, f"http://{where}:8080/") == "published-ok\n", 10,
                     f"-p 8080 on {where} from {runner is host and 'the host' or 'the underlay'}")

        # The engine reads a remote driver's bindings out of EndpointOperInfo
        # as Go's []types.PortBinding, which decoded JSON never is: so
        # `docker port` and .NetworkSettings.Ports stay empty on 20.10 and 28
        # (pyoverlay answers them all the same, for an engine that reads them).
        # What the user asked for is in .HostConfig.PortBindings; the port
        # chosen for HostPort 0 is in the plugin's log and in the nft table.
        ports = host.docker("port", "www")
        print(f"\ndocker port www: {ports!r}")
        if ports:
            assert re.search(r"^80/tcp -> 0\.0\.0\.0:8080$", ports, re.M), ports
        asked = json.loads(host.docker("inspect", "-f", "{{json .HostConfig.PortBindings}}", "www"))
        assert sorted(b["HostPort"] for b in asked["80/tcp"]) == ["", "8080"], asked
        _, info = host.plugin_request("NetworkDriver.EndpointOperInfo", endpoint_ids(host, "www"))
        mapped = sorted(b["HostPort"] for b in info["Value"]["com.docker.network.portmap"])
        chosen = [p for p in mapped if p != 8080]
        assert len(mapped) == 2 and 8080 in mapped and chosen[0] > 0, info
        assert sorted(int(p) for p, _ in dnat_rules(host)) == mapped
        assert fetch(underlay, f"http://{host.addr}:{chosen[0]}/") == "published-ok\n"

        # A taken port is refused, saying so, and changes nothing.
        before = dnat_rules(host)
        dup = host.docker_proc("run", "-d", "--name", "dup", "--network", "web", "-p", "8080:80", IMAGE,
                               "sleep", "60", check=False)
        assert dup.returncode != 0, "a second container published host port 8080"
        assert "8080" in dup.stderr and "already taken" in dup.stderr, dup.stderr
        assert dnat_rules(host) == before
        assert fetch(underlay, f"http://{host.addr}:8080/") == "published-ok\n"

        # docker stop and docker kill release the ports, docker start publishes them again.
        host.docker("stop", "-t", "1", "www")
        assert dnat_rules(host) == []
        assert fetch(underlay, f"http://{host.addr}:8080/") == ""
        host.docker("start", "www")
        wait_for(lambda: fetch(underlay, f"http://{host.addr}:8080/") == "published-ok\n", 10, "-p after a start")
        # docker kill: the engine revokes when it sees the exit, after the CLI returned.
        host.docker("kill", "www")
        wait_for(lambda: dnat_rules(host) == [], 10, lambda: f"the rules to go after docker kill: {dnat_rules(host)}")
        assert fetch(underlay, f"http://{host.addr}:8080/") == ""
    finally:
        host.docker("rm", "-f", "www", "dup")
    assert dnat_rules(host) == [], "a removed container left its DNAT rule"


def test_plugin_kill_and_restart_keep_ports_and_leak_nothing(host, underlay):
    host.docker("run", "-d", "--name", "keep", "--network", "web", "-p", "8081:80", IMAGE, *HTTPD)
    wait_for(lambda: fetch(underlay, f"http://{host.addr}:8081/") == "published-ok\n", 10, "-p 8081")
    host.kill_plugin()
    # A stale rule, as if a container had gone while the plugin was down: restore must drop it.
    host.run(["nft", "add", "rule", "ip", TABLE, "ports", "tcp", "dport", "9999", "dnat", "to", "10.20.0.99:80"])
    assert fetch(underlay, f"http://{host.addr}:8081/") == "published-ok\n", "the kernel needs no plugin"
    host.start_plugin(f"sqlite://{host.state_dir}/state.db")
    wait_for(lambda: [p for p, _ in dnat_rules(host)] == ["8081"], 10, lambda: f"restore to leave only 8081: "
             f"{dnat_rules(host)}")
    assert fetch(underlay, f"http://{host.addr}:8081/") == "published-ok\n"
    host.docker("rm", "-f", "keep")
    assert dnat_rules(host) == []


def test_connect_disconnect_and_internal_has_no_way_out(host, underlay):
    host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--subnet", "10.20.2.0/24",
                "--internal", "-o", "gateway=pyoverlay", "inner")
    try:
        host.docker("run", "-d", "--name", "in1", "--network", "inner", IMAGE, "sleep", "600")
        assert interfaces(host, "in1") == ["eth0", "lo"]
        assert "default" not in host.docker("exec", "in1", "ip", "route")
        assert host.docker_proc("exec", "in1", "ping", "-c1", "-W1", underlay.addr, check=False).returncode != 0

        # Connected to a gateway-mode network: a way out through it; disconnected: none.
        host.docker("network", "connect", "web", "in1")
        assert re.search(rf"^default via {GATEWAY}", host.docker("exec", "in1", "ip", "route"), re.M)
        host.docker("exec", "in1", "ping", "-c1", "-W2", underlay.addr)
        host.docker("network", "disconnect", "web", "in1")
        assert "default" not in host.docker("exec", "in1", "ip", "route")
        assert host.docker_proc("exec", "in1", "ping", "-c1", "-W1", underlay.addr, check=False).returncode != 0
    finally:
        host.docker("rm", "-f", "in1")
        host.docker("network", "rm", "inner")
    assert "docker_gwbridge" not in host.docker("network", "ls", "--format", "{{.Name}}").split()


def test_bad_option_value_is_refused_and_changes_nothing(host):
    proc = host.docker_proc("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay",
                            "--subnet", "10.20.5.0/24", "-o", "gateway=bridge", "bad", check=False)
    assert proc.returncode != 0
    assert "gateway=pyoverlay" in proc.stderr and "gateway=docker_gwbridge" in proc.stderr, proc.stderr
    assert "bad" not in host.docker("network", "ls", "--format", "{{.Name}}").split()


# Answers every GET with the client's address: where the container's traffic came from.
WHOAMI = """
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode() + b"\\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""
UNDERLAY6, HOST6 = "fd99::254", "fd99::1"


def test_ipv6_egress_and_published_ports(host, underlay, underlay_http):
    """A dual-stack gateway-mode network: IPv6 out, masqueraded to the host's
    IPv6 address; -p answers over IPv6 from another host; IPv4 unchanged.
    The lab's underlay is IPv4: the test gives it and the host IPv6 addresses."""
    underlay.ip("-6", "addr", "add", f"{UNDERLAY6}/64", "dev", "br0", "nodad")
    host.run(["ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "eth0", "nodad"])
    server = underlay.spawn([sys.executable, "-c", WHOAMI, UNDERLAY6, "8006"], "whoami6.log")
    host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--ipv6",
                "--subnet", "10.20.6.0/24", "--subnet", "fd00:20:6::/64", "-o", "gateway=pyoverlay", "web6")
    try:
        host.docker("run", "-d", "--name", "www6", "--network", "web6", "-p", "8086:80", IMAGE, *HTTPD)
        assert interfaces(host, "www6") == ["eth0", "lo"]
        routes6 = host.docker("exec", "www6", "ip", "-6", "route")
        assert re.search(r"^default via fd00:20:6::1 dev eth0", routes6, re.M), routes6
        wait_for(lambda: fetch(underlay, f"http://[{UNDERLAY6}]:8006/") != "", 10, "the IPv6 server on the underlay")
        # Egress over IPv6, its source the host's IPv6 address (NAT66), and over IPv4 as before.
        assert host.docker("exec", "www6", "wget", "-qO-", f"http://[{UNDERLAY6}]:8006/") == HOST6
        # -p 8086:80 over IPv6 and IPv4 from another host, and on the host's own IPv6 address.
        for runner, where in ((underlay, f"[{HOST6}]"), (underlay, host.addr), (host, f"[{HOST6}]")):
            wait_for(lambda: fetch(runner, f"http://{where}:8086/") == "published-ok\n", 10,
                     f"-p 8086 on {where}")
        # The default mode beside it: docker_gwbridge is IPv4, so no IPv6 way out
        # (no IPv6 default route), and IPv4 out works as ever.
        host.docker("network", "create", "-d", "pyoverlay", "--ipam-driver", "pyoverlay", "--ipv6",
                    "--subnet", "10.20.7.0/24", "--subnet", "fd00:20:7::/64", "plain6")
        host.docker("run", "-d", "--name", "plain6", "--network", "plain6", IMAGE, "sleep", "600")
        assert "default" not in host.docker("exec", "plain6", "ip", "-6", "route")
        out = host.docker_proc("exec", "plain6", "wget", "-qO-", f"http://[{UNDERLAY6}]:8006/", check=False)
        print(f"\nIPv6 out through docker_gwbridge: {out.returncode} {out.stderr.strip()!r}")
        assert out.returncode != 0 and "unreachable" in out.stderr, out.stderr
        url, token = underlay_http
        assert host.docker("exec", "plain6", "wget", "-qO-", url) == token
        six = host.run(["nft", "list", "table", "ip6", TABLE]).stdout
        assert re.search(r"dport 8086 dnat to \[fd00:20:6:[0-9a-f:]+\]:80", six), six
        host.docker("rm", "-f", "www6")
        assert "dport 8086" not in host.run(["nft", "list", "table", "ip6", TABLE]).stdout
    finally:
        host.docker_proc("rm", "-f", "www6", "plain6", check=False)
        host.docker_proc("network", "rm", "web6", "plain6", check=False)
        server.kill()
        host.run(["ip", "-6", "addr", "del", f"{HOST6}/64", "dev", "eth0"], check=False)
        underlay.ip("-6", "addr", "del", f"{UNDERLAY6}/64", "dev", "br0")
    # The last IPv6 gateway-mode network gone: no IPv6 table left.
    assert "ip6 pyoverlay-gw" not in host.run(["nft", "list", "tables"]).stdout


def test_ipv6_only_gateway_mode(host, underlay):
    """--ipv4=false (Docker 28+): Join gives GatewayIPv6 alone, and the
    container goes out and is published over IPv6 with no docker_gwbridge."""
    import docker

    api = docker.APIClient(base_url=f"unix://{host.dir}/docker.sock", version="auto")
    version = api.version()
    if tuple(map(int, version["ApiVersion"].split("."))) < (1, 48):
        reason = f"engine {version['Version']} has no --ipv4=false (Docker 28.0, API 1.48)"
        print(f"\nskipped: {reason}")
        pytest.skip(reason)
    underlay.ip("-6", "addr", "add", f"{UNDERLAY6}/64", "dev", "br0", "nodad")
    host.run(["ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "eth0", "nodad"])
    server = underlay.spawn([sys.executable, "-c", WHOAMI, UNDERLAY6, "8007"], "whoami7.log")
    # Through the API: the CLI under test may be 20.10's, without --ipv4.
    api._post_json(api._url("/networks/create"), data={
        "Name": "only6", "Driver": "pyoverlay", "EnableIPv6": True, "EnableIPv4": False,
        "Options": {"gateway": "pyoverlay"},
        "IPAM": {"Driver": "pyoverlay", "Config": [{"Subnet": "fd00:20:8::/64"}]}}).raise_for_status()
    try:
        host.docker("run", "-d", "--name", "only6", "--network", "only6", "-p", "8087:80", IMAGE, *HTTPD)
        assert "default via fd00:20:8::1 dev eth0" in host.docker("exec", "only6", "ip", "-6", "route")
        wait_for(lambda: fetch(underlay, f"http://[{UNDERLAY6}]:8007/") != "", 10, "the IPv6 server on the underlay")
        assert host.docker("exec", "only6", "wget", "-qO-", f"http://[{UNDERLAY6}]:8007/") == HOST6
        wait_for(lambda: fetch(underlay, f"http://[{HOST6}]:8087/") == "published-ok\n", 10, "-p 8087 over IPv6")
    finally:
        host.docker_proc("rm", "-f", "only6", check=False)
        host.docker_proc("network", "rm", "only6", check=False)
        server.kill()
        host.run(["ip", "-6", "addr", "del", f"{HOST6}/64", "dev", "eth0"], check=False)
        underlay.ip("-6", "addr", "del", f"{UNDERLAY6}/64", "dev", "br0")
