"""A real etcd for tests: own ports, own temporary data dir, stopped by PID.

    with EtcdServer() as etcd:              # or etcd = EtcdServer(); etcd.start()
        store = open_store(etcd.url)
        etcd.restart()                      # same ports, same data
        etcd.pause(); etcd.resume()         # SIGSTOP/SIGCONT: a stalled etcd
        etcd.compact(revision)

netns="name" runs etcd inside that network namespace (`ip netns exec` is fine
for etcd; it needs no /sys). host must then be an address of that namespace.
tls=EtcdTLS(...) serves https (and checks client certificates if client_ca).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

from tests.serverproc import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


@dataclass
class EtcdTLS:
    cert: str  # server certificate (with the host's IP in its subjectAltName)
    key: str
    ca: str  # CA that signed cert; clients pass it as cacert
    client_ca: Optional[str] = None  # when set, clients must present a cert it signed
    client_cert: Optional[str] = None  # what this harness presents then
    client_key: Optional[str] = None


def _request(url, method, body, timeout, ca, cert, key) -> str:
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
        return r.read().decode()


def _free_ports(host: str, n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class EtcdServer(ServerProcess):
    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        netns: Optional[str] = None,
        tls: Optional[EtcdTLS] = None,
        name: str = "n1",
        workdir: Optional[str] = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 15.0,
    ):
        self.host = host
        self.netns = netns
        self.tls = tls
        self.name = name
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        # workdir holds data/ and etcd.log; a temporary one is removed by close().
        self._own_dir = workdir is None
        self.workdir = tempfile.mkdtemp(prefix="etcd-test-") if workdir is None else workdir
        self.data_dir = os.path.join(self.workdir, "data")
        self.log_path = os.path.join(self.workdir, "etcd.log")
        self.proc: Optional[subprocess.Popen] = None
        self.client_port: Optional[int] = None
        self.peer_port: Optional[int] = None

    # Addresses.

    @property
    def _h(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self._h}:{self.client_port}"

    @property
    def url(self) -> str:
        """For open_store(); TLS servers need cacert= (and cert=/key= with client_ca)."""
        scheme = "etcds" if self.tls else "etcd"
        return f"{scheme}://{self._h}:{self.client_port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    # Lifecycle.

    def _command(self) -> list[str]:
        peer = f"http://{self._h}:{self.peer_port}"
        cmd = [
            ETCD,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            # A one-member test cluster: elect at once, and allow 1 s leases.
            "--heartbeat-interval", "50",
            "--election-timeout", "250",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.tls.client_ca:
                cmd += ["--client-cert-auth", "--trusted-ca-file", self.tls.client_ca]
        cmd += list(self.extra_args)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd  # it execs etcd: same PID
        return cmd

    def start(self) -> "EtcdServer":
        if self.proc and self.proc.poll() is None:
            raise RuntimeError(f"etcd already running (pid {self.proc.pid})")
        keep_ports = self.client_port is not None
        # Ports picked here may be taken by the time etcd binds; try again then
        # (never with a restart, whose clients expect the same address).
        for attempt in range(1 if keep_ports else 3):
            if not keep_ports:
                self.client_port, self.peer_port = _free_ports(self.host if not self.netns else "127.0.0.1", 2)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_healthy():
                return self
            self._terminate(signal.SIGKILL)
        raise RuntimeError(f"etcd did not become healthy at {self.endpoint}; log tail:\n{self.log_tail()}")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited (a port clash, a bad flag): the log says why
            try:
                if self.request("GET", "/health", timeout=1.0).get("health") == "true":
                    return True
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(0.05)  # poll interval of a wait with a deadline
        return False

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: connections stay open, nothing answers. Returns once every
        thread has stopped (the signal is asynchronous: a request sent right
        after kill() could still be served)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not self._stopped():
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd pid {self.proc.pid} did not stop")
            time.sleep(0.001)

    def _stopped(self) -> bool:
        tasks = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue  # a thread that just exited
            if state not in ("T", "t"):
                return False
        return True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    # Talking to it directly (not through the code under test).

    def request(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 5.0) -> dict:
        """One HTTP call to the gateway, made from inside the netns if there is one."""
        cert = key = None
        if self.tls and self.tls.client_ca:
            cert, key = self.tls.client_cert, self.tls.client_key
        args = [self.endpoint + path, method, body, timeout, self.tls and self.tls.ca, cert, key]
        if not self.netns:
            return json.loads(_request(*args) or "{}")
        cmd = ["ip", "netns", "exec", self.netns, sys.executable, "-c",
               f"import sys, json; sys.path.insert(0, {ROOT!r}); "
               "from tests import etcdserver; sys.stdout.write(etcdserver._request(*json.loads(sys.argv[1])))",
               json.dumps(args)]
        out = subprocess.run(cmd, capture_output=True, timeout=timeout + 5)
        if out.returncode != 0:
            raise OSError(f"etcd request {method} {path} failed: {out.stderr.decode()[-300:]}")
        return json.loads(out.stdout or b"{}")

    def compact(self, revision: int) -> None:
        """Compact history below revision (watches from before it get Compacted)."""
        self.request("POST", "/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def revision(self) -> int:
        data = self.request("POST", "/v3/kv/range", {"key": "AA==", "limit": 1})
        return int(data["header"]["revision"])
