"""`pyoverlay doctor`'s checks of the cluster resolver (issue 10).

- "dns resolver": a real query to DNS_ADDR:53 in this (the host's) namespace;
  any reply, whatever its code, shows the resolver listens and answers.
- "dns daemon config": the engine's daemon.json names DNS_ADDR first in "dns"
  (the one-time setting of `pyoverlay dns-config --write`).
"""

from __future__ import annotations

import time

import dns.exception
import dns.message
import dns.query
import dns.rcode

from .checks import FAIL, OK, WARN, Check
from .dnsconfig import ConfigError, read_daemon_json

FIX_CONFIG = "run `pyoverlay dns-config --write` and restart the engine (systemctl restart docker)"


def check_resolver(address: str, timeout: float = 5.0):
    # Longer than the resolver's own forwarding timeout (2 s): its SERVFAIL is an answer too.
    query = dns.message.make_query(".", "NS")
    started = time.perf_counter()
    try:
        reply = dns.query.udp(query, address, port=53, timeout=timeout)
    except dns.exception.Timeout:
        return Check("dns resolver", FAIL, f"nothing answers on {address}:53 within {timeout:g} s: is "
                                           "`pyoverlay serve` running, and without --no-dns?")
    except OSError as e:
        return Check("dns resolver", FAIL, f"{address}:53 refuses queries ({e.strerror or e}): is `pyoverlay "
                                           "serve` running, and without --no-dns? Its log says why it cannot listen")
    took = (time.perf_counter() - started) * 1000
    return Check("dns resolver", OK, f"{address}:53 answers ({dns.rcode.to_text(reply.rcode())} for a forwarded "
                                     f"query, {took:.1f} ms)")


def check_daemon_config(path: str, address: str):
    name = "dns daemon config"
    try:
        data = read_daemon_json(path)
    except ConfigError as e:
        return Check(name, FAIL, f"{e}")
    if data is None:
        # WARN, not FAIL: networking works without it; only names across hosts do not.
        return Check(name, WARN, f"{path} does not exist, so containers never ask {address}: {FIX_CONFIG}")
    servers = data.get("dns") or []
    if not isinstance(servers, list) or address not in servers:
        return Check(name, WARN, f"{path} does not name {address} in \"dns\" (it has {servers or 'none'}), so "
                                 f"containers do not find other hosts' containers by name: {FIX_CONFIG}")
    if servers[0] != address:
        return Check(name, WARN, f"{path} names {address} after {servers[0]}: the engine asks {servers[0]} "
                                 f"first, which does not know cluster names: {FIX_CONFIG}")
    backups = servers[1:]
    if not backups:
        return Check(name, WARN, f"{path} names only {address} in \"dns\": while the plugin is down, containers "
                                 "resolve nothing; add the host's upstream servers after it (pyoverlay dns-config)")
    return Check(name, OK, f"{path} names {address} first, then {', '.join(backups)} (if the engine was "
                           "restarted since, it uses them)")
