"""SSHHost, the Vagrant backend of the e2e hosts, without a VM: a fake `ssh`
on PATH logs its argv and runs the remote command through `sh -c` here, as
sshd would there, with stand-ins for sudo, systemctl and curl. What is
checked is what SSHHost asks ssh to do and how it reads the answers."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.hosts import PLUGIN_SOCKET, CommandFailed
from tests.hosts_ssh import (DROPIN_NAME, HOSTS_ENV, RemoteEtcd, SSHHost, hosts_from_env, ssh_config_hosts,
                             systemd_quote)
from tests.test_packaging import REPO, systemd_verify

SSH_CONFIG = """\
Host pyo1
  HostName 192.168.121.10
  User vagrant
  Port 22
  IdentityFile /home/me/.vagrant/machines/pyo1/libvirt/private_key

Host pyo2
  HostName 192.168.121.11
  User vagrant

Host *.example
  User nobody
"""

FAKE_SSH = """\
import json, os, subprocess, sys
argv = sys.argv[1:]
stdin = sys.stdin.buffer.read()
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(json.dumps({"argv": argv, "stdin": stdin.decode(errors="replace")}) + "\\n")
if "-O" in argv:
    sys.exit(0)
# sshd hands everything after the destination to the login shell.
sys.exit(subprocess.run(["sh", "-c", argv[argv.index("--") + 1]], input=stdin).returncode)
"""

FAKE_SUDO = """\
[ "$1" = -n ] || { echo "sudo: would prompt" >&2; exit 1; }
shift; [ "$1" = -- ] && shift
exec "$@"
"""

# A unit that is "active" from start until stop or kill.
FAKE_SYSTEMCTL = """\
echo "$*" >> "$FAKE_DIR/systemctl.log"
state=$(cat "$FAKE_DIR/state" 2>/dev/null || echo inactive)
case "$1" in
  is-active) [ "$state" = active ] ;;
  show) echo "$state" ;;
  start) echo active > "$FAKE_DIR/state" ;;
  stop|kill) echo inactive > "$FAKE_DIR/state" ;;
esac
"""

# The plugin answers once the unit is active; before, curl cannot connect.
FAKE_CURL = """\
printf '%s\\n' "$@" > "$FAKE_DIR/curl.args"
cat > "$FAKE_DIR/curl.stdin"
[ "$(cat "$FAKE_DIR/state" 2>/dev/null)" = active ] || {
  echo "curl: (7) Failed to connect to plugin port 80" >&2; exit 7; }
printf '%s\\n%s' "$(cat "$FAKE_DIR/curl.body")" "$(cat "$FAKE_DIR/curl.status")"
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!{sys.executable}\n{FAKE_SSH}")
    for name, body in (("sudo", FAKE_SUDO), ("systemctl", FAKE_SYSTEMCTL), ("curl", FAKE_CURL)):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "curl.body").write_text('{"Implements": ["NetworkDriver", "IpamDriver"]}')
    (tmp_path / "curl.status").write_text("200")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "ssh.log"))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    config = tmp_path / "ssh-config"
    config.write_text(SSH_CONFIG)
    return tmp_path


def make_host(fake: Path, **kwargs) -> SSHHost:
    return SSHHost("pyo1", fake / "ssh-config", addr="192.168.56.11", dropin_dir=str(fake / "dropin"),
                   control_dir=str(fake / "ctl"), **kwargs)


def ssh_calls(fake: Path) -> list[dict]:
    log = fake / "ssh.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def remote_commands(fake: Path) -> list[list[str]]:
    """Each remote command as the far side's shell splits it."""
    return [shlex.split(c["argv"][c["argv"].index("--") + 1]) for c in ssh_calls(fake) if "--" in c["argv"]]


def test_ssh_command_line_takes_everything_from_the_config(fake):
    host = make_host(fake)
    host.run(["true"])
    (call,) = ssh_calls(fake)
    argv = call["argv"]
    assert argv[:2] == ["-F", str(fake / "ssh-config")]
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "BatchMode=yes" in options  # never a password prompt in a test run
    assert "ControlMaster=auto" in options and f"ControlPath={fake / 'ctl'}/%C" in options
    # destination, then the remote command as one word after "--"
    assert argv[-3:] == ["pyo1", "--", "sudo -n -- true"]


