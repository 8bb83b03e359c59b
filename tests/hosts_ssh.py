"""`SSHHost`: the `Host` interface over ssh, for the Vagrantfile's VMs (or any
machines set up the same way: Debian 12, `scripts/setup` run in
/opt/pyoverlay, packaging/pyoverlay.service installed).

Commands run as root with `sudo -n` (the vagrant user's passwordless sudo);
ssh takes every connection setting from an ssh-config file, as written by
`vagrant ssh-config`, and keeps one master connection per host so the many
short commands of a test cost milliseconds each. The plugin is the systemd
unit; the tests control it through a runtime drop-in (under /run, gone at
reboot) that sets the command line a test asks for.

The VMs belong to the tests: `close()` removes every container and unused
network of the engine and puts the unit back as it was.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from tests.hosts import IMAGE, PLUGIN_SOCKET, CommandFailed, Host, wait_for

# How the e2e tests are pointed at VMs instead of namespace hosts.
HOSTS_ENV = "PYOVERLAY_E2E_HOSTS"
UNIT = "pyoverlay.service"
ENGINE_UNIT = "docker.service"
INSTALL_DIR = "/opt/pyoverlay"  # where the Vagrantfile installs the checkout
DROPIN_DIR = "/run/systemd/system/pyoverlay.service.d"
DROPIN_NAME = "50-e2e.conf"
ENV_FILE = "/etc/default/pyoverlay"


def systemd_quote(word: str) -> str:
    """One word of an ExecStart= or Environment= line, taken literally by
    systemd: % starts a specifier and $ an environment variable unless doubled;
    anything with spaces, quotes or backslashes goes in double quotes."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\n\"'\\;"):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def ssh_config_hosts(path: Union[str, Path]) -> list[str]:
    """The host aliases of an ssh-config file, in order (patterns skipped)."""
    names = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lower() == "host":
            names += [p for p in parts[1:] if not any(c in p for c in "*?!")]
    return names


def hosts_from_env(value: Optional[str] = None, **kwargs) -> list["SSHHost"]:
    """SSHHosts named by PYOVERLAY_E2E_HOSTS=vagrant:path/to/ssh-config (not started)."""
    value = os.environ.get(HOSTS_ENV, "") if value is None else value
    kind, sep, path = value.partition(":")
    if kind != "vagrant" or not sep or not path:
        raise ValueError(f"{HOSTS_ENV}={value!r}: expected vagrant:PATH-TO-SSH-CONFIG "
                         "(from `vagrant ssh-config > PATH`)")
    names = ssh_config_hosts(path)
    if not names:
        raise ValueError(f"{path}: no Host entries; write it with `vagrant ssh-config > {path}`")
    hosts = [SSHHost(name, path, **kwargs) for name in names]
    for number, host in enumerate(hosts, 1):
        host.index = number  # as a namespace host's: 1..N, for names that tell hosts apart
    return hosts


