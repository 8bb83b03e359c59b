"""`systemctl` and `journalctl` for the namespace "VMs" of tests/sshd_vms.py.

A namespace host has no systemd, yet tests/hosts_ssh.SSHHost drives a VM's
services with systemctl (a runtime drop-in, start, stop, kill, is-active,
show -p ActiveState) and reads their logs with journalctl. In each VM's
private mount namespace this script is bound over /usr/bin/systemctl and
/usr/bin/journalctl, so SSHHost runs unchanged. It reads the real unit files
as systemd would for the parts those units use: the unit in
/etc/systemd/system or /lib/systemd/system, drop-ins in
/run/systemd/system/U.d and /etc/systemd/system/U.d, Environment=,
EnvironmentFile=, ExecStart= (an empty one resets), the %% %H %p specifiers,
$VAR and $$. A service runs in a process group of its own under a small
supervisor that records its exit; state and logs live under /run/vm-systemd.
enable, disable, daemon-reload and reset-failed change nothing here.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path("/run/vm-systemd")
UNIT_DIRS = [Path("/etc/systemd/system"), Path("/lib/systemd/system")]
DROPIN_DIRS = [Path("/run/systemd/system"), Path("/etc/systemd/system")]
STOP_TIMEOUT = 30.0


def unit_name(name: str) -> str:
    return name if "." in name else name + ".service"


def unit_settings(unit: str) -> list[tuple[str, str]]:
    """(key, value) of the [Service] sections, unit file then drop-ins in name order."""
    files = [d / unit for d in UNIT_DIRS if (d / unit).is_file()][:1]
    if not files:
        raise SystemExit(f"Unit {unit} not found.")
    dropins = {}
    for d in reversed(DROPIN_DIRS):  # /run overrides /etc for one file name
        for f in sorted((d / f"{unit}.d").glob("*.conf")) if (d / f"{unit}.d").is_dir() else []:
            dropins[f.name] = f
    settings = []
    for f in files + [dropins[n] for n in sorted(dropins)]:
        section = None
        for line in f.read_text().splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line:
                key, _, value = line.partition("=")
                settings.append((key.strip(), value.strip()))
    return settings


def specifiers(text: str, unit: str) -> str:
    table = {"%": "%", "H": socket.gethostname(), "p": unit.rsplit(".", 1)[0], "n": unit}
    return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), text)


def env_file(path: str) -> dict[str, str]:
    optional = path.startswith("-")
    path = path.lstrip("-")
    try:
        text = Path(path).read_text()
    except OSError:
        if optional:
            return {}
        raise
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"').strip("'")
    return env


def command(unit: str) -> tuple[list[str], dict[str, str]]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    exec_start, assignments, env_files = "", [], []
    for key, value in unit_settings(unit):
        value = specifiers(value, unit) if key != "ExecStart" else value
        # An empty assignment resets the list, as in systemd.
        if key == "Environment":
            assignments = assignments + [value] if value else []
        elif key == "EnvironmentFile":
            env_files = env_files + [value] if value else []
        elif key == "ExecStart":
            exec_start = value
    for value in assignments:
        for word in shlex.split(value):
            k, _, v = word.partition("=")
            env[k] = v
    for path in env_files:  # files win over Environment=, as in systemd
        env.update(env_file(path))
    if not exec_start:
        raise SystemExit(f"{unit}: no ExecStart")
    argv = []
    for word in shlex.split(exec_start.lstrip("-@+!")):
        word = specifiers(word, unit)
        # $VAR alone splits into words, ${VAR} inside a word does not; $$ is a $.
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            argv += env.get(word[1:], "").split()
            continue
        word = re.sub(r"\$\$|\$\{(\w+)\}", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word)
        argv.append(word)
    return argv, env


def files(unit: str) -> tuple[Path, Path, Path]:
    STATE.mkdir(parents=True, exist_ok=True)
    return STATE / f"{unit}.pid", STATE / f"{unit}.exit", STATE / f"{unit}.log"


def main_pid(unit: str) -> int:
    pidfile, _, _ = files(unit)
    try:
        pid = int(pidfile.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return 0
    return 0 if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def active_state(unit: str) -> str:
    if main_pid(unit):
        return "active"
    _, exitfile, _ = files(unit)
    status = exitfile.read_text().strip() if exitfile.exists() else "stopped"
    return "inactive" if status in ("0", "stopped") else "failed"


def start(unit: str) -> None:
    if main_pid(unit):
        return
    argv, env = command(unit)
    pidfile, exitfile, log = files(unit)
    exitfile.unlink(missing_ok=True)
    with open(log, "ab") as out:
        out.write(f"-- {time.strftime('%H:%M:%S')} Started {unit}: {shlex.join(argv)}\n".encode())
        out.flush()
        sup = subprocess.Popen([sys.executable, __file__, "_supervise", unit, *argv], env=env, stdin=subprocess.DEVNULL,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while not main_pid(unit) and sup.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def supervise(unit: str, argv: list[str]) -> None:
    pidfile, exitfile, _ = files(unit)
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile.write_text(str(child.pid))
    rc = child.wait()
    if not exitfile.exists():  # "stopped" when stop() asked for it
        exitfile.write_text(str(rc))
    pidfile.unlink(missing_ok=True)


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop(unit: str) -> None:
    pid = main_pid(unit)
    if not pid:
        return
    _, exitfile, _ = files(unit)
    exitfile.write_text("stopped")
    # SIGTERM to the main process only (KillMode=mixed and docker.service's
    # KillMode=process: dockerd stops its containerd itself), SIGKILL to the rest.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while main_pid(unit) and time.monotonic() < deadline:
        time.sleep(0.05)
    if main_pid(unit):
        signal_group(pid, signal.SIGKILL)
    while main_pid(unit):
        time.sleep(0.05)


def systemctl(args: list[str]) -> int:
    args = [a for a in args if a not in ("--quiet", "-q", "--no-pager", "--now")]
    verb, rest = args[0], args[1:]
    if verb in ("daemon-reload", "reset-failed", "enable", "disable"):
        return 0
    if verb == "is-active":
        return 0 if active_state(unit_name(rest[0])) == "active" else 3
    if verb == "show":  # show -p ActiveState --value UNIT
        print(active_state(unit_name(rest[-1])))
        return 0
    if verb == "kill":
        sig = next((a.split("=", 1)[1] for a in rest if a.startswith("--signal=")), "SIGTERM")
        pid = main_pid(unit_name(rest[-1]))
        if pid:
            signal_group(pid, getattr(signal, sig if sig.startswith("SIG") else "SIG" + sig))
        return 0
    units = [unit_name(u) for u in rest]
    for unit in units:
        if verb in ("stop", "restart"):
            stop(unit)
        if verb in ("start", "restart"):
            start(unit)
    return 0


def journalctl(args: list[str]) -> int:
    unit = unit_name(args[args.index("-u") + 1])
    lines = int(args[args.index("-n") + 1]) if "-n" in args else 100
    _, _, log = files(unit)
    text = log.read_text(errors="replace").splitlines() if log.exists() else ["-- No entries --"]
    print("\n".join(text[-lines:]))
    return 0


if __name__ == "__main__":
    name = os.path.basename(sys.argv[0])
    if sys.argv[1:2] == ["_supervise"]:
        supervise(sys.argv[2], sys.argv[3:])
    elif name == "journalctl" or sys.argv[1:2] == ["--journalctl"]:
        sys.exit(journalctl([a for a in sys.argv[1:] if a != "--journalctl"]))
    else:
        sys.exit(systemctl(sys.argv[1:]))