def test_run_arguments_reach_the_far_side_unchanged(fake):
    host = make_host(fake)
    tricky = ["a b", "it's", '"q"', "$HOME", "`id`", "x;y", "*", "%n", "back\\slash", "two\nlines", ""]
    out = host.run(["printf", "<%s>", *tricky]).stdout
    assert out == "".join(f"<{w}>" for w in tricky)


def test_run_passes_input_and_reports_failures(fake):
    host = make_host(fake)
    assert host.run(["cat"], input="hello\n").stdout == "hello\n"
    with pytest.raises(CommandFailed) as err:
        host.run(["sh", "-c", "echo why >&2; exit 3"])
    assert err.value.returncode == 3 and "why" in str(err.value) and "pyo1" in str(err.value)
    assert host.run(["false"], check=False).returncode == 1


def test_ssh_failure_is_not_blamed_on_the_command(fake, tmp_path):
    broken = tmp_path / "bin" / "ssh"
    broken.write_text("#!/bin/sh\necho 'ssh: connect to host pyo1 port 22: Connection refused' >&2\nexit 255\n")
    with pytest.raises(ConnectionError, match="Connection refused"):
        make_host(fake).run(["true"])


def test_start_plugin_writes_a_dropin_and_waits_for_activate(fake):
    host = make_host(fake)
    host.start_plugin("etcd://192.168.56.11:2379", ["--etcd-prefix", "/t 1/", "--log-level", "debug"],
                      env={"PYOVERLAY_VXLAN_PORT": "4790", "ODD": "50% of $x"})
    dropin = (fake / "dropin" / DROPIN_NAME).read_text()
    lines = dropin.splitlines()
    assert "[Service]" in lines
    # The VM's own settings must not leak into a test, and a kill must stick.
    assert "EnvironmentFile=" in lines and "Restart=no" in lines
    assert 'Environment=PYOVERLAY_VXLAN_PORT=4790' in lines
    assert 'Environment="ODD=50%% of $$x"' in lines
    exec_lines = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_lines[0] == "ExecStart="  # clears the unit's own command first
    assert exec_lines[1] == (
        "ExecStart=/opt/pyoverlay/.venv/bin/pyoverlay serve --socket /run/docker/plugins/pyoverlay.sock "
        '--store etcd://192.168.56.11:2379 --advertise-addr 192.168.56.11 --etcd-prefix "/t 1/" '
        "--log-level debug")
    systemctl = (fake / "systemctl.log").read_text().splitlines()
    assert systemctl.index("daemon-reload") < systemctl.index("start pyoverlay.service")
    # Activate was asked over the socket, as the engine asks it.
    curl = (fake / "curl.args").read_text().split("\n")
    assert curl[curl.index("--unix-socket") + 1] == PLUGIN_SOCKET
    assert curl[-2] == "http://plugin/Plugin.Activate"
    assert "Content-Type:" in curl and "Accept: application/vnd.docker.plugins.v1.2+json" in curl
    assert host.plugin_running
    with pytest.raises(RuntimeError, match="already running"):
        host.start_plugin("etcd://192.168.56.11:2379")


def test_start_plugin_fails_with_the_journal_when_the_unit_fails(fake):
    (fake / "bin" / "systemctl").write_text(
        "#!/bin/sh\ncase \"$1\" in show) echo failed ;; is-active) exit 3 ;; esac\n")
    (fake / "bin" / "journalctl").write_text("#!/bin/sh\necho 'pyoverlay: bad store URL'\n")
    (fake / "bin" / "journalctl").chmod(0o755)
    with pytest.raises(RuntimeError, match="bad store URL"):
        make_host(fake).start_plugin("bogus://x")


def test_plugin_request_reads_status_and_body(fake):
    host = make_host(fake)
    (fake / "state").write_text("active")
    (fake / "curl.body").write_text('{"Err": "no such network"}')
    (fake / "curl.status").write_text("500")
    assert host.plugin_request("NetworkDriver.DeleteNetwork", {"NetworkID": "n1"}) == (
        500, {"Err": "no such network"})
    assert json.loads((fake / "curl.stdin").read_text()) == {"NetworkID": "n1"}
    (fake / "curl.body").write_text("")
    (fake / "curl.status").write_text("200")
    assert host.plugin_request("Plugin.Activate") == (200, None)
    assert (fake / "curl.stdin").read_text() == ""  # no body, as the engine sends Activate