class RemoteEtcd:
    """The etcd the VMs share (the Vagrantfile runs it on pyo1), with the part
    of tests/etcdserver.EtcdServer's interface that tests read the store
    with. Requests go through a host's curl, so the test machine needs no
    route to the private network."""

    def __init__(self, store_url: str, via: "SSHHost"):
        scheme, _, rest = store_url.partition("://")
        if scheme not in ("etcd", "etcds") or not rest:
            raise ValueError(f"not an etcd store URL: {store_url!r}")
        first = rest.split("/", 1)[0].split(",")[0]
        self.url = store_url
        self.endpoint = f"{'https' if scheme == 'etcds' else 'http'}://{first}"
        self.via = via

    def request(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 5.0) -> dict:
        proc = self.via.run(["curl", "-sS", "--fail-with-body", "--max-time", f"{timeout:g}", "-X", method,
                             "-H", "Content-Type: application/json", "--data-binary", "@-",
                             self.endpoint + path],
                            check=False, timeout=timeout + 10, input="" if body is None else json.dumps(body))
        if proc.returncode != 0:
            raise OSError(f"etcd request {method} {path} via {self.via.name} failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        return json.loads(proc.stdout or "{}")


class SSHHost(Host):
    def __init__(self, name: str, ssh_config: Union[str, Path], addr: Optional[str] = None,
                 ssh: str = "ssh", image_tar: Optional[Union[str, Path]] = None,
                 install_dir: str = INSTALL_DIR, dropin_dir: str = DROPIN_DIR,
                 control_dir: Optional[str] = None):
        self.name = name
        self.ssh_config = str(ssh_config)
        self.ssh = ssh
        self._addr = addr
        self.image_tar = str(image_tar) if image_tar else None
        self.plugin_exe = f"{install_dir}/.venv/bin/pyoverlay"
        self.python = f"{install_dir}/.venv/bin/python"
        self.dropin_dir = dropin_dir
        self._control_dir = control_dir  # made at first use when not given (see control_dir)
        self._own_control_dir = control_dir is None
        self.state_dir = ""
        self.timings: dict[str, float] = {}
        self._was_active = False
        self._started = False
        self._closed = False

    # -- ssh ------------------------------------------------------------------
    @property
    def control_dir(self) -> str:
        """ControlPath must be short (a unix socket path): a directory of our
        own, made at the first ssh, so a host never used leaves none behind."""
        if self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix="pyo-ssh-")
        return self._control_dir

    def ssh_argv(self, remote: str) -> list[str]:
        """The ssh command line that runs `remote` (a shell command) on the host."""
        return [self.ssh, "-F", self.ssh_config,
                "-o", "BatchMode=yes",  # fail instead of asking for a password
                "-o", "ConnectTimeout=10",
                "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.control_dir}/%C",
                "-o", "ControlPersist=120",
                "-o", "LogLevel=ERROR",  # no "Warning: Permanently added" in outputs
                self.name, "--", remote]

    @staticmethod
    def remote_command(cmd: Sequence[str]) -> str:
        """cmd as root on the far side; sshd hands the string to a shell."""
        return "sudo -n -- " + shlex.join(str(c) for c in cmd)

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        argv = self.ssh_argv(self.remote_command(cmd))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  input=input if input is not None else "")
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{self.name}: {shlex.join(cmd)} did not finish within {timeout:g}s "
                               f"(stdout: {exc.stdout!r}, stderr: {exc.stderr!r})") from None
        if proc.returncode == 255 and not proc.stdout:
            # ssh's own failure, not the command's: say so rather than blame the command.
            raise ConnectionError(f"ssh to {self.name} (config {self.ssh_config}) failed: {proc.stderr.strip()}")
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, [self.name, *cmd], proc.stdout, proc.stderr)
        return proc

    def _run_with_file(self, cmd: Sequence[str], path: str, timeout: float = 120) -> None:
        """cmd with a local file on its stdin (binary, e.g. an image tarball)."""
        with open(path, "rb") as f:
            proc = subprocess.run(self.ssh_argv(self.remote_command(cmd)), stdin=f,
                                  capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise CommandFailed(proc.returncode, [self.name, *cmd], proc.stdout.decode(errors="replace"),
                                proc.stderr.decode(errors="replace"))

    # -- bring-up -------------------------------------------------------------
    @property
    def addr(self) -> str:
        if self._addr is None:
            self._addr = self.configured_env().get("PYOVERLAY_ADVERTISE_ADDR", "")
            if not self._addr:
                raise RuntimeError(f"{self.name}: no PYOVERLAY_ADVERTISE_ADDR in {ENV_FILE}; "
                                   "pass addr= (the host's address on the network between the hosts)")
        return self._addr

    def configured_env(self) -> dict[str, str]:
        """The settings provisioning wrote to /etc/default/pyoverlay (the
        Vagrantfile puts the etcd URL and this VM's private address there)."""
        text = self.run(["cat", ENV_FILE], check=False).stdout
        settings = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                settings[key.strip()] = value.strip().strip('"')
        return settings

    def start(self) -> "SSHHost":
        """Take the host over for a test: the unit stopped (the test starts
        it), a scratch directory, the test image, the engine answering."""
        t0 = time.monotonic()
        self._was_active = self.plugin_running
        self._started = True
        if self._was_active:
            self.stop_plugin()
        self.state_dir = self.run(["mktemp", "-d", "/var/tmp/pyo-e2e.XXXXXX"]).stdout.strip()
        self._wait_engine()
        if self.image_tar:
            self._run_with_file(["docker", "import", "-c", 'CMD ["sh"]', "-", IMAGE], self.image_tar)
        self.timings["bring_up"] = time.monotonic() - t0
        return self

    def _wait_engine(self, timeout: float = 60) -> None:
        wait_for(lambda: self.docker_proc("info", "--format", "{{.ID}}", check=False, timeout=15).returncode == 0,
                 timeout, lambda: f"{self.name}: docker info; engine log:\n{self.engine_log()}", interval=0.5)

    # -- the plugin -----------------------------------------------------------
    def dropin(self, store_url: str, extra_args: Sequence[str] = (),
               env: Optional[Mapping[str, str]] = None) -> str:
        """The drop-in that makes the unit run the command line a test asks for."""
        argv = [self.plugin_exe, "serve", "--socket", PLUGIN_SOCKET, "--store", store_url,
                "--advertise-addr", self.addr, *extra_args]
        lines = [
            "# Written by the e2e tests (tests/hosts_ssh.py); removed when they finish.",
            "[Service]",
            # Only what the test gives: /etc/default/pyoverlay is the VM's own.
            "EnvironmentFile=",
            *(f"Environment={systemd_quote(f'{k}={v}')}" for k, v in (env or {}).items()),
            "ExecStart=",
            "ExecStart=" + " ".join(systemd_quote(a) for a in argv),
            # kill_plugin() must leave it dead, as it does on a namespace host.
            "Restart=no",
        ]
        return "\n".join(lines) + "\n"

    def start_plugin(self, store_url: str, extra_args: Sequence[str] = (),
                     env: Optional[Mapping[str, str]] = None) -> None:
        if self.plugin_running:
            raise RuntimeError(f"{self.name}: the plugin is already running")
        script = ('mkdir -p "$1" && cat > "$1/$2" && systemctl daemon-reload && '
                  'systemctl reset-failed "$3" 2>/dev/null; systemctl start "$3"')
        self.run(["sh", "-c", script, "sh", self.dropin_dir, DROPIN_NAME, UNIT],
                 input=self.dropin(store_url, extra_args, env))

        def activated() -> bool:
            state = self._unit_state()
            if state == "failed":
                raise RuntimeError(f"{self.name}: {UNIT} failed:\n{self.plugin_log()}")
            try:
                status, body = self.plugin_request("Plugin.Activate")
            except OSError:
                return False  # not listening yet
            return status == 200 and "NetworkDriver" in (body or {}).get("Implements", [])

        t0 = time.monotonic()
        wait_for(activated, 20, lambda: f"{self.name}: plugin to answer Plugin.Activate; log:\n{self.plugin_log()}",
                 interval=0.2)
        self.timings["plugin_start"] = time.monotonic() - t0

    def _unit_state(self) -> str:
        return self.run(["systemctl", "show", "-p", "ActiveState", "--value", UNIT], check=False).stdout.strip()

    @property
    def plugin_running(self) -> bool:
        return self.run(["systemctl", "is-active", "--quiet", UNIT], check=False).returncode == 0

    def stop_plugin(self) -> None:
        # Synchronous: returns when the unit is down (TimeoutStopSec, then SIGKILL).
        self.run(["systemctl", "stop", UNIT], timeout=60)

    def kill_plugin(self) -> None:
        self.run(["systemctl", "kill", "--signal=SIGKILL", UNIT], check=False)
        wait_for(lambda: self._unit_state() in ("inactive", "failed"), 10,
                 f"{self.name}: {UNIT} to exit after SIGKILL", interval=0.1)

    def plugin_request(self, method: str, body: Optional[dict] = None) -> tuple[int, object]:
        # As the engine sends it: this Accept and no Content-Type (curl adds
        # one for a body unless told not to).
        cmd = ["curl", "-sS", "--max-time", "10", "--unix-socket", PLUGIN_SOCKET, "-X", "POST",
               "-H", "Accept: application/vnd.docker.plugins.v1.2+json", "-H", "Content-Type:",
               "--data-binary", "@-", "-w", "\n%{http_code}", f"http://plugin/{method}"]
        proc = self.run(cmd, check=False, input="" if body is None else json.dumps(body))
        if proc.returncode == 7:  # curl: could not connect
            raise ConnectionRefusedError(f"{self.name}: {PLUGIN_SOCKET}: {proc.stderr.strip()}")
        if proc.returncode != 0:
            raise OSError(f"{self.name}: curl {method} exited {proc.returncode}: {proc.stderr.strip()}")
        raw, _, status = proc.stdout.rpartition("\n")
        try:
            return int(status), json.loads(raw) if raw else None
        except ValueError:
            return int(status), raw

    # -- the engine -----------------------------------------------------------
    def restart_engine(self) -> None:
        t0 = time.monotonic()
        self.run(["systemctl", "restart", ENGINE_UNIT], timeout=120)
        self._wait_engine()
        self.timings["engine_restart"] = time.monotonic() - t0

    def plugin_log(self) -> str:
        return self._journal(UNIT, 400)

    def engine_log(self) -> str:
        return self._journal(ENGINE_UNIT, 150)

    def _journal(self, unit: str, lines: int) -> str:
        try:
            proc = self.run(["journalctl", "-u", unit, "--no-pager", "-o", "short-precise", "-n", str(lines)],
                            check=False, timeout=30)
        except (ConnectionError, TimeoutError) as exc:
            return f"(journal of {unit} unavailable: {exc})"
        return proc.stdout or proc.stderr

    # -- tear-down ------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._started:
                # Containers first, then networks while the plugin still
                # answers for its own, then the plugin; the unit as it was.
                cleanup = ('ids=$(docker ps -aq); [ -z "$ids" ] || docker rm -f $ids >/dev/null; '
                           'docker network prune -f >/dev/null')
                self.run(["sh", "-c", cleanup], check=False, timeout=120)
                self.run(["systemctl", "stop", UNIT], check=False, timeout=60)
                self.run(["sh", "-c", 'rm -f "$1/$2"; rmdir "$1" 2>/dev/null; systemctl daemon-reload; '
                          'systemctl reset-failed "$3" 2>/dev/null; true',
                          "sh", self.dropin_dir, DROPIN_NAME, UNIT], check=False)
                if self.state_dir:
                    self.run(["rm", "-rf", self.state_dir], check=False)
                if self._was_active:
                    self.run(["systemctl", "start", UNIT], check=False)
        finally:
            if self._control_dir is not None:
                subprocess.run([self.ssh, "-F", self.ssh_config, "-o", f"ControlPath={self._control_dir}/%C",
                                "-O", "exit", self.name], capture_output=True, timeout=15)
            if self._own_control_dir and self._control_dir is not None:
                # The master may not have removed its socket yet.
                shutil.rmtree(self._control_dir, ignore_errors=True)
