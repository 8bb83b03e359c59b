"""`pyoverlay dns-config [--daemon-json PATH] [--write]`: the engine's one-time setting.

The engine's embedded DNS (127.0.0.11 in each container) forwards every name
it does not know to the daemon's `dns` servers, dialling them from the
container's network namespace. Naming pyoverlay's resolver first is what
makes cluster names resolve with no `docker run` flag; the host's own
servers after it keep other names resolving while the plugin is down.
Loopback servers (127.0.0.53, systemd-resolved's stub) are left out: dialled
from a container, they would be the container's own loopback. The engine
uses at most three.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
import tempfile
from typing import Iterable, Optional

from driver.settings import DEFAULT_DAEMON_JSON, DEFAULT_DNS_ADDR, env

RESOLV_CONFS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
ENGINE_MAX_SERVERS = 3


class ConfigError(Exception):
    """What is wrong with the file, said so the operator knows what to do."""


def _usable(server: str, dns_addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(str(server).split("%", 1)[0])
    except ValueError:
        return False
    return not ip.is_loopback and str(ip) != dns_addr


def host_upstreams(dns_addr: str, paths: Iterable[str] = RESOLV_CONFS) -> list[str]:
    """The host's servers a container can dial: /etc/resolv.conf's, or, if it
    names only loopback stubs, systemd-resolved's real ones (as the engine does)."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        servers = [fields[1] for fields in (line.split() for line in lines)
                   if len(fields) >= 2 and fields[0] == "nameserver"]
        usable = [s for s in dict.fromkeys(servers) if _usable(s, dns_addr)]
        if usable:
            return usable
    return []


def merged(daemon: dict, dns_addr: str, upstreams: list[str]) -> dict:
    """daemon.json with `dns` = [dns_addr, upstreams...]; every other key kept.
    Servers it names already (other than loopback ones) stay as the upstreams."""
    mine = [s for s in (daemon.get("dns") or []) if isinstance(s, str) and _usable(s, dns_addr)]
    chosen = list(dict.fromkeys(mine or [u for u in upstreams if _usable(u, dns_addr)]))
    result = dict(daemon)
    result["dns"] = [dns_addr, *chosen[: ENGINE_MAX_SERVERS - 1]]
    return result


def read_daemon_json(path: str) -> Optional[dict]:
    """The file's settings; None if it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror} (run as root?)") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix it by hand first, the engine "
                          "would not start with it either") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object: fix it by hand first")
    return data


def write_daemon_json(path: str, data: dict) -> Optional[str]:
    """Write atomically, the old file kept as PATH.bak; returns the backup's path (None: no old file)."""
    backup = None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(path):
            backup = path + ".bak"
            shutil.copy2(path, backup)
        fd, tmp = tempfile.mkstemp(prefix=".daemon.json.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2) + "\n")
            if backup:
                shutil.copymode(backup, tmp)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror} (run as root?)") from None
    return backup


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "dns-config", help="the engine's daemon.json with pyoverlay's resolver first in `dns` (one-time setting)")
    parser.add_argument("--daemon-json", default=DEFAULT_DAEMON_JSON,
                        help="the engine's daemon config file (default %(default)s)")
    parser.add_argument("--write", action="store_true",
                        help="write it (the old file kept as PATH.bak); then restart the engine")
    parser.add_argument("--dns-addr", default=env("DNS_ADDR", DEFAULT_DNS_ADDR),
                        help="the resolver's address (default %(default)s)")
    parser.add_argument("--dns-upstream", default=None,
                        help="IP,... to list after it (default: the host's /etc/resolv.conf servers, "
                             "loopback ones left out)")
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        ipaddress.IPv4Address(args.dns_addr)
    except ValueError:
        print(f"pyoverlay: --dns-addr {args.dns_addr!r} is not an IPv4 address", file=sys.stderr)
        return 1
    path = args.daemon_json
    try:
        current = read_daemon_json(path)
        upstreams = ([u.strip() for u in args.dns_upstream.split(",") if u.strip()] if args.dns_upstream
                     else host_upstreams(args.dns_addr))
        data = merged(current or {}, args.dns_addr, upstreams)
        if len(data["dns"]) == 1:
            print("pyoverlay: warning: no upstream server a container can reach (the host's resolv.conf "
                  "names only loopback ones); while the plugin is down, containers resolve nothing. "
                  "Give them with --dns-upstream IP,...", file=sys.stderr)
        if not args.write:
            if current is None:
                print(f"pyoverlay: {path} does not exist; with --write it would hold:", file=sys.stderr)
            print(json.dumps(data, indent=2))
            return 0
        if current == data:
            print(f"{path} already names {args.dns_addr} first in \"dns\"; nothing to do")
            return 0
        backup = write_daemon_json(path, data)
    except ConfigError as e:
        print(f"pyoverlay: {e}", file=sys.stderr)
        return 1
    saved = f" (the old one is {backup})" if backup else ""
    print(f"wrote {path}{saved}: \"dns\": {json.dumps(data['dns'])}\n"
          "restart the engine for it to take effect: systemctl restart docker")
    return 0
