"""What every benchmark stands on: the e2e harness (tests/hosts.py,
tests/etcdserver.py), reused as it is, plus a client that drives a plugin
socket the way the engine does and hosts without Docker.

Hosts here are the harness's: network namespaces pyo-e2e-h<N> on the underlay
10.99.0.0/24 (pyo-e2e-ul, 10.99.0.254). A benchmark run holds the harness's
session lock, so it never runs at the same time as an e2e test session (they
would share those names), and its work directory is named pyo-e2e-* so the
harness's sweep removes it if a run is killed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from tests.etcdserver import EtcdServer
from tests.hosts import (
    PLUGIN_EXE,
    PREFIX,
    UNDERLAY_ADDR,
    UNDERLAY_NET,
    UNDERLAY_NETNS,
    Underlay,
    _kill_group,
    _run,
    _stop_group,
    _sweep_netns,
    start_holder,
    tail,
    wait_for,
)

try:  # the engine-like socket client the project shares (ops/client.py)
    from ops.client import UnixHTTPConnection as _UnixHTTPConnection
except ImportError:  # older checkouts: the harness's own
    from tests.hosts import _UnixHTTPConnection  # type: ignore[attr-defined,no-redef]

__all__ = [
    "BenchError", "PluginClient", "PlainHost", "Underlay", "EtcdServer", "new_id", "run_cmd",
    "PLUGIN_EXE", "UNDERLAY_ADDR", "UNDERLAY_NETNS", "wait_for", "tail", "process_tree", "rss_kb", "cpu_seconds",
]

ACCEPT = "application/vnd.docker.plugins.v1.2+json"


class BenchError(RuntimeError):
    pass


def new_id() -> str:
    """An ID shaped like the engine's (64 hex digits)."""
    return uuid.uuid4().hex + uuid.uuid4().hex


def run_cmd(cmd: Sequence[str], check: bool = True, timeout: float = 60, input: Optional[str] = None):
    return _run(list(cmd), check=check, timeout=timeout, input=input)