def test_plugin_request_not_listening_is_an_oserror(fake):
    # start_plugin's wait and the tests rely on OSError meaning "not listening".
    with pytest.raises(OSError):
        make_host(fake).plugin_request("Plugin.Activate")


def test_stop_and_kill_go_through_systemctl(fake):
    host = make_host(fake)
    (fake / "state").write_text("active")
    host.kill_plugin()
    assert not host.plugin_running
    (fake / "state").write_text("active")
    host.stop_plugin()
    assert not host.plugin_running
    log = (fake / "systemctl.log").read_text().splitlines()
    assert "kill --signal=SIGKILL pyoverlay.service" in log
    assert "stop pyoverlay.service" in log


def test_restart_engine_restarts_docker_and_waits_for_it(fake):
    (fake / "bin" / "docker").write_text("#!/bin/sh\n[ \"$1\" = info ] && echo ENGINE-ID\n")
    (fake / "bin" / "docker").chmod(0o755)
    host = make_host(fake)
    host.restart_engine()
    assert ["sudo", "-n", "--", "systemctl", "restart", "docker.service"] in remote_commands(fake)
    assert ["sudo", "-n", "--", "docker", "info", "--format", "{{.ID}}"] in remote_commands(fake)


def test_addr_comes_from_the_provisioned_settings(fake, tmp_path):
    env_file = tmp_path / "default-pyoverlay"
    env_file.write_text("# comment\n#PYOVERLAY_ADVERTISE_ADDR=1.2.3.4\n"
                        "PYOVERLAY_STORE=etcd://192.168.56.11:2379\nPYOVERLAY_ADVERTISE_ADDR=192.168.56.12\n")
    (fake / "bin" / "cat").write_text(f"#!/bin/sh\nexec /bin/cat {env_file}\n")
    (fake / "bin" / "cat").chmod(0o755)
    host = SSHHost("pyo2", fake / "ssh-config", control_dir=str(fake / "ctl"))
    assert host.addr == "192.168.56.12"
    assert host.configured_env()["PYOVERLAY_STORE"] == "etcd://192.168.56.11:2379"


def test_hosts_from_env_reads_the_vagrant_ssh_config(fake):
    config = fake / "ssh-config"
    assert ssh_config_hosts(config) == ["pyo1", "pyo2"]
    hosts = hosts_from_env(f"vagrant:{config}")
    assert [h.name for h in hosts] == ["pyo1", "pyo2"]
    assert all(h.ssh_config == str(config) for h in hosts)
    for bad in ("", "vagrant", "vagrant:", f"libvirt:{config}"):
        with pytest.raises(ValueError, match=HOSTS_ENV):
            hosts_from_env(bad)


@pytest.mark.parametrize("word,quoted", [
    ("plain", "plain"),
    ("/t 1/", '"/t 1/"'),
    ("50%", "50%%"),  # % starts a specifier
    ("$HOME", "$$HOME"),  # $ expands a variable in ExecStart=
    ('say "hi"', '"say \\"hi\\""'),
    ("a\\b", '"a\\\\b"'),
    ("", '""'),  # an empty argument must stay an argument
])
def test_systemd_quote(word, quoted):
    assert systemd_quote(word) == quoted


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_dropin_passes_systemd_analyze_verify(fake, tmp_path):
    host = make_host(fake)
    dropin = host.dropin("etcd://192.168.56.11:2379", ["--etcd-prefix", "/t 1/"], env={"ODD": "50% of $x"})
    out = systemd_verify(tmp_path / "root", REPO / "packaging" / "pyoverlay.service", {DROPIN_NAME: dropin})
    assert out == "", out


