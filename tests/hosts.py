"""Hosts for end-to-end tests: a real dockerd, the real kernel, pyoverlay as a
legacy plugin next to it.

`Host` is the interface the tests use; `NamespaceHost` implements it with a
network namespace and a private mount namespace per host on this machine
(see /work/shared/docs/test-hosts.md). A backend over SSH to VMs implements
the same methods with `ssh`; nothing in the tests may assume a shared
filesystem beyond what `Host` offers.
"""

from __future__ import annotations

import abc
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from ops.client import call
from tests.engines import engine_env

PREFIX = "pyo-e2e-"
UNDERLAY_NETNS = PREFIX + "ul"
UNDERLAY_NET = "10.99.0"
UNDERLAY_ADDR = UNDERLAY_NET + ".254"
PLUGIN_SOCKET = "/run/docker/plugins/pyoverlay.sock"
IMAGE = "pyo-busybox"
# The CLI that CI installs with docker.io; /usr/local/bin/docker (28.x) works too.
DOCKER_CLI = os.environ.get("PYO_E2E_DOCKER", "/usr/bin/docker")
#: A goroutine blocked on a mutex in a Go stack dump (Go before 1.20 says semacquire).
LOCK_WAIT = re.compile(r"\[(?:semacquire|sync\.(?:RW)?Mutex\.R?Lock)[^\]]*\]:")
PLUGIN_EXE = str(Path(sys.executable).with_name("pyoverlay"))


def wait_for(cond: Callable[[], object], timeout: float, what: Union[str, Callable[[], str]],
             interval: float = 0.05):
    """Poll cond until it returns something truthy (and return that), or fail
    after timeout seconds saying what was awaited. `what` may be a callable so
    the message can carry state read at failure time (a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() >= deadline:
            message = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose text carries the output, so pytest shows why."""

    def __str__(self) -> str:
        return (f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
                f"stdout: {(self.stdout or '').strip()}\nstderr: {(self.stderr or '').strip()}")


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 60, input: Optional[str] = None,
         env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input, env=env)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{' '.join(cmd)} did not finish within {timeout:g}s "
                           f"(stdout: {exc.stdout!r}, stderr: {exc.stderr!r})") from None
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def tail(path: Union[str, Path], lines: int = 80) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


class Host(abc.ABC):
    """One machine running dockerd, as the tests see it."""

    name: str
    index: int  # 1..N among the hosts of a test run (names of containers tell hosts apart by it)
    addr: str  # underlay address: the VTEP and where published ports answer
    state_dir: str  # a directory on the host for per-host files (the sqlite store)
    python: str  # a Python on the host that has pyoverlay installed

    @abc.abstractmethod
    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run cmd in the host's network and mount namespace (text output)."""

    def docker_proc(self, *args: str, check: bool = True, timeout: float = 60,
                    input: Optional[str] = None) -> subprocess.CompletedProcess:
        """The docker CLI against this host's engine, for callers that need rc and stderr."""
        return self.run(["docker", *args], check=check, timeout=timeout, input=input)

    def docker(self, *args: str, timeout: float = 60) -> str:
        """The docker CLI against this host's engine; stdout, stripped; raises on failure."""
        return self.docker_proc(*args, timeout=timeout).stdout.strip()

    @abc.abstractmethod
    def start_plugin(self, store_url: str, extra_args: Sequence[str] = (),
                     env: Optional[Mapping[str, str]] = None) -> None:
        """Start `pyoverlay serve` and return once it answers Plugin.Activate."""

    @abc.abstractmethod
    def stop_plugin(self) -> None:
        """SIGTERM, then wait for the plugin to exit."""

    @abc.abstractmethod
    def kill_plugin(self) -> None:
        """SIGKILL the plugin (all its processes) and wait until they are gone."""

    @property
    @abc.abstractmethod
    def plugin_running(self) -> bool:
        ...

    @abc.abstractmethod
    def plugin_request(self, method: str, body: Optional[dict] = None) -> tuple[int, object]:
        """POST /<method> on the plugin socket as the engine does; (status, parsed JSON)."""

    @abc.abstractmethod
    def restart_engine(self) -> None:
        """Stop dockerd and start it again; returns once `docker info` answers."""

    @abc.abstractmethod
    def plugin_log(self) -> str:
        ...

    @abc.abstractmethod
    def engine_log(self) -> str:
        ...

    @abc.abstractmethod
    def close(self) -> None:
        """Remove everything the host made. Safe to call twice and after a failed start."""

    # Read-only views built on run(), so every backend has them.
    def links(self, netns: Optional[str] = None) -> dict[str, dict]:
        """Links by name in the host namespace, or in one of its named namespaces."""
        cmd = ["ip", "-j", "-d"] + (["-n", netns] if netns else []) + ["link", "show"]
        return {link["ifname"]: link for link in json.loads(self.run(cmd).stdout or "[]")}

    def netns_names(self) -> list[str]:
        """Named network namespaces of this host (/run/netns as the host sees it)."""
        out = self.run(["ip", "netns", "list"]).stdout
        return sorted(line.split()[0] for line in out.splitlines() if line.strip())