class PluginClient:
    """POST /<call> over the plugin's unix socket, as the engine does: the
    engine's Accept header, no Content-Type, one kept-alive connection (Go's
    http.Transport reuses it). A connection idle longer than gunicorn's
    keep-alive (2 s) is reopened before use, never retried after a send."""

    IDLE = 1.0

    def __init__(self, socket_path: str, timeout: float = 30):
        self.path = str(socket_path)
        self.timeout = timeout
        self._conn: Optional[_UnixHTTPConnection] = None
        self._last = 0.0

    def _connection(self) -> _UnixHTTPConnection:
        if self._conn is not None and time.monotonic() - self._last > self.IDLE:
            self.close()
        if self._conn is None:
            self._conn = _UnixHTTPConnection(self.path, timeout=self.timeout)
            self._conn.connect()
        return self._conn

    def raw(self, call: str, body: Optional[dict] = None) -> tuple[int, object, float]:
        """(status, parsed answer, seconds from send to the last byte read)."""
        data = b"" if body is None else json.dumps(body).encode()
        conn = self._connection()
        started = time.perf_counter()
        try:
            conn.request("POST", f"/{call}", body=data, headers={"Accept": ACCEPT})
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        took = time.perf_counter() - started
        self._last = time.monotonic()
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        try:
            answer = json.loads(payload) if payload else None
        except ValueError:
            answer = payload.decode(errors="replace")
        return response.status, answer, took

    def call(self, call: str, body: Optional[dict] = None) -> tuple[dict, float]:
        """The answer and its latency; raises BenchError on anything but 200."""
        status, answer, took = self.raw(call, body)
        if status != 200:
            raise BenchError(f"{call} on {self.path} answered {status}: {answer}")
        return (answer or {}), took

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- processes ------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    """ppid -> its child pids, for every process now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def child_pids(pid: int) -> list[int]:
    """pid's children (not theirs)."""
    return _children().get(pid, [])


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (gunicorn master, worker, any short forks)."""
    children = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in kB of one process, from smaps_rollup (0, 0 if gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0, 0
    return int(fields.get("Rss", "0 kB").split()[0]), int(fields.get("Pss", "0 kB").split()[0])


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of these processes, all their threads, in seconds (schedstat:
    nanoseconds, where utime/stime count 10 ms ticks)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


# -- a host without Docker --------------------------------------------------------

class PlainHost:
    """A host with no engine: network namespace pyo-e2e-h<N> cabled to the
    underlay (10.99.0.<N>), and a private mount namespace, held open by a
    `sleep`, in which a per-host directory is bound over /run/netns. The
    plugin runs in both namespaces (nsenter into the holder), so the overlay
    namespaces it makes (/run/netns/pyo-<vni>) never collide with another
    host's, and they outlive a killed plugin the way they would on a machine.
    The bench reaches them as /proc/<holder>/root/run/netns/pyo-<vni>."""

    def __init__(self, index: int, underlay: Underlay, root: Path, mtu: Optional[int] = None,
                 plugin_exe: str = PLUGIN_EXE):
        self.index = index
        self.plugin_exe = plugin_exe
        self.name = f"{PREFIX}h{index}"
        self.addr = f"{UNDERLAY_NET}.{index}"
        self.underlay = underlay
        self.mtu = mtu or underlay.mtu
        self.dir = Path(root) / f"h{index}"
        self.socket_path = self.dir / "pyoverlay.sock"
        self.log_path = self.dir / "plugin.log"
        self._holder: Optional[subprocess.Popen] = None
        self.plugin: Optional[subprocess.Popen] = None
        self.client = PluginClient(str(self.socket_path))
        self._closed = False

    def start(self) -> "PlainHost":
        for sub in ("netns", "home"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", self.name])
        self.underlay.plug(self.index, self.name, self.mtu)
        ip = ["ip", "-n", self.name]
        _run(ip + ["link", "set", "lo", "up"])
        _run(ip + ["addr", "add", f"{self.addr}/24", "dev", "eth0"])
        _run(ip + ["link", "set", "eth0", "up"])
        _run(ip + ["route", "add", "default", "via", UNDERLAY_ADDR])
        script = 'mount --bind "$1/netns" /run/netns; exec sleep infinity'
        try:
            self._holder = start_holder(self.name, self.dir, script)
        except RuntimeError as e:
            raise BenchError(str(e)) from None
        return self

    @property
    def holder_pid(self) -> int:
        return self._holder.pid

    def netns_path(self, vni: int) -> str:
        """The overlay namespace of VNI vni, as seen from the bench's namespace."""
        return f"/proc/{self._holder.pid}/root/run/netns/pyo-{vni}"

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60, input: Optional[str] = None):
        return _run(["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--", *cmd],
                    check=check, timeout=timeout, input=input)

    def run_in_overlay(self, vni: int, cmd: Sequence[str], check: bool = True, input: Optional[str] = None):
        return _run(["nsenter", f"--net={self.netns_path(vni)}", *cmd], check=check, input=input)

    def spawn_plugin(self, store_url: str, extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """Start `pyoverlay serve` and return at once (see wait_plugin)."""
        if self.plugin is not None and self.plugin.poll() is None:
            raise BenchError(f"{self.name}: the plugin is already running")
        with open(self.log_path, "a") as f:
            f.write(f"===== start {time.strftime('%H:%M:%S')} store={store_url}\n")
        log = open(self.log_path, "ab")
        cmd = ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--",
               self.plugin_exe, "serve", "--socket", str(self.socket_path), "--store", store_url,
               "--advertise-addr", self.addr, *extra_args]
        self.plugin = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            # No engine here: DOCKER_HOST names a socket nobody serves, so a
            # plugin that looks for its engine never finds another host's.
            env={**os.environ, "HOME": str(self.dir / "home"),
                 "DOCKER_HOST": f"unix://{self.dir}/no-engine.sock"},
            start_new_session=True)
        log.close()
        return self.plugin

    def wait_plugin(self, timeout: float = 30, interval: float = 0.005) -> None:
        """Until Plugin.Activate answers."""
        plugin = self.plugin

        def activated() -> bool:
            if plugin.poll() is not None:
                raise BenchError(f"{self.name}: plugin exited {plugin.returncode}:\n{tail(self.log_path)}")
            try:
                status, body, _ = self.client.raw("Plugin.Activate")
            except OSError:
                self.client.close()
                return False
            return status == 200

        wait_for(activated, timeout, lambda: f"{self.name}: Plugin.Activate; log:\n{tail(self.log_path)}",
                 interval=interval)

    def start_plugin(self, store_url: str, extra_args: Sequence[str] = ()) -> None:
        self.spawn_plugin(store_url, extra_args)
        self.wait_plugin()

    def kill_plugin(self) -> None:
        self.client.close()
        if self.plugin is not None:
            _kill_group(self.plugin)
            self.plugin = None

    def stop_plugin(self) -> None:
        self.client.close()
        if self.plugin is not None:
            _stop_group(self.plugin, signal.SIGTERM, grace=10)
            self.plugin = None

    def plugin_pids(self) -> list[int]:
        """The plugin's processes (nsenter execs: the Popen pid is gunicorn's master)."""
        if self.plugin is None or self.plugin.poll() is not None:
            return []
        return process_tree(self.plugin.pid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()
        for proc in (self.plugin, self._holder):
            if proc is not None:
                _kill_group(proc)
        _sweep_netns([self.name])
        self.underlay.unplug(self.index)
        # The overlay namespaces were mounts of the holder's namespace, gone
        # with it; what is left are the empty mount-point files.
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def env_python() -> str:
    return sys.executable


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix=PREFIX + "bench-"))
