"""A real ZooKeeper for tests: Debian's server jars, own ports, own temporary
data dir, stopped by PID.

    with ZkServer() as zk:                  # or zk = ZkServer(); zk.start()
        store = open_store(zk.url)
        zk.restart()                        # same ports, same data
        zk.kill(); zk.start()               # a crash
    with ZkEnsemble(3) as ens:              # three members on loopback
        store = open_store(ens.url)
        ens.members[0].kill()

netns="name" runs the server inside that network namespace (the e2e tests'
underlay); host must then be an address of that namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from tests.serverproc import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JAVA = shutil.which("java") or "/usr/bin/java"
# zookeeper.jar's manifest names its other jars but netty-codec (which the
# TLS port's Netty factory needs); slf4j-simple gives it a log.
CLASSPATH = "/usr/share/java/zookeeper.jar:/usr/share/java/netty-codec.jar:/usr/share/java/slf4j-simple.jar"
MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
#: A small heap and the quick JIT: a test server starts in about a second.
JVM_ARGS = ("-Xmx192m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info", "-Dzookeeper.admin.enableServer=false")


def four_letter(host: str, port: int, word: str, timeout: float = 1.0) -> str:
    """One of ZooKeeper's four-letter commands (srvr, ruok, mntr), answered as text."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(word.encode())
        chunks = []
        while True:
            data = s.recv(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


@dataclass
class ZkTLS:
    cert: str  # server certificate (with the host's IP in its subjectAltName)
    key: str  # its key, PKCS#8 PEM
    ca: str  # CA that signed cert; clients pass it as cacert
    client_auth: bool = False  # clients must present a certificate ca signed


class ZkServer(ServerProcess):
    stop_timeout = 15.0

    def __init__(self, host: str = "127.0.0.1", *, netns: Optional[str] = None, workdir: Optional[str] = None,
                 start_timeout: float = 30.0, extra_config: dict[str, str] | None = None,
                 tls: Optional[ZkTLS] = None):
        self.host = host
        self.tls = tls
        self.secure_port: Optional[int] = None  # with tls: the TLS client port (the plain one stays, for 4lw)
        self.netns = netns
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        self._own_dir = workdir is None
        self.workdir = tempfile.mkdtemp(prefix="zk-test-") if workdir is None else workdir
        self.data_dir = os.path.join(self.workdir, "data")
        self.log_path = os.path.join(self.workdir, "zookeeper.log")
        self.config_path = os.path.join(self.workdir, "zoo.cfg")
        self.proc: Optional[subprocess.Popen] = None
        self.client_port: Optional[int] = None
        # Set by ZkEnsemble: this member's id and every member's "server.N" line.
        self.myid: Optional[int] = None
        self.servers: dict[int, str] = {}

    @property
    def _h(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def address(self) -> str:
        return f"{self._h}:{self.client_port}"

    @property
    def url(self) -> str:
        if self.tls:
            return f"zks://{self._h}:{self.secure_port}"
        return f"zk://{self.address}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def _write_config(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        lines = {
            # Ticks of 200 ms: sessions from 0.4 s (2 ticks) up to 60 s.
            "tickTime": "200",
            "initLimit": "50",
            "syncLimit": "10",
            "maxSessionTimeout": "60000",
            "dataDir": self.data_dir,
            "clientPort": str(self.client_port),
            "clientPortAddress": self.host,
            "4lw.commands.whitelist": "srvr,ruok,mntr",
            "admin.enableServer": "false",
            # Snapshots and the transaction log in a test's tmp dir: no fsync.
            "forceSync": "no",
        }
        if self.servers:
            with open(os.path.join(self.data_dir, "myid"), "w") as f:
                f.write(f"{self.myid}\n")
            lines["standaloneEnabled"] = "false"
            for sid, spec in self.servers.items():
                lines[f"server.{sid}"] = spec
        if self.tls:
            keystore = os.path.join(self.workdir, "keystore.pem")
            with open(keystore, "w") as out, open(self.tls.key) as k, open(self.tls.cert) as c:
                out.write(k.read() + c.read())
            lines.update({
                "secureClientPort": str(self.secure_port),
                "secureClientPortAddress": self.host,
                "serverCnxnFactory": "org.apache.zookeeper.server.NettyServerCnxnFactory",
                "ssl.keyStore.location": keystore,
                "ssl.keyStore.type": "PEM",
                "ssl.trustStore.location": self.tls.ca,
                "ssl.trustStore.type": "PEM",
                "ssl.clientAuth": "need" if self.tls.client_auth else "none",
            })
        lines.update(self.extra_config)
        with open(self.config_path, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in lines.items())

    def _command(self) -> list[str]:
        cmd = [JAVA, *JVM_ARGS, f"-Dzookeeper.log.dir={self.workdir}", "-cp", CLASSPATH, MAIN, self.config_path]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    def launch(self) -> None:
        """Start the process without waiting for it to serve (an ensemble member
        serves only once a quorum is up)."""
        if self.proc and self.proc.poll() is None:
            raise RuntimeError(f"ZooKeeper already running (pid {self.proc.pid})")
        if self.client_port is None:
            from tests.etcdserver import _free_ports  # (imported here: mode() runs this file alone in a netns)

            self.client_port, self.secure_port = _free_ports(self.host if not self.netns else "127.0.0.1", 2)
        self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def start(self) -> "ZkServer":
        keep_port = self.client_port is not None
        for _ in range(1 if keep_port else 3):
            self.launch()
            if self.wait_serving():
                return self
            self._terminate(signal.SIGKILL)
            if not keep_port:
                self.client_port = None  # taken meanwhile: pick another
        raise RuntimeError(f"ZooKeeper did not serve at {self.address}; log tail:\n{self.log_tail()}")

    def mode(self) -> Optional[str]:
        """standalone, leader or follower while it serves; None otherwise."""
        try:
            if self.netns:  # asked from inside the namespace
                out = subprocess.run(
                    ["ip", "netns", "exec", self.netns, sys.executable, "-c",
                     f"import sys; sys.path.insert(0, {ROOT!r}); from tests import zkserver; "
                     f"print(zkserver.four_letter({self.host!r}, {self.client_port}, 'srvr'))"],
                    capture_output=True, text=True, timeout=10)
                answer = out.stdout
            else:
                answer = four_letter(self.host, self.client_port, "srvr")
        except (OSError, subprocess.SubprocessError):
            return None
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def wait_serving(self, timeout: Optional[float] = None) -> bool:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if self.mode():
                return True
            time.sleep(0.05)  # poll interval of a wait with a deadline
        return False

class ZkEnsemble:
    """n members on loopback, each with its own client, quorum and election port."""

    def __init__(self, n: int = 3, host: str = "127.0.0.1", start_timeout: float = 60.0):
        self.members = [ZkServer(host, start_timeout=start_timeout) for _ in range(n)]
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return "zk://" + ",".join(m.address for m in self.members)

    def start(self) -> "ZkEnsemble":
        from tests.etcdserver import _free_ports

        ports = _free_ports(self.members[0].host, 3 * len(self.members))
        servers = {}
        for i, m in enumerate(self.members, 1):
            m.client_port, quorum, election = ports[3 * i - 3:3 * i]
            servers[i] = f"{m.host}:{quorum}:{election}"
        for i, m in enumerate(self.members, 1):
            m.myid, m.servers = i, servers
            m.launch()
        deadline = time.monotonic() + self.start_timeout
        for m in self.members:
            if not m.wait_serving(max(0.1, deadline - time.monotonic())):
                tails = "\n".join(f"--- member {x.myid}:\n{x.log_tail(15)}" for x in self.members)
                self.close()
                raise RuntimeError(f"ZooKeeper ensemble did not form; log tails:\n{tails}")
        return self

    def leader(self) -> ZkServer:
        for m in self.members:
            if m.mode() == "leader":
                return m
        raise RuntimeError("no member says it leads")

    def close(self) -> None:
        for m in self.members:
            m.close()

    def __enter__(self) -> "ZkEnsemble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