class Underlay:
    """The physical network between hosts: a bridge in a namespace of its own,
    so the root namespace stays clean. 10.99.0.254 is the underlay's own
    address (a place for etcd, or a server that containers reach outbound)."""

    def __init__(self, workdir: Union[str, Path], mtu: int = 1500):
        self.netns = UNDERLAY_NETNS
        self.addr = UNDERLAY_ADDR
        self.mtu = mtu
        self.dir = Path(workdir)
        self._procs: list[subprocess.Popen] = []

    def setup(self) -> "Underlay":
        self.dir.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", self.netns])
        self.ip("link", "set", "lo", "up")
        # The MAC pinned: a bridge takes its lowest port's MAC, so a host
        # plugged in later could change the MAC etcd answers from under the
        # earlier hosts' neighbour entries (see tests/ipamlab.py).
        self.ip("link", "add", "br0", "mtu", str(self.mtu), "address", "02:00:0a:63:00:fe", "type", "bridge")
        self.ip("addr", "add", f"{self.addr}/24", "dev", "br0")
        self.ip("link", "set", "br0", "up")
        return self

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", self.netns, *args])

    def plug(self, index: int, host_netns: str, mtu: int) -> None:
        """Cable host <index> in: its eth0 gets 10.99.0.<index>/24 with this MTU."""
        port = f"h{index}"
        # Created here, the peer goes straight into the host namespace, so no
        # name is ever taken in the root namespace.
        self.ip("link", "add", port, "mtu", str(mtu), "type", "veth",
                "peer", "name", "eth0", "mtu", str(mtu), "netns", host_netns)
        self.ip("link", "set", port, "master", "br0", "up")

    def unplug(self, index: int) -> None:
        # Explicitly: a namespace is destroyed asynchronously, and until then
        # the port (the veth's other end) would keep its name here.
        _run(["ip", "-n", self.netns, "link", "del", f"h{index}"], check=False)

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(["nsenter", f"--net=/run/netns/{self.netns}", *cmd], check=check, timeout=timeout)

    def spawn(self, cmd: Sequence[str], log_name: str) -> subprocess.Popen:
        """A background process in the underlay namespace, killed at close()."""
        log = open(self.dir / log_name, "ab")
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns}", *cmd],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self._procs.append(proc)
        return proc

    def serve_http(self, port: int, files: Mapping[str, str]) -> str:
        """busybox httpd on the underlay address serving files; returns its base URL."""
        root = self.dir / f"www{port}"
        root.mkdir(exist_ok=True)
        for name, content in files.items():
            (root / name).write_text(content)
        proc = self.spawn(["busybox", "httpd", "-f", "-p", f"{self.addr}:{port}", "-h", str(root)],
                          f"httpd{port}.log")
        url = f"http://{self.addr}:{port}"
        probe = next(iter(files))

        def answering() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"httpd on the underlay exited: {tail(self.dir / f'httpd{port}.log')}")
            return self.run(["busybox", "wget", "-qO-", f"{url}/{probe}"], check=False).returncode == 0

        wait_for(answering, 10, f"httpd on {url}")
        return url

    def close(self) -> None:
        for proc in self._procs:
            _kill_group(proc)
        self._procs.clear()
        _sweep_netns([self.netns])


