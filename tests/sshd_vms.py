"""Namespace hosts made to look like the Vagrantfile's VMs, reached over SSH.

`PYOVERLAY_E2E_HOSTS=sshd` (tests/e2e/conftest.py) brings up three of them
and points the e2e tests at them as `vagrant:<ssh-config>`, so the tests
drive them through tests/hosts_ssh.SSHHost exactly as they would drive VMs:
ssh with an ssh-config, sudo, systemd units, journalctl, curl, the etcd the
first VM runs.

Each VM is a NamespaceHost (its own network and mount namespace, its own
dockerd of the engine under test) plus, in its mount namespace only:
- an sshd (Debian's openssh-server) listening on its underlay address, with a
  host key and an authorised client key made for this test run;
- what the Vagrantfile's provisioning leaves on a VM: the checkout at
  /opt/pyoverlay (bound, with its .venv), packaging/pyoverlay.service in
  /etc/systemd/system, /etc/default/pyoverlay (packaging/pyoverlay.env plus
  the etcd URL and this VM's address), on the first one etcd configured and
  started by the Vagrantfile's own etcd script (run over SSH; its apt lines
  left out: etcd-server is installed here), and docker.service running the
  engine;
- tests/vm_systemctl.py over /usr/bin/systemctl and /usr/bin/journalctl,
  since a namespace runs no systemd: it reads those real unit files and
  drop-ins.
The test machine reaches the underlay through a ProxyCommand in the
underlay's namespace (busybox nc), as it would reach VMs on a private network.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Union

from tests.engines import REPO_DIR, engine_env
from tests.hosts import NamespaceHost, Underlay, _run, tail, wait_for

VM_NAMES = ("pyo1", "pyo2", "pyo3")
SSHD = "/usr/sbin/sshd"


def vagrantfile_script(name: str) -> str:
    """A provisioning script of the Vagrantfile (NAME = <<~'SHELL' ... SHELL), dedented as Ruby does."""
    text = (REPO_DIR / "Vagrantfile").read_text()
    found = re.search(rf"^{name} = <<~'SHELL'\n(.*?)^SHELL$", text, re.M | re.S)
    if not found:
        raise RuntimeError(f"Vagrantfile: no {name} script")
    return textwrap.dedent(found.group(1))


class SshdVMs:
    def __init__(self, underlay: Underlay, workdir: Union[str, Path], image_tar: Union[str, Path], n: int = 3):
        self.underlay = underlay
        self.dir = Path(workdir) / "vms"
        self.image_tar = image_tar
        self.n = n
        self.hosts: list[NamespaceHost] = []
        self.ssh_config = self.dir / "ssh-config"

    def start(self) -> "SshdVMs":
        self.dir.mkdir(parents=True, exist_ok=True)
        for key in ("client_key", "host_key"):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pyo-e2e {key}", "-f", str(self.dir / key)])
        (self.dir / "authorized_keys").write_text((self.dir / "client_key.pub").read_text())
        host_pub = " ".join((self.dir / "host_key.pub").read_text().split()[:2])
        (self.dir / "known_hosts").write_text("".join(f"{name} {host_pub}\n" for name in VM_NAMES[:self.n]))
        etcd_addr = f"{self.underlay.addr.rsplit('.', 1)[0]}.1"
        entries = []
        for i in range(1, self.n + 1):
            # The engine makes its own docker_gwbridge, as on a VM.
            host = NamespaceHost(i, self.underlay, self.dir, self.image_tar, engine_gwbridge=True)
            self.hosts.append(host)
            host.start()
            self._provision(host, VM_NAMES[i - 1], etcd=f"etcd://{etcd_addr}:2379")
            entries.append(self._ssh_entry(VM_NAMES[i - 1], host.addr))
        self.ssh_config.write_text("\n".join(entries))
        for name, host in zip(VM_NAMES, self.hosts):
            wait_for(lambda: self.ssh(name, "true", check=False).returncode == 0, 10,
                     lambda: f"ssh to {name}: {self.ssh(name, 'true', check=False).stderr}\n"
                             f"sshd log:\n{tail(host.dir / 'sshd.log')}")
        # etcd on the first VM, by the Vagrantfile's own script (etcd-server is installed here).
        script = "\n".join(line for line in vagrantfile_script("ETCD").splitlines()
                           if not re.match(r"\s*(apt-get|DEBIAN_FRONTEND=)", line))
        self.ssh(VM_NAMES[0], "sudo -n sh -s " + shlex.quote(etcd_addr), input=script)
        wait_for(lambda: self.ssh(VM_NAMES[0], f"curl -sf http://{etcd_addr}:2379/health", check=False)
                 .returncode == 0, 20, lambda: f"etcd on {VM_NAMES[0]}: {self.ssh(VM_NAMES[0], 'journalctl -u etcd -n 30', check=False).stdout}")
        return self

    def ssh(self, name: str, remote: str, check: bool = True, input: str = "") -> subprocess.CompletedProcess:
        return _run(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", name, "--", remote],
                    check=check, input=input, timeout=60)

    def _ssh_entry(self, name: str, addr: str) -> str:
        d = self.dir
        return textwrap.dedent(f"""\
            Host {name}
              HostName {addr}
              User root
              Port 22
              IdentityFile {d / 'client_key'}
              IdentitiesOnly yes
              HostKeyAlias {name}
              UserKnownHostsFile {d / 'known_hosts'}
              StrictHostKeyChecking yes
              ProxyCommand nsenter --net=/run/netns/{self.underlay.netns} busybox nc %h %p
            """)

    def _provision(self, host: NamespaceHost, name: str, etcd: str) -> None:
        vm = host.dir / "vm"
        for sub in ("etc-default", "etc-systemd", "etcd", "var-tmp"):
            (vm / sub).mkdir(parents=True, exist_ok=True)
        # What the Vagrantfile's PROVISION script leaves on a VM.
        for f in Path("/etc/default").iterdir():
            if f.is_file():
                shutil.copy(f, vm / "etc-default" / f.name)
        env = (REPO_DIR / "packaging" / "pyoverlay.env").read_text()
        (vm / "etc-default" / "pyoverlay").write_text(env + f"PYOVERLAY_STORE={etcd}\nPYOVERLAY_ADVERTISE_ADDR={host.addr}\n")
        shutil.copy(REPO_DIR / "packaging" / "pyoverlay.service", vm / "etc-systemd" / "pyoverlay.service")
        # docker.service: the engine the harness runs for this host, so that
        # `systemctl restart docker` restarts that one.
        argv = host._dockerd_cmd()
        argv = argv[argv.index("--") + 1:]
        (vm / "etc-systemd" / "docker.service").write_text(
            "[Service]\n"
            f"Environment=PATH={engine_env()['PATH']}\n"
            f"ExecStart={shlex.join(argv)}\n")
        for tool, extra in (("systemctl", ""), ("journalctl", " --journalctl")):
            (vm / tool).write_text(f"#!/bin/sh\nexec {sys.executable} {REPO_DIR / 'tests' / 'vm_systemctl.py'}{extra} \"$@\"\n")
            (vm / tool).chmod(0o755)
        (vm / "sshd_config").write_text(textwrap.dedent(f"""\
            ListenAddress {host.addr}:22
            HostKey {self.dir / 'host_key'}
            AuthorizedKeysFile {self.dir / 'authorized_keys'}
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            PidFile /run/sshd.pid
            AcceptEnv LANG
            """))
        # Into the host's mount namespace only: the machine's own files stay as they are.
        binds = [(vm / "etc-default", "/etc/default"), (vm / "etc-systemd", "/etc/systemd/system"),
                 (vm / "etcd", "/var/lib/etcd"), (vm / "var-tmp", "/var/tmp"), (vm / "systemctl", "/usr/bin/systemctl"),
                 (vm / "journalctl", "/usr/bin/journalctl")]
        script = ["set -eu", "mount -t tmpfs -o mode=755 tmpfs /opt", "mkdir -p /opt/pyoverlay /run/sshd /run/vm-systemd",
                  f"mount --bind {shlex.quote(str(REPO_DIR))} /opt/pyoverlay"]
        script += [f"mount --bind {shlex.quote(str(src))} {dst}" for src, dst in binds]
        # The engine the harness started is docker.service's main process; its log the unit's.
        script += [f"cat {host.dir / 'dockerd.pid'} > /run/vm-systemd/docker.service.pid",
                   f"ln -sf {host.dir / 'dockerd.log'} /run/vm-systemd/docker.service.log"]
        host.run(["sh", "-c", "\n".join(script)])
        log = open(host.dir / "sshd.log", "ab")
        subprocess.Popen(["nsenter", "-t", str(host._holder.pid), "-m", "-n", "--", SSHD, "-D", "-e",
                          "-f", str(vm / "sshd_config")],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def close(self) -> None:
        errors = []
        for host in reversed(self.hosts):
            try:
                host.close()  # sshd, etcd and the services die with the host's namespaces
            except Exception as exc:
                errors.append(f"{host.name}: {exc!r}")
        if errors:
            raise RuntimeError("VM teardown failed: " + "; ".join(errors))
