"""The Vagrantfile's provisioning scripts, run for real in a fresh Debian 12
root filesystem (no VM: qemu is not needed for what they do).

A debootstrap'd bookworm (minbase, cached as a tarball in packaging/build,
like packaging/build-plugin's) is unpacked afresh; the checkout goes to
/vagrant as the Vagrantfile's rsync puts it; then, in a chroot, the ETCD
script and the PROVISION script run with pyo1's arguments, as `vagrant up`
runs them on pyo1: they apt-get the engine, etcd and the rest of
scripts/setup's packages, pip-install pyoverlay into /opt/pyoverlay/.venv,
install the unit and /etc/default/pyoverlay. (In a chroot systemctl enables
units but starts none, which a VM's boot would do.) Then the provisioned
pyoverlay is started in the chroot, in a network namespace of its own, and
must answer Plugin.Activate on its socket.

Measured here: debootstrap of the cached rootfs 47 s (first run on a
machine only; `.venv/bin/python -m tests.test_vagrant_provision` makes it
ahead), then unpack 5 s, ETCD 4 s, PROVISION 42 s (apt and pip), the plugin
answering 0.5 s after its unit started: under two minutes, so it runs in
every CI run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ops.client import call
from tests.engines import REPO_DIR
from tests.hosts import _sweep_netns, wait_for
from tests.sshd_vms import vagrantfile_script

#: What the debian/bookworm64 box has and the provisioning takes for granted (systemctl).
BOX_PACKAGES = "systemd,systemd-sysv"
CACHE = REPO_DIR / "packaging" / "build" / "vagrant-rootfs-bookworm-systemd.tar"
ADDR, ETCD = "192.168.56.11", "192.168.56.11"  # pyo1's, from the Vagrantfile
NETNS = f"pyo-vagrant-{os.getpid()}"
#: This machine's CA bundle, given to the rootfs as a VM on this network would
#: be given it (pip reaches PyPI through whatever this network requires).
HOST_CA = "/etc/ssl/certs/pyo-host-ca-bundle.crt"


def mirror() -> str:
    text = ""
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if f.is_file():
            text += f.read_text()
    # Debian's archive, as packaging/build-plugin picks it: not the security one, nor a third party's.
    found = [u for u in re.findall(r"(https?://\S*/debian)/?(?:\s|$)", text) if "security" not in u]
    return found[0] if found else "http://deb.debian.org/debian"


def build_cache() -> float:
    t0 = time.monotonic()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pyo-vagrant-base-", dir=CACHE.parent))
    try:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BOX_PACKAGES}", "bookworm", str(tmp), mirror()], check=True,
                       capture_output=True, timeout=900)
        subprocess.run(["tar", "-C", str(tmp), "-cf", f"{CACHE}.tmp", "."], check=True)
        os.replace(f"{CACHE}.tmp", CACHE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.monotonic() - t0


def chroot_sh(root: Path, script: str, *args: str, timeout: float = 900,
              netns: str = "") -> subprocess.CompletedProcess:
    """script in the chroot, in a mount namespace of its own (/proc, /sys, /dev bound there only)
    and, given netns, in that network namespace."""
    wrapper = ('mount -t proc proc "$0/proc" && mount --rbind /sys "$0/sys" && mount --rbind /dev "$0/dev" && '
               'exec chroot "$0" /bin/sh -s "$@"')
    env = {"PATH": "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           # systemctl enables units offline and starts none (no systemd runs here; a VM's would).
           "HOME": "/root", "SYSTEMD_OFFLINE": "1"}
    if (root / HOST_CA.lstrip("/")).exists():  # pip trusts what this machine's network needs
        env.update(PIP_CERT=HOST_CA, SSL_CERT_FILE=HOST_CA, REQUESTS_CA_BUNDLE=HOST_CA)
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return subprocess.run([*prefix, "unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper, str(root),
                           *args], input=script, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_vagrant_provisioning_in_a_fresh_debian_12(tmp_path):
    if not CACHE.exists():
        print(f"\nno {CACHE} yet: debootstrap of the cached rootfs took {build_cache():.0f}s")
    times = {}
    root = tmp_path / "pyo1"
    root.mkdir()
    t0 = time.monotonic()
    subprocess.run(["tar", "-C", str(root), "-xf", str(CACHE)], check=True)
    # What `vagrant up` puts there: the checkout, rsync'd without these.
    (root / "vagrant").mkdir()
    subprocess.run(f"tar -C {REPO_DIR} --exclude=./.venv --exclude=./.git --exclude=./.vagrant --exclude=./.engines "
                   f"--exclude=./packaging/build -cf - . | tar -C {root}/vagrant -xf -", shell=True, check=True)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / HOST_CA.lstrip("/"))
    # As on a VM image: services never start during apt install here (no systemd runs).
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    # A chroot starts nothing: `systemctl enable --now` enables only (the units start below, as at boot).
    shim = root / "usr/local/sbin/systemctl"
    shim.write_text('#!/bin/sh\nfor a; do shift; [ "$a" = --now ] || set -- "$@" "$a"; done\nexec /usr/bin/systemctl "$@"\n')
    shim.chmod(0o755)
    times["unpack"] = time.monotonic() - t0
    try:
        for name, args in (("ETCD", (ADDR,)), ("PROVISION", (ADDR, ETCD))):
            t = time.monotonic()
            done = chroot_sh(root, vagrantfile_script(name), *args)
            times[name] = time.monotonic() - t
            assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

        # What provisioning left: the engine, etcd, pyoverlay and its unit, enabled, configured.
        version = chroot_sh(root, "dockerd --version; etcd --version | head -1; /opt/pyoverlay/.venv/bin/pyoverlay --help >/dev/null && echo pyoverlay ok")
        assert version.returncode == 0 and "Docker version" in version.stdout and "pyoverlay ok" in version.stdout, version
        assert (root / "etc/systemd/system/multi-user.target.wants/pyoverlay.service").is_symlink()
        env = (root / "etc/default/pyoverlay").read_text()
        assert f"PYOVERLAY_STORE=etcd://{ETCD}:2379" in env and f"PYOVERLAY_ADVERTISE_ADDR={ADDR}" in env, env
        assert f"ETCD_LISTEN_CLIENT_URLS=http://{ADDR}:2379" in (root / "etc/default/etcd").read_text()

        shim.unlink()

        # Boot, as far as these units go: etcd.service and pyoverlay.service from
        # their unit files and /etc/default, started by tests/vm_systemctl.py (no
        # systemd runs here), in a network namespace holding pyo1's address.
        subprocess.run(["ip", "netns", "add", NETNS], check=True)
        subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", NETNS, "addr", "add", f"{ADDR}/24", "dev", "lo"], check=True)
        shutil.copy(REPO_DIR / "tests" / "vm_systemctl.py", root / "usr/local/sbin/vm_systemctl.py")
        t = time.monotonic()
        booted = chroot_sh(root, "python3 /usr/local/sbin/vm_systemctl.py start etcd.service pyoverlay.service",
                           netns=NETNS, timeout=60)
        assert booted.returncode == 0, booted

        def logs() -> str:
            return "\n".join(f"{u}:\n{(root / 'run/vm-systemd' / (u + '.log')).read_text(errors='replace')[-2000:]}"
                             for u in ("etcd.service", "pyoverlay.service")
                             if (root / "run/vm-systemd" / (u + ".log")).exists())

        sock = root / "run/docker/plugins/pyoverlay.sock"

        def answers():
            try:
                return call(str(sock), "Plugin.Activate", None)
            except OSError:
                return None

        status, body = wait_for(answers, 60, lambda: f"the provisioned plugin to answer Plugin.Activate:\n{logs()}")
        times["boot to Plugin.Activate"] = time.monotonic() - t
        print("\n" + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        assert status == 200 and set(body["Implements"]) == {"NetworkDriver", "IpamDriver"}, body
        # The etcd the Vagrantfile configured answers on pyo1's address, where the plugin's store points.
        assert chroot_sh(root, f"curl -sf http://{ETCD}:2379/health", netns=NETNS).returncode == 0, logs()
    finally:
        _sweep_netns([NETNS])  # etcd, the plugin and their supervisors
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], capture_output=True)


if __name__ == "__main__":
    print(f"{CACHE}: made in {build_cache():.0f}s", file=sys.stderr)