class NamespaceHost(Host):
    """A host made of a network namespace pyo-e2e-h<N> (eth0 on the underlay)
    and a private mount namespace, held open by a `sleep` so that it survives
    engine restarts the way a machine's filesystem does. In that mount
    namespace /run is a tmpfs of the host's own, with per-host directories
    bound over /run/docker/plugins, /run/netns and /etc/docker: the plugin
    socket and the namespaces the plugin makes never collide with another
    host's, and the tests can reach the socket from here."""

    def __init__(self, index: int, underlay: Underlay, root: Union[str, Path], image_tar: Union[str, Path],
                 mtu: Optional[int] = None, plugin_exe: str = PLUGIN_EXE, engine_gwbridge: bool = False,
                 daemon_config: Optional[Mapping[str, object]] = None):
        if not 1 <= index <= 253:
            raise ValueError("host index must be within 1..253 (it is the last octet of the address)")
        self.index = index
        self.name = f"{PREFIX}h{index}"
        self.addr = f"{UNDERLAY_NET}.{index}"
        self.mtu = mtu or underlay.mtu
        self.underlay = underlay
        self.dir = Path(root) / f"h{index}"
        self.state_dir = str(self.dir)
        self.python = sys.executable
        self.image_tar = str(image_tar)
        self.plugin_exe = plugin_exe
        # True: nothing makes docker_gwbridge beforehand; the engine creates it
        # (its own subnet choice) when the first container needs a way out.
        self.engine_gwbridge = engine_gwbridge
        self.daemon_config = dict(daemon_config or {})  # the engine's daemon.json (e.g. "dns")
        self.socket_path = self.dir / "plugins" / Path(PLUGIN_SOCKET).name
        self.cgroup_parent = self.name
        self.timings: dict[str, float] = {}
        self._holder: Optional[subprocess.Popen] = None
        self._dockerd: Optional[subprocess.Popen] = None
        self._plugin: Optional[subprocess.Popen] = None
        self._closed = False

    # -- bring-up -----------------------------------------------------------
    def start(self) -> "NamespaceHost":
        t0 = time.monotonic()
        for sub in ("plugins", "netns", "etc-docker", ".cg", "data", "exec", "cli"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "daemon.json").write_text(json.dumps(self.daemon_config) + "\n")
        _run(["ip", "netns", "add", self.name])
        self.underlay.plug(self.index, self.name, self.mtu)
        ip = ["ip", "-n", self.name]
        _run(ip + ["link", "set", "lo", "up"])
        _run(ip + ["addr", "add", f"{self.addr}/24", "dev", "eth0"])
        _run(ip + ["link", "set", "eth0", "up"])
        # dockerd's default bridge, so it never creates or touches a docker0.
        # Pinned MAC, as the underlay's br0: the containers' gateway must not
        # change its MAC when the next container's veth joins.
        _run(ip + ["link", "add", "hostbr0", "address", f"02:00:ac:1e:{self.index:02x}:01", "type", "bridge"])
        _run(ip + ["addr", "add", f"172.30.{self.index}.1/24", "dev", "hostbr0"])
        _run(ip + ["link", "set", "hostbr0", "up"])
        self._start_holder()
        self.timings["namespaces"] = time.monotonic() - t0

        t1 = time.monotonic()
        self._start_engine()
        self.timings["engine_start"] = time.monotonic() - t1

        t2 = time.monotonic()
        if not self.engine_gwbridge:
            self.docker("network", "create", "--subnet", f"172.31.{self.index}.0/24",
                        "-o", "com.docker.network.bridge.name=docker_gwbridge",
                        "-o", "com.docker.network.bridge.enable_icc=false",
                        "-o", "com.docker.network.bridge.enable_ip_masquerade=true",
                        "docker_gwbridge")
        self.docker("import", "-c", 'CMD ["sh"]', self.image_tar, IMAGE)
        self.timings["gwbridge_and_image"] = time.monotonic() - t2
        self.timings["bring_up"] = time.monotonic() - t0
        return self

    def _start_holder(self) -> None:
        # `ip netns exec` would mount a fresh /sys and hide the cgroup mounts
        # dockerd needs, hence nsenter + unshare and the /sys dance.
        script = r"""
            mount --rbind /sys/fs/cgroup "$1/.cg"
            mount -t sysfs sysfs /sys
            mount --move "$1/.cg" /sys/fs/cgroup
            mount -t tmpfs -o mode=755 tmpfs /run
            mkdir -p /run/docker/plugins /run/netns /etc/docker
            mount --bind "$1/plugins" /run/docker/plugins
            mount --bind "$1/netns" /run/netns
            mount --bind "$1/etc-docker" /etc/docker
            exec sleep infinity
        """
        self._holder = start_holder(self.name, self.dir, script)

    def _dockerd_cmd(self) -> list[str]:
        d = self.dir
        return ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--",
                "dockerd", "--debug",
                "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
                # Its own socket for the tests, and the usual one inside the
                # host's private /run for what runs on the host (the plugin).
                "-H", f"unix://{d / 'docker.sock'}", "-H", "unix:///var/run/docker.sock",
                "--pidfile", str(d / "dockerd.pid"),
                "--config-file", str(d / "daemon.json"), "-b", "hostbr0",
                # cgroupfs under a top-level parent named after the host (a
                # relative one would nest under our own cgroup): the sweep
                # finds containers of a crashed run by that name.
                "--exec-opt", "native.cgroupdriver=cgroupfs", "--cgroup-parent", "/" + self.cgroup_parent]

    def _start_engine(self) -> None:
        log = open(self.dir / "dockerd.log", "ab")
        # nsenter without -p execs: the Popen pid is dockerd's.
        self._dockerd = subprocess.Popen(self._dockerd_cmd(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=engine_env())
        log.close()
        dockerd = self._dockerd

        def answering() -> bool:
            if dockerd.poll() is not None:
                raise RuntimeError(f"{self.name}: dockerd exited {dockerd.returncode}:\n{tail(self.dir / 'dockerd.log')}")
            return self.docker_proc("info", "--format", "{{.ID}}", check=False, timeout=10).returncode == 0

        wait_for(answering, 30, lambda: f"{self.name}: docker info; dockerd log:\n{tail(self.dir / 'dockerd.log')}")

    # -- Host interface -----------------------------------------------------
    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        return _run(["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--", *cmd],
                    check=check, timeout=timeout, input=input)

    def docker_proc(self, *args: str, check: bool = True, timeout: float = 60,
                    input: Optional[str] = None) -> subprocess.CompletedProcess:
        # The engine socket is a file in the host's directory: the CLI can run
        # from here, and an own DOCKER_CONFIG keeps the user's contexts out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.dir / "cli")
        try:
            return _run([DOCKER_CLI, "-H", f"unix://{self.dir / 'docker.sock'}", *args],
                        check=check, timeout=timeout, input=input, env=env)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.name}: {self.engine_stacks()}") from None

    def engine_stacks(self) -> str:
        """Where dockerd wrote its goroutine stacks (SIGUSR1): what a hung engine waits on."""
        log = self.dir / "dockerd.log"
        start = log.stat().st_size
        os.kill(self._dockerd.pid, signal.SIGUSR1)

        def written() -> Optional[str]:
            with open(log, errors="replace") as f:
                f.seek(start)
                found = re.search(r"goroutine stacks written to (\S+)", f.read())
            return found.group(1).strip('"') if found else None

        try:
            path = wait_for(written, 10, "dockerd's goroutine stacks")
        except TimeoutError:
            return "dockerd wrote no goroutine stacks on SIGUSR1"
        # Outside the session's work directory, which goes at its end.
        keep = Path(tempfile.gettempdir()) / f"pyo-e2e-stacks-{self.name}-{time.strftime('%H%M%S')}.log"
        shutil.copy(path, keep)
        text = keep.read_text(errors="replace")
        waiting = len(LOCK_WAIT.findall(text))
        return f"dockerd's goroutine stacks in {keep} ({text.count('goroutine ')} goroutines, {waiting} waiting on a lock)"

    def start_plugin(self, store_url: str, extra_args: Sequence[str] = (),
                     env: Optional[Mapping[str, str]] = None) -> None:
        if self.plugin_running:
            raise RuntimeError(f"{self.name}: the plugin is already running")
        log_path = self.dir / "plugin.log"
        with open(log_path, "a") as f:
            f.write(f"===== start_plugin {time.strftime('%H:%M:%S')} store={store_url} {list(extra_args)}\n")
        log = open(log_path, "ab")
        # In dockerd's mount and network namespace: the /sys, /run/netns and
        # SandboxKey paths a plugin sees on a real host.
        cmd = ["nsenter", "-t", str(self._dockerd.pid), "-m", "-n", "--",
               self.plugin_exe, "serve", "--socket", PLUGIN_SOCKET, "--store", store_url,
               "--advertise-addr", self.addr, *extra_args]
        # A HOME of its own, as on a machine of its own (gunicorn puts a
        # control socket there).
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        # No DOCKER_* of ours: the plugin finds its engine as on a real host.
        base = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self._plugin = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env={**base, "HOME": str(home), **(env or {})},
                                        start_new_session=True)
        log.close()
        plugin = self._plugin

        def activated() -> bool:
            if plugin.poll() is not None:
                raise RuntimeError(f"{self.name}: plugin exited {plugin.returncode}:\n{tail(log_path)}")
            try:
                status, body = self.plugin_request("Plugin.Activate")
            except OSError:
                return False  # not listening yet
            return status == 200 and "NetworkDriver" in (body or {}).get("Implements", [])

        t0 = time.monotonic()
        wait_for(activated, 20, lambda: f"{self.name}: plugin to answer Plugin.Activate; log:\n{tail(log_path)}")
        self.timings["plugin_start"] = time.monotonic() - t0

    def plugin_request(self, method: str, body: Optional[dict] = None) -> tuple[int, object]:
        return call(str(self.socket_path), method, body)

    def stop_plugin(self) -> None:
        if self._plugin is not None:
            _stop_group(self._plugin, signal.SIGTERM, grace=10)
            self._plugin = None

    def kill_plugin(self) -> None:
        if self._plugin is not None:
            _kill_group(self._plugin)
            self._plugin = None

    @property
    def plugin_running(self) -> bool:
        return self._plugin is not None and self._plugin.poll() is None

    def restart_engine(self) -> None:
        """The engine stops each running container with its stop timeout (10 s
        unless `docker run --stop-timeout`): `sleep` as PID 1 ignores SIGTERM,
        so run containers that must survive a restart quickly with --init."""
        t0 = time.monotonic()
        _stop_group(self._dockerd, signal.SIGTERM, grace=30)
        self._start_engine()
        self.timings["engine_restart"] = time.monotonic() - t0

    def kill_engine(self) -> None:
        """SIGKILL dockerd, as when the machine dies (its containers stay, unmanaged, until close)."""
        if self._dockerd is not None:
            _kill_group(self._dockerd)

    def plugin_log(self) -> str:
        return tail(self.dir / "plugin.log", 400)

    def engine_log(self) -> str:
        # --debug is for the plugin calls and API requests it logs; keep those,
        # warnings and errors, drop the start-up chatter.
        def relevant(line: str) -> bool:
            if "level=warning" in line or "level=error" in line or "level=fatal" in line:
                return True
            if 'msg="Registering ' in line:
                return False
            return "level=debug" in line and ("Calling " in line or "plugin" in line.lower())

        try:
            with open(self.dir / "dockerd.log", errors="replace") as f:
                lines = [line for line in f if relevant(line)]
        except FileNotFoundError:
            return "(no dockerd log)"
        return "".join(lines[-150:])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in (self._plugin, self._dockerd, self._holder):
            if proc is not None:
                _kill_group(proc)
        # Everything else this host ran (containerd, shims, docker-proxy,
        # containers) is found by namespace and cgroup; its mounts die with the
        # last process of the mount namespace.
        _sweep_netns([self.name])
        self.underlay.unplug(self.index)
        _sweep_cgroups(self.cgroup_parent)
        remove_tree(self.dir)


