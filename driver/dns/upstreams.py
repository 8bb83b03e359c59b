"""Where forwarded queries go: the host's /etc/resolv.conf, or --dns-upstream.

Loopback servers are kept (127.0.0.53, systemd-resolved's stub): the resolver
forwards from the plugin's own namespace, the host's, where they answer. The
resolver's own address is left out, or it would forward to itself.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable

log = logging.getLogger(__name__)

DNS_PORT = 53


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # An IPv6 link-local server carries its zone (fe80::1%eth0); the zone is
    # no part of the address we compare.
    return ipaddress.ip_address(text.split("%", 1)[0])


def _excluded(host: str, exclude: Iterable[str]) -> bool:
    addr = _address(host)
    for other in exclude:
        try:
            if _address(other) == addr:
                return True
        except ValueError:
            continue
    return False


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf",
                               exclude: Iterable[str] = ("169.254.53.53",)) -> list[tuple[str, int]]:
    """The `nameserver` lines of a resolv.conf, in order, IPv4 and IPv6, port
    53, without duplicates and without the addresses in `exclude`. A missing
    file gives [] (every forwarded query is then answered SERVFAIL)."""
    exclude = tuple(exclude)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        log.warning("dns: cannot read %s (%s): no upstream servers to forward to", path, e)
        return []
    found: list[tuple[str, int]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        host = fields[1]
        try:
            if _excluded(host, exclude):
                continue
        except ValueError:
            log.warning("dns: %s: ignoring nameserver %r (not an IP address)", path, host)
            continue
        if (host, DNS_PORT) not in found:
            found.append((host, DNS_PORT))
    return found


def parse_upstreams(text: str) -> list[tuple[str, int]]:
    """--dns-upstream: comma-separated `IP`, `IP:PORT`, `IPv6` or `[IPv6]:PORT`.
    Raises ValueError saying what is expected."""
    found: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, port = _split(item)
        if (host, port) not in found:
            found.append((host, port))
    if not found:
        raise ValueError(f"--dns-upstream {text!r}: expected IP[:PORT][,IP[:PORT]...], "
                         "for example 10.0.0.2,10.0.0.3:5353")
    return found


def _split(item: str) -> tuple[str, int]:
    bad = ValueError(f"--dns-upstream {item!r}: expected IP, IP:PORT, IPv6 or [IPv6]:PORT, "
                     "for example 10.0.0.2:53 or [fd00::2]:53")
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad
        port_text = rest[1:] if rest else str(DNS_PORT)
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:  # IPv4 without a port, or a bare IPv6 address
        host, port_text = item, str(DNS_PORT)
    try:
        _address(host)
    except ValueError:
        raise bad from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise bad
    return host, int(port_text)
