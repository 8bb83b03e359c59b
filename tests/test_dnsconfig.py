"""`pyoverlay dns-config`: the merged daemon.json, on files in a temporary directory."""

from __future__ import annotations

import json

from plugin.cli import main
from ops.dnsconfig import host_upstreams, merged

ADDR = "169.254.53.53"


def test_merge_keeps_every_other_key_and_puts_the_resolver_first():
    daemon = {"log-driver": "journald", "mtu": 1450, "dns": ["10.0.0.2", "127.0.0.53"]}
    out = merged(daemon, ADDR, ["192.0.2.1"])
    assert out == {"log-driver": "journald", "mtu": 1450, "dns": [ADDR, "10.0.0.2"]}
    assert daemon["dns"] == ["10.0.0.2", "127.0.0.53"]  # the input is not changed


def test_merge_takes_the_hosts_upstreams_without_loopback_at_most_three():
    out = merged({}, ADDR, ["127.0.0.53", "10.0.0.2", "10.0.0.3", "10.0.0.4", ADDR])
    assert out == {"dns": [ADDR, "10.0.0.2", "10.0.0.3"]}


def test_merge_is_idempotent():
    once = merged({"debug": True}, ADDR, ["10.0.0.2"])
    assert merged(once, ADDR, ["10.9.9.9"]) == once


def test_host_upstreams_falls_back_to_systemd_resolveds_servers(tmp_path):
    stub = tmp_path / "resolv.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0\n")
    real = tmp_path / "real.conf"
    real.write_text("# from DHCP\nnameserver 10.1.1.1\nnameserver 10.1.1.2\n")
    assert host_upstreams(ADDR, [str(stub), str(real)]) == ["10.1.1.1", "10.1.1.2"]


def test_print_then_write_with_a_backup(tmp_path, capsys):
    path = tmp_path / "daemon.json"
    path.write_text('{"log-level": "warn"}\n')
    assert main(["dns-config", "--daemon-json", str(path), "--dns-upstream", "10.0.0.2"]) == 0
    assert json.loads(capsys.readouterr().out) == {"log-level": "warn", "dns": [ADDR, "10.0.0.2"]}
    assert json.loads(path.read_text()) == {"log-level": "warn"}  # printing writes nothing

    assert main(["dns-config", "--daemon-json", str(path), "--dns-upstream", "10.0.0.2", "--write"]) == 0
    said = capsys.readouterr().out
    assert "restart the engine" in said
    assert json.loads(path.read_text()) == {"log-level": "warn", "dns": [ADDR, "10.0.0.2"]}
    assert json.loads((tmp_path / "daemon.json.bak").read_text()) == {"log-level": "warn"}


def test_a_missing_file_is_said_and_written_fresh(tmp_path, capsys):
    path = tmp_path / "docker" / "daemon.json"
    assert main(["dns-config", "--daemon-json", str(path), "--dns-upstream", "10.0.0.2"]) == 0
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and not path.exists()
    assert main(["dns-config", "--daemon-json", str(path), "--dns-upstream", "10.0.0.2", "--write"]) == 0
    assert json.loads(path.read_text()) == {"dns": [ADDR, "10.0.0.2"]}


def test_a_broken_file_is_refused_and_left_alone(tmp_path, capsys):
    path = tmp_path / "daemon.json"
    path.write_text('{"dns": [')
    assert main(["dns-config", "--daemon-json", str(path), "--write"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert path.read_text() == '{"dns": ['
    assert not (tmp_path / "daemon.json.bak").exists()