# -- processes ----------------------------------------------------------------

def start_holder(netns: str, workdir: Path, script: str) -> subprocess.Popen:
    """A `sleep` that holds a private mount namespace inside netns, set up by
    script (run by sh with workdir as $1): the processes of one host enter it
    with nsenter -t PID -m -n. Returns once the script has run."""
    with open(workdir / "holder.log", "ab") as log:
        holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--mount", "--propagation", "private",
             "sh", "-euc", script, "sh", str(workdir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def mounted() -> bool:
        if holder.poll() is not None:
            raise RuntimeError(f"{netns}: mount namespace setup failed: {tail(workdir / 'holder.log')}")
        return _comm(holder.pid) == "sleep"

    wait_for(mounted, 10, f"{netns}: mount namespace holder")
    return holder

def _comm(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """True unless gone or a zombie (a zombie holds no namespace or mount)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def _stop_group(proc: subprocess.Popen, sig: int, grace: float) -> None:
    """Signal the leader only (dockerd stops its containerd, gunicorn its
    workers, each in order); SIGKILL the whole group after grace seconds."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
    wait_for(lambda: not _group_members(proc.pid), 10, f"process group {proc.pid} to exit")


def _kill_pids(pids: Iterable[int], what: str) -> None:
    pids = set(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(_alive(p) for p in pids), 10, f"{what} to exit (pids {sorted(pids)})")


def _pids_in_netns(inodes: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(int(entry))
            except OSError:
                continue
    return found


# -- clean-up -------------------------------------------------------------------
def _sweep_netns(names: Iterable[str]) -> None:
    """Kill every process in these namespaces, then delete them."""
    paths = [f"/run/netns/{n}" for n in names if os.path.exists(f"/run/netns/{n}")]
    inodes = set()
    for p in paths:
        try:
            inodes.add(os.stat(p).st_ino)
        except OSError:
            pass
    if inodes:
        _kill_pids([p for p in _pids_in_netns(inodes) if p != os.getpid()], f"processes in {paths}")
    for p in paths:
        _run(["ip", "netns", "del", os.path.basename(p)], check=False)
        if os.path.exists(p):  # the mount went, the file did not: remove it by hand
            _run(["umount", "-l", p], check=False)
            try:
                os.unlink(p)
            except OSError:
                pass


def _cgroup_dirs(name: str) -> list[str]:
    # cgroup v1 has one tree per controller, v2 a single one.
    return sorted(glob.glob(f"/sys/fs/cgroup/{name}") + glob.glob(f"/sys/fs/cgroup/*/{name}"))


def _sweep_cgroups(name: str) -> None:
    """Kill what runs in the containers' cgroups under the parent `name`, remove the cgroups."""
    tops = _cgroup_dirs(name)
    pids = set()
    for top in tops:
        for procs in glob.glob(f"{top}/**/cgroup.procs", recursive=True):
            try:
                pids.update(int(p) for p in Path(procs).read_text().split())
            except OSError:
                pass
    if pids:
        _kill_pids(pids, f"containers under cgroup {name}")

    def removed() -> bool:
        # Deepest first; a cgroup whose last task is still being reaped refuses rmdir.
        for top in tops:
            for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -t[0].count("/")):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
        return not any(os.path.exists(t) for t in tops)

    wait_for(removed, 10, lambda: f"removal of cgroups {[t for t in tops if os.path.exists(t)]}")


def remove_tree(path: Union[str, Path]) -> None:
    """rm -rf, after lazily unmounting anything under path still visible here:
    a namespace bind-mounted there (a Dataplane's netns_dir) would otherwise
    stay alive, with its devices, after rmtree gave up on the mount point."""
    path = str(path)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == path or point.startswith(path + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        _run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        raise RuntimeError(f"{path} could not be removed")


def sweep_leftovers() -> list[str]:
    """Remove what a crashed earlier run left behind: namespaces, processes,
    cgroups, links in the root namespace and work directories named pyo-e2e-*.
    Returns what it removed, for the session log."""
    removed = []
    names = sorted(n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                   if n.startswith(PREFIX))
    if names:
        _sweep_netns(names)
        removed += [f"netns {n}" for n in names]
    for top in sorted({os.path.basename(d) for d in _cgroup_dirs(PREFIX + "*")}):
        _sweep_cgroups(top)
        removed.append(f"cgroup {top}")
    for link in json.loads(_run(["ip", "-j", "link", "show"]).stdout or "[]"):
        if link["ifname"].startswith(PREFIX):
            _run(["ip", "link", "del", link["ifname"]], check=False)
            removed.append(f"link {link['ifname']}")
    for d in sorted(glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*"))):
        if os.path.isdir(d):
            remove_tree(d)
            removed.append(f"dir {d}")
    return removed


class SessionLock:
    """One e2e session at a time on a machine: the sweep would otherwise
    destroy a concurrent session's hosts."""

    path = os.path.join(tempfile.gettempdir(), "pyo-e2e.lock")

    def __init__(self, timeout: float = 600):
        self.timeout = timeout
        self._file = None

    def try_acquire(self) -> bool:
        if self._file is None:
            self._file = open(self.path, "a+")
        if _flock_held_by_ancestor(self._file):
            return True
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self) -> None:
        wait_for(self.try_acquire, self.timeout,
                 f"the e2e session lock {self.path} (another e2e run is in progress)", interval=1)

    def release(self) -> None:
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _flock_held_by_ancestor(file) -> bool:
    """True when a parent process holds a flock on file: `flock /tmp/pyo-e2e.lock
    pytest ...` (how e2e runs are started on a shared machine). That lock is
    this run's, but on another open file description, so flock() from here
    would wait for it forever."""
    inode = os.fstat(file.fileno()).st_ino
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                holders.add(int(parts[4]))
    pid = os.getppid()
    while pid > 1:
        if pid in holders:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def build_image_tar(workdir: Union[str, Path]) -> Path:
    """A rootfs of busybox-static as a tarball for `docker import`: an image
    without a registry. Built once per session, imported per host."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not found: install busybox-static (make apt)")
    root = Path(workdir) / "rootfs"
    for sub in ("bin", "etc", "tmp", "proc", "sys", "dev"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    # Fails if busybox is not the static build: the chroot has no libc.
    _run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"])
    tar = Path(workdir) / "busybox-rootfs.tar"
    _run(["tar", "-C", str(root), "-cf", str(tar), "."])
    shutil.rmtree(root)
    return tar
