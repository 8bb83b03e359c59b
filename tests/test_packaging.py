"""The install artefacts: managed plugin config, systemd unit and settings
file, Dockerfile, Vagrantfile, build script. Each is checked against the
command line it configures (plugin/cli.py), against each other where two of
them must agree, and with the tool that reads it where this machine has it
(systemd-analyze, ruby, sh)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from plugin import cli

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config.json"
UNIT = REPO / "packaging" / "pyoverlay.service"
ENV_FILE = REPO / "packaging" / "pyoverlay.env"
UNIT_EXE = "/opt/pyoverlay/.venv/bin/pyoverlay"  # where README and Vagrantfile install it
PLUGIN_VENV = "/opt/pyoverlay"  # the virtualenv inside the plugin rootfs


def serve_flags(monkeypatch) -> dict[str, object]:
    """PYOVERLAY_<FLAG> -> default, for every `pyoverlay serve` flag."""
    for name in [k for k in os.environ if k.startswith("PYOVERLAY_")]:
        monkeypatch.delenv(name)  # the parser reads its defaults from the environment
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {"PYOVERLAY_" + a.dest.upper(): a.default for a in serve._actions if a.dest != "help"}


# -- config.json -----------------------------------------------------------------
@pytest.fixture(scope="module")
def config():
    return json.loads(CONFIG.read_text())


def test_config_is_a_network_and_ipam_plugin_on_the_host_network(config):
    assert config["interface"]["types"] == ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]
    assert config["interface"]["socket"] == "pyoverlay.sock"
    assert config["network"] == {"type": "host"}  # the engine moves veths from the host namespace
    assert config["entrypoint"] == [f"{PLUGIN_VENV}/bin/pyoverlay", "serve"]
    assert config["description"] and config["documentation"]


def test_config_capabilities_are_the_ones_found_necessary(config):
    # Found by enabling the plugin without each one (tests/e2e/test_managed_plugin.py
    # and the issue 5 report): NET_ADMIN for every link, FDB and neighbour
    # change; SYS_ADMIN for setns and the bind mounts that hold the overlay
    # namespaces. Adding one needs the same evidence.
    assert sorted(config["linux"]["capabilities"]) == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    assert not config["linux"].get("allowAllDevices")
    assert not config.get("pidHost") and not config.get("ipcHost")


def test_config_env_is_the_serve_command_line(config, monkeypatch):
    flags = serve_flags(monkeypatch)
    env = {e["name"]: e for e in config["env"]}
    assert sorted(env) == sorted(flags), (
        f"a new or removed `pyoverlay serve` flag: add to config.json env {sorted(set(flags) - set(env))}, "
        f"remove {sorted(set(env) - set(flags))} (and the same in packaging/pyoverlay.env)")
    # The engine looks for interface.socket in the runtime directory it
    # mounts at /run/docker/plugins; the plugin must bind exactly there.
    socket = env.pop("PYOVERLAY_SOCKET")
    assert socket["value"] == "/run/docker/plugins/" + config["interface"]["socket"]
    assert "value" not in socket.get("settable", [])
    # A managed plugin is called by its reference, not by its socket's name.
    assert env.pop("PYOVERLAY_DRIVER_NAME")["value"] == "pyoverlay:latest"
    for name in ("PYOVERLAY_STORE", "PYOVERLAY_ADVERTISE_ADDR", "PYOVERLAY_LOG_LEVEL", "PYOVERLAY_VXLAN_PORT",
                 "PYOVERLAY_ETCD_CACERT", "PYOVERLAY_ETCD_CERT", "PYOVERLAY_ETCD_KEY"):
        assert env[name].get("settable") == ["value"], f"{name} must be settable"
    for name, entry in env.items():
        assert entry.get("description"), f"{name} has no description"
        # A value given is the CLI's own default, so both ways of running agree.
        if entry.get("value") is not None:
            default = flags[name]
            assert (("1" if default else "0") if isinstance(default, bool) else str(default)) == entry["value"], name


def test_config_mounts_hold_the_state_directory(config):
    mounts = {m["name"]: m for m in config["mounts"]}
    state = mounts["state"]
    default_dir = str(Path(cli.DEFAULT_STORE.removeprefix("sqlite://")).parent)
    assert state["destination"] == default_dir == "/var/lib/pyoverlay"
    assert state["type"] == "bind" and "rbind" in state["options"]
    assert state["settable"] == ["source"]
    engine = mounts["docker-sock"]
    assert engine["destination"] == "/var/run/docker.sock" and "ro" in engine["options"]
    for m in config["mounts"]:
        assert m["source"].startswith("/") and m["destination"].startswith("/"), m


# -- the settings file and the systemd unit ---------------------------------------
def test_env_file_documents_every_flag_with_its_default(monkeypatch):
    flags = serve_flags(monkeypatch)
    settings = {}
    for line in ENV_FILE.read_text().splitlines():
        m = re.match(r"#?(PYOVERLAY_[A-Z_]+)=(.*)$", line)
        if m:
            settings.setdefault(m.group(1), m.group(2))  # the first one shown is the default
        else:
            assert line == "" or line.startswith("# "), f"not a comment or setting: {line!r}"
    assert sorted(settings) == sorted(flags), (
        f"document in packaging/pyoverlay.env {sorted(set(flags) - set(settings))}, "
        f"remove {sorted(set(settings) - set(flags))}")
    for name, value in settings.items():
        # A switch (store_true) is shown turned on; a flag without a default
        # with an example.
        if flags[name] is not None and not isinstance(flags[name], bool):
            assert value == str(flags[name]), f"{name}: the file says {value}, the CLI {flags[name]}"
    # Nothing set: a fresh install runs with the CLI's defaults until edited.
    assert not [line for line in ENV_FILE.read_text().splitlines() if line.startswith("PYOVERLAY_")]


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_starts_before_the_engine_and_restarts(config):
    s = unit_settings(UNIT.read_text())
    assert s["Before"] == ["docker.service"]
    assert s["WantedBy"] == ["multi-user.target"]
    assert s["Restart"] == ["on-failure"]
    assert s["EnvironmentFile"] == ["-/etc/default/pyoverlay"]
    assert s["ExecStart"] == [f"{UNIT_EXE} serve"]
    # Mount-namespace sandboxing would hide the overlay namespaces from the
    # engine and kill them (and the containers' links) on every restart.
    for key in ("PrivateTmp", "ProtectSystem", "ProtectHome", "ReadWritePaths", "PrivateMounts",
                "TemporaryFileSystem", "BindPaths"):
        assert key not in s, f"{key} puts the plugin in a mount namespace of its own"
    # The same powers as the managed plugin, found the same way.
    assert set(s["CapabilityBoundingSet"][0].split()) == set(config["linux"]["capabilities"])


def systemd_verify(root: Path, unit: Path, dropins: dict[str, str] | None = None) -> str:
    """`systemd-analyze verify` of unit (and drop-ins) in a root of its own,
    where ExecStart's program exists; all it printed, "" when clean. It exits
    0 on a misspelt value too, so the output is what tells."""
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    shutil.copy(unit, system / unit.name)
    if dropins:
        d = system / f"{unit.name}.d"
        d.mkdir()
        for name, text in dropins.items():
            (d / name).write_text(text)
    # The targets the unit names must exist in the root.
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    exe = root / UNIT_EXE.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                           f"/etc/systemd/system/{unit.name}"], capture_output=True, text=True, timeout=60)
    out = (proc.stdout + proc.stderr).strip()
    return out + (f"\n(exit {proc.returncode})" if proc.returncode else "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    out = systemd_verify(tmp_path / "root", UNIT)
    assert out == "", out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_verify_catches_a_bad_unit(tmp_path):
    # The check above is only worth something if a broken unit fails it.
    bad = tmp_path / "pyoverlay.service"
    bad.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=on-falure"))
    assert "on-falure" in systemd_verify(tmp_path / "root", bad)


# -- Dockerfile and build script --------------------------------------------------
def test_dockerfile_builds_the_rootfs_config_json_runs():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    assert f"python3 -m venv {PLUGIN_VENV}" in text
    assert f'ENTRYPOINT ["{PLUGIN_VENV}/bin/pyoverlay", "serve"]' in text
    # The package's files: what setup.cfg's find: collects and the metadata.
    for path in ("setup.cfg", "pyproject.toml", "README.md", "plugin", "driver"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path


def test_dockerfile_and_build_script_install_the_same_debian_packages():
    script = (REPO / "packaging" / "build-plugin").read_text()
    (include,) = re.findall(r"^INCLUDE=(\S+)$", script, re.M)
    (apt,) = re.findall(r"apt-get install -y --no-install-recommends ([^\\&]+)", (REPO / "Dockerfile").read_text())
    assert sorted(include.split(",")) == sorted(apt.split())


def test_build_script_parses_and_rejects_unknown_options():
    script = REPO / "packaging" / "build-plugin"
    subprocess.run(["sh", "-n", str(script)], check=True)
    proc = subprocess.run([str(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_make_plugin_runs_the_build_script():
    out = subprocess.run(["make", "-n", "-C", str(REPO), "plugin"], capture_output=True, text=True,
                         check=True).stdout
    assert "./packaging/build-plugin" in out


# -- Vagrantfile --------------------------------------------------------------------
# Loads the Vagrantfile with a Vagrant that records every call made on the
# config objects: what `vagrant up` would be asked to do, without a box.
VAGRANT_STUB = r"""
require "json"
$calls = []
class Rec
  def initialize(path)
    @path = path
  end
  def method_missing(name, *args, **kw, &blk)
    plain = ->(v) { v.is_a?(Symbol) ? v.to_s : v }
    $calls << {"path" => @path, "method" => name.to_s, "args" => args.map(&plain),
               "kw" => kw.to_h { |k, v| [k.to_s, v.is_a?(Array) ? v.map(&plain) : plain.(v)] }}
    child = Rec.new(@path + [name.to_s] + (blk ? args.map(&:to_s) : []))
    blk.call(child) if blk
    child
  end
  def respond_to_missing?(*)
    true
  end