def test_close_cleans_up_and_restores_the_unit(fake):
    (fake / "bin" / "docker").write_text("#!/bin/sh\necho \"$*\" >> \"$FAKE_DIR/docker.log\"\n"
                                         "[ \"$1\" = ps ] && echo c1 c2\nexit 0\n")
    (fake / "bin" / "docker").chmod(0o755)
    (fake / "state").write_text("active")  # provisioned: the unit runs
    host = make_host(fake)
    host.start()
    assert not host.plugin_running  # the tests start it themselves
    state_dir = host.state_dir
    assert Path(state_dir).is_dir()
    host.start_plugin("etcd://192.168.56.11:2379")
    host.close()
    docker = (fake / "docker.log").read_text().splitlines()
    assert "rm -f c1 c2" in docker and "network prune -f" in docker
    assert not (fake / "dropin" / DROPIN_NAME).exists()
    assert not Path(state_dir).exists()
    assert host.plugin_running  # back as provisioned
    assert any("-O" in c["argv"] and "exit" in c["argv"] for c in ssh_calls(fake))
    host.close()  # twice is fine


def test_remote_etcd_requests_go_through_the_host(fake):
    (fake / "bin" / "curl").write_text(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$FAKE_DIR/curl.args\"\ncat > \"$FAKE_DIR/curl.stdin\"\n"
        "echo '{\"header\": {\"revision\": \"7\"}}'\n")
    etcd = RemoteEtcd("etcd://192.168.56.11:2379,192.168.56.12:2379", via=make_host(fake))
    assert etcd.endpoint == "http://192.168.56.11:2379"
    assert etcd.request("POST", "/v3/kv/range", {"key": "Lw=="}) == {"header": {"revision": "7"}}
    args = (fake / "curl.args").read_text().split("\n")
    assert args[-2] == "http://192.168.56.11:2379/v3/kv/range" and args[args.index("-X") + 1] == "POST"
    assert json.loads((fake / "curl.stdin").read_text()) == {"key": "Lw=="}
    (fake / "bin" / "curl").write_text("#!/bin/sh\necho 'curl: (7) Failed to connect' >&2\nexit 7\n")
    with pytest.raises(OSError, match="Failed to connect"):
        etcd.request("POST", "/v3/kv/range", {})
    with pytest.raises(ValueError):
        RemoteEtcd("sqlite:///x.db", via=make_host(fake))


def test_vm_systemctl_reads_the_dropin_as_written(tmp_path, monkeypatch):
    """The sshd "VMs" (tests/sshd_vms.py) run the plugin from the unit file
    and SSHHost's drop-in through tests/vm_systemctl.py: what it starts is
    the command line and environment the drop-in says, the unit's
    EnvironmentFile reset by it."""
    from tests import vm_systemctl

    etc, run = tmp_path / "etc", tmp_path / "run"
    (run / "pyoverlay.service.d").mkdir(parents=True)
    etc.mkdir()
    shutil.copy(REPO / "packaging" / "pyoverlay.service", etc / "pyoverlay.service")
    (tmp_path / "default").write_text("PYOVERLAY_STORE=etcd://10.0.0.1:2379\n")
    unit = (etc / "pyoverlay.service").read_text().replace("/etc/default/pyoverlay", str(tmp_path / "default"))
    (etc / "pyoverlay.service").write_text(unit)
    monkeypatch.setattr(vm_systemctl, "UNIT_DIRS", [etc])
    monkeypatch.setattr(vm_systemctl, "DROPIN_DIRS", [run, etc])
    assert vm_systemctl.command("pyoverlay.service")[1]["PYOVERLAY_STORE"] == "etcd://10.0.0.1:2379"

    host = SSHHost("pyo1", tmp_path / "cfg", addr="10.0.0.7", control_dir=str(tmp_path))
    args = ["--log-level", "debug", "--label", 'a "quoted" 50% $HOME \\ word']
    (run / "pyoverlay.service.d" / DROPIN_NAME).write_text(host.dropin("sqlite:///x y/state.db", args, {"K": "v w"}))
    argv, env = vm_systemctl.command("pyoverlay.service")
    assert argv == [host.plugin_exe, "serve", "--socket", PLUGIN_SOCKET, "--store", "sqlite:///x y/state.db",
                    "--advertise-addr", "10.0.0.7", *args]
    assert env["K"] == "v w" and "PYOVERLAY_STORE" not in env
