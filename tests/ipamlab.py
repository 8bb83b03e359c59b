"""Plugin processes as hosts, for the cluster IPAM tests, without Docker and
without the e2e lock: every name here carries a random tag, so runs never
meet each other or the e2e harness.

    pyo-ipt-<tag>          the underlay: bridge br0 10.1.0.254/24, etcd on it
    pyo-ipt-<tag>-<N>      host N: eth0 10.1.0.N on br0, one `pyoverlay serve`
                           in it, in a private mount namespace with its own
                           /run/netns (its overlay namespaces stay its own)

The tests drive each plugin over its unix socket as the engine does, and read
etcd directly (from inside the underlay namespace).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Optional

from ops.client import call
from tests.etcdserver import EtcdServer
from tests.hosts import _kill_group, wait_for

PLUGIN = os.path.join(os.path.dirname(sys.executable), "pyoverlay")
SPACE = "pyoverlay"
GW = {"RequestAddressType": "com.docker.network.gateway"}


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


class PluginError(AssertionError):
    pass


class LabHost:
    def __init__(self, lab: "Lab", index: int):
        self.lab = lab
        self.index = index
        self.addr = f"10.1.0.{index}"
        self.netns = f"{lab.ul}-{index}"
        self.dir = lab.dir / f"h{index}"
        (self.dir / "netns").mkdir(parents=True)
        (self.dir / "home").mkdir()
        self.socket = str(self.dir / "pyoverlay.sock")
        self.log = self.dir / "plugin.log"
        self.proc: Optional[subprocess.Popen] = None
        _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{index}", "netns", lab.ul)
        _ip("-n", lab.ul, "link", "set", f"h{index}", "master", "br0", "up")
        _ip("-n", self.netns, "addr", "add", f"{self.addr}/24", "dev", "eth0")
        for dev in ("lo", "eth0"):
            _ip("-n", self.netns, "link", "set", dev, "up")

    def start(self, *extra: str) -> "LabHost":
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "private",
               "sh", "-euc", 'mount --bind "$1" /run/netns; shift; exec "$@"', "sh", str(self.dir / "netns"),
               PLUGIN, "serve", "--socket", self.socket, "--store", self.lab.etcd.url,
               "--etcd-prefix", self.lab.prefix, "--advertise-addr", self.addr, "--no-catalog", *extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**os.environ, "HOME": str(self.dir / "home"),
                                              "DOCKER_HOST": f"unix://{self.dir}/no-engine.sock"})
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise PluginError(f"plugin {self.addr} exited {proc.returncode}:\n{self.log_tail()}")
            try:
                return call(self.socket, "Plugin.Activate", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(up, 30, lambda: f"plugin {self.addr} to answer; log:\n{self.log_tail()}")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(self.proc)
            self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    # The calls, as the engine makes them.

    def raw(self, method: str, body: Optional[dict] = None) -> tuple[int, object]:
        return call(self.socket, method, body, timeout=60)

    def ok(self, method: str, body: Optional[dict] = None) -> dict:
        status, answer = self.raw(method, body)
        if status != 200 or (isinstance(answer, dict) and ("Error" in answer or "Err" in answer)):
            raise PluginError(f"{method} on {self.addr}: {status} {answer}")
        return answer or {}

    def request_pool(self, subnet: str) -> str:
        return self.ok("IpamDriver.RequestPool", {"AddressSpace": SPACE, "Pool": subnet, "SubPool": "",
                                                  "Options": {}, "V6": False})["PoolID"]

    def request_address(self, pool: str, address: str = "", options: Optional[dict] = None) -> str:
        return self.ok("IpamDriver.RequestAddress", {"PoolID": pool, "Address": address,
                                                     "Options": options})["Address"].split("/")[0]

    def try_address(self, pool: str, address: str = "") -> tuple[int, dict]:
        return self.raw("IpamDriver.RequestAddress", {"PoolID": pool, "Address": address, "Options": None})

    def release_address(self, pool: str, address: str) -> None:
        self.ok("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": address})

    def create_network(self, subnet: str, **generic: str) -> tuple[str, str]:
        """RequestPool, the gateway and CreateNetwork: (pool id, network id)."""
        pool = self.request_pool(subnet)
        gateway = self.request_address(pool, "", GW)
        network_id = uuid.uuid4().hex * 2
        self.ok("NetworkDriver.CreateNetwork", {
            "NetworkID": network_id, "Options": {"com.docker.network.generic": generic},
            "IPv4Data": [{"AddressSpace": SPACE, "Pool": subnet, "Gateway": f"{gateway}/{subnet.split('/')[1]}",
                          "AuxAddresses": {}}], "IPv6Data": []})
        return pool, network_id


class Lab:
    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.ul = f"pyo-ipt-{self.tag}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"pyo-ipt-{self.tag}-"))
        self.prefix = "/pyoverlay/"
        self.hosts: list[LabHost] = []
        _ip("netns", "add", self.ul)
        # br0's MAC pinned: a bridge left to itself takes its lowest port's MAC,
        # so a host plugged in later could change the MAC etcd answers from
        # while the earlier hosts' neighbour entries still name the old one
        # (their requests then go unanswered until the entry is probed again).
        _ip("-n", self.ul, "link", "add", "br0", "address", "02:00:0a:01:00:fe", "type", "bridge")
        _ip("-n", self.ul, "addr", "add", "10.1.0.254/24", "dev", "br0")
        for dev in ("lo", "br0"):
            _ip("-n", self.ul, "link", "set", dev, "up")
        # etcd's data on tmpfs where there is one: its fsyncs then cost nothing,
        # so a disk busy with other tests' engines cannot stall it for seconds
        # (these tests measure pyoverlay's IPAM, not etcd's disk).
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._etcd_dir = tempfile.mkdtemp(prefix=f"pyo-ipt-{self.tag}-etcd-", dir=shm)
        self.etcd = EtcdServer("10.1.0.254", netns=self.ul, workdir=self._etcd_dir)
        self.etcd.start()

    def new_prefix(self) -> str:
        """A fresh key prefix: each test starts from an empty store."""
        self.prefix = f"/ipt-{uuid.uuid4().hex[:8]}/"
        return self.prefix

    def host(self, index: int) -> LabHost:
        try:
            h = LabHost(self, index)
        except Exception:  # half made: leave no namespace behind
            _ip("-n", self.ul, "link", "del", f"h{index}", check=False)
            _ip("netns", "del", f"{self.ul}-{index}", check=False)
            shutil.rmtree(self.dir / f"h{index}", ignore_errors=True)
            raise
        self.hosts.append(h)
        return h

    def drop_hosts(self) -> None:
        for h in self.hosts:
            h.kill()
            _ip("-n", self.ul, "link", "del", f"h{h.index}", check=False)  # at once: netns teardown is lazy
            _ip("netns", "del", h.netns, check=False)
            shutil.rmtree(h.dir, ignore_errors=True)
        # The next test's hosts reuse these addresses with new MACs: etcd's side
        # would keep answering the old MACs until its neighbour entries went
        # stale and were probed again (5 s: the plugin's store timeout).
        _ip("-n", self.ul, "neigh", "flush", "dev", "br0", check=False)
        self.hosts = []

    def close(self) -> None:
        self.drop_hosts()
        self.etcd.close()
        _ip("netns", "del", self.ul, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self._etcd_dir, ignore_errors=True)

    # The store, read from etcd itself (not through the code under test).

    def keys(self, under: str = "") -> dict[str, dict]:
        start = (self.prefix + under).encode()
        end = start[:-1] + bytes([start[-1] + 1])
        data = self.etcd.request("POST", "/v3/kv/range", {
            "key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()})
        return {base64.b64decode(kv["key"]).decode()[len(self.prefix):]: json.loads(base64.b64decode(kv["value"]))
                for kv in data.get("kvs", [])}

    def put(self, records: dict[str, dict]) -> None:
        """Write records as JSON, as another (older) version of pyoverlay would have."""
        ops = [{"request_put": {"key": base64.b64encode((self.prefix + k).encode()).decode(),
                                "value": base64.b64encode(json.dumps(v, sort_keys=True).encode()).decode()}}
               for k, v in records.items()]
        for i in range(0, len(ops), 100):  # etcd's default limit of operations per transaction is 128
            self.etcd.request("POST", "/v3/kv/txn", {"compare": [], "success": ops[i:i + 100], "failure": []})

    def etcd_metric(self, name: str) -> float:
        """A counter from etcd's own /metrics, summed over its labels."""
        out = subprocess.run(["ip", "netns", "exec", self.ul, "curl", "-sf", "--max-time", "10",
                              f"{self.etcd.endpoint}/metrics"], capture_output=True, text=True, timeout=15,
                             check=True).stdout
        found = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                 if line.startswith(name + " ") or line.startswith(name + "{")]
        assert found, f"etcd has no metric {name}"
        return sum(found)

    def blocks(self, subnet: str) -> dict[str, str]:
        """block CIDR -> holder host."""
        head = f"blocks/{subnet.replace('/', '_')}/"
        return {k[len(head):].replace("_", "/"): v["host"] for k, v in self.keys(head).items()}

    def addresses(self, subnet: str) -> dict[str, dict]:
        head = f"addresses/{subnet.replace('/', '_')}/"
        return {k[len(head):]: v for k, v in self.keys(head).items()}