end
module Vagrant
  def self.configure(version)
    yield Rec.new(["configure"])
  end
end
load ARGV[0]
puts JSON.generate($calls)
"""


@pytest.fixture(scope="module")
def vagrant_calls():
    if shutil.which("ruby") is None:
        pytest.fail("ruby is needed to check the Vagrantfile: apt-get install ruby (scripts/setup)")
    subprocess.run(["ruby", "-c", str(REPO / "Vagrantfile")], check=True, capture_output=True)
    out = subprocess.run(["ruby", "-e", VAGRANT_STUB, str(REPO / "Vagrantfile")], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return json.loads(out)


def calls(vagrant_calls, method, path_tail=None):
    return [c for c in vagrant_calls if c["method"] == method
            and (path_tail is None or c["path"][-len(path_tail):] == path_tail)]


def test_vagrant_three_debian12_vms_on_both_providers(vagrant_calls):
    assert [c["args"] for c in calls(vagrant_calls, "box=")] == [["debian/bookworm64"]]
    assert sorted(c["args"][0] for c in calls(vagrant_calls, "provider")) == ["libvirt", "virtualbox"]
    names = [c["args"][0] for c in calls(vagrant_calls, "define")]
    assert names == ["pyo1", "pyo2", "pyo3"]
    for i, name in enumerate(names, start=11):
        (net,) = calls(vagrant_calls, "network", ["define", name, "vm"])
        assert net["args"] == ["private_network"] and net["kw"] == {"ip": f"192.168.56.{i}"}


def test_vagrant_etcd_on_the_first_pyoverlay_on_all(vagrant_calls):
    for name in ("pyo1", "pyo2", "pyo3"):
        provisions = calls(vagrant_calls, "provision", ["define", name, "vm"])
        kinds = [p["args"][0] for p in provisions]
        assert kinds == (["etcd", "pyoverlay"] if name == "pyo1" else ["pyoverlay"]), name
        pyo = provisions[-1]
        ip = f"192.168.56.1{name[-1]}"
        assert pyo["kw"]["args"] == [ip, "192.168.56.11"]
        script = pyo["kw"]["inline"]
        # Installed with scripts/setup, run by the unit, pointed at etcd.
        # scripts/setup makes .venv beside itself: where the unit's ExecStart looks.
        assert f"{Path(UNIT_EXE).parent.parent.parent}/scripts/setup" in script
        assert "packaging/pyoverlay.service" in script and "systemctl enable --now pyoverlay.service" in script
        assert 'PYOVERLAY_STORE=etcd://$etcd:2379' in script and "PYOVERLAY_ADVERTISE_ADDR=$addr" in script


def test_vagrant_provision_scripts_parse(vagrant_calls, tmp_path):
    scripts = {c["kw"]["inline"] for c in calls(vagrant_calls, "provision")}
    assert len(scripts) == 2
    for i, script in enumerate(scripts):
        assert script.startswith("#!/bin/sh\n")
        path = tmp_path / f"provision{i}.sh"
        path.write_text(script)
        proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_vagrant_synced_folder_leaves_local_builds_behind(vagrant_calls):
    (folder,) = calls(vagrant_calls, "synced_folder")
    assert folder["args"] == [".", "/vagrant"] and folder["kw"]["type"] == "rsync"
    assert {".venv/", "packaging/build/"} <= set(folder["kw"]["rsync__exclude"])
