"""Gateway mode's NAT and filter rules in the host namespace (nft), the
other half of egress.py. One table of pyoverlay's own, rewritten whole from
what the store says on every change, as one nft transaction:

    table ip pyoverlay-gw {
      chain ports {                       # one rule per published port
        ip daddr <HostIP> tcp dport 8080 dnat to 10.20.0.2:80     (HostIP given)
        tcp dport 8080 dnat to 10.20.0.2:80                         (any local address)
      }
      chain prerouting { nat hook prerouting;  fib daddr type local jump ports }
      chain output     { nat hook output;      fib daddr type local jump ports }
      chain postrouting { nat hook postrouting;
        oifname "pyg<vni>" ip saddr 127.0.0.0/8 masquerade        # -p reached on 127.0.0.1
        oifname "pyg<vni>" ip saddr <subnet> masquerade           # a container to its own -p (hairpin)
        oifname != "pyg<vni>" ip saddr <subnet> masquerade        # egress
      }
      chain forward { filter hook forward, before iptables' filter;
        oifname "pyg*" ct state established,related accept
        oifname "pyg*" ct status dnat accept      # published ports, from anywhere
        oifname "pyg*" drop                       # nothing else is routed into an overlay
      }
    }

Rewriting the whole table makes every change a convergence: a restart (or a
rule someone deleted) ends with exactly the store's mappings, and no rule of
a removed container survives. Conntrack entries are not in the table, so
live connections do not notice a rewrite.

The engine's iptables FORWARD policy is DROP (it set it for its bridges),
and an nft accept in our table does not outvote a drop in another table: so
two iptables rules accept what enters or leaves a pyg uplink (appended once,
after the engine's own jumps, so DOCKER-USER still sees it first); the drop
above is what keeps everything but published ports out.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

from .egress import UPLINK_PREFIX, uplink_name
from .firewall import FirewallError, run_nft

log = logging.getLogger(__name__)

TABLE = "pyoverlay-gw"
PROTOS = {6: "tcp", 17: "udp", 132: "sctp"}
# The FORWARD accepts past the engine's iptables policy, in and out of the uplinks.
FORWARD_ACCEPTS = tuple(["FORWARD", flag, UPLINK_PREFIX + "+", "-m", "comment", "--comment",
                         "pyoverlay gateway mode", "-j", "ACCEPT"] for flag in ("-i", "-o"))


@dataclass(frozen=True, order=True)
class Uplink:
    vni: int
    subnet: str


@dataclass(frozen=True, order=True)
class PortMapping:
    proto: str  # tcp, udp or sctp
    host_ip: str  # "" for every local address
    host_port: int
    ip: str  # the container's overlay address
    port: int


def _family(address: str) -> int:
    return ipaddress.ip_interface(address).version


def _check(uplinks: Iterable[Uplink], mappings: Iterable[PortMapping]) -> None:
    """Everything that goes into the script is checked first: the values come from the store."""
    for u in uplinks:
        ipaddress.ip_network(u.subnet)
        if not isinstance(u.vni, int):
            raise ValueError(f"VNI {u.vni!r}")
    for m in mappings:
        if m.proto not in PROTOS.values() or not 0 < m.host_port < 65536 or not 0 < m.port < 65536:
            raise ValueError(f"port mapping {m}")
        ip = ipaddress.ip_address(m.ip)
        if m.host_ip and ipaddress.ip_address(m.host_ip).version != ip.version:
            raise ValueError(f"port mapping {m}: the host address and the container's are of two families")


def _mapping(expr: list) -> PortMapping:
    """A `ports` rule from `nft -j`, back into the PortMapping it was written from."""
    proto, host_ip, host_port, ip, port = "?", "", 0, "?", 0
    for e in expr:
        if "match" in e:
            payload = e["match"].get("left", {}).get("payload", {})
            if payload.get("field") == "dport":
                proto, host_port = payload.get("protocol", "?"), int(e["match"].get("right", 0))
            elif payload.get("field") == "daddr":
                host_ip = str(e["match"].get("right", ""))
        elif "dnat" in e:
            ip, port = str(e["dnat"].get("addr", "?")), int(e["dnat"].get("port", 0))
    return PortMapping(proto, host_ip, host_port, ip, port)


def _table(family: int, uplinks: list[Uplink], mappings: list[PortMapping]) -> list[str]:
    """One family's table: `ip pyoverlay-gw` or `ip6 pyoverlay-gw`, the same chains."""
    nft_family, match = ("ip", "ip") if family == 4 else ("ip6", "ip6")
    ports = []
    for m in mappings:
        where = f"{match} daddr {m.host_ip} " if m.host_ip else ""
        to = f"{m.ip}:{m.port}" if family == 4 else f"[{m.ip}]:{m.port}"
        ports.append(f"    {where}{m.proto} dport {m.host_port} dnat to {to}")
    post = []
    for u in uplinks:
        dev = uplink_name(u.vni)
        if family == 4:
            post.append(f'    oifname "{dev}" ip saddr 127.0.0.0/8 masquerade')
        post += [f'    oifname "{dev}" {match} saddr {u.subnet} masquerade',
                 f'    oifname != "{dev}" {match} saddr {u.subnet} masquerade']
    # IPv6 has no route_localnet: a packet from ::1 never leaves lo, so ::1
    # is not DNATed (a connection to [::1]:port is refused rather than lost).
    local = "fib daddr type local" if family == 4 else "ip6 daddr != ::1 fib daddr type local"
    up = f'"{UPLINK_PREFIX}*"'
    return [
        # "add" then "delete" makes the delete safe when the table is absent.
        f"add table {nft_family} {TABLE}",
        f"delete table {nft_family} {TABLE}",
        f"table {nft_family} {TABLE} {{",
        "  chain ports {", *ports, "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    fib daddr type local jump ports",
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        f"    {local} jump ports",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;", *post,
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy accept;",
        f"    oifname {up} ct state established,related accept",
        f"    oifname {up} ct status dnat accept",
        f"    oifname {up} drop",
        "  }",
        "}",
    ]


def script(uplinks: Iterable[Uplink], mappings: Iterable[PortMapping]) -> str:
    """Both tables, as one nft transaction (pure: tests read it). The IPv6
    table exists only while some uplink carries IPv6: a host without IPv6
    gateway-mode networks keeps exactly the IPv4 table it had."""
    uplinks, mappings = sorted(set(uplinks)), sorted(set(mappings))
    _check(uplinks, mappings)
    lines = _table(4, [u for u in uplinks if _family(u.subnet) == 4], [m for m in mappings if _family(m.ip) == 4])
    up6 = [u for u in uplinks if _family(u.subnet) == 6]
    if up6:
        lines += _table(6, up6, [m for m in mappings if _family(m.ip) == 6])
    else:
        lines += [f"add table ip6 {TABLE}", f"delete table ip6 {TABLE}"]
    return "\n".join(lines + [""])


class NatTable:
    """Keeps the tables equal to what apply() was last told (netns: tests)."""

    def __init__(self, netns: Optional[str] = None, nft: str = "nft", iptables: str = "iptables",
                 ip6tables: str = "ip6tables"):
        self.netns = netns
        self.nft = nft
        self.iptables = iptables
        self.ip6tables = ip6tables
        self._lock = threading.Lock()
        self._forward_ok: set[str] = set()

    def apply(self, uplinks: Iterable[Uplink], mappings: Iterable[PortMapping]) -> None:
        """Raises FirewallError (nothing changed: nft applies all or nothing)."""
        uplinks = list(uplinks)
        text = script(uplinks, mappings)
        with self._lock:
            run_nft(self.nft, script=text, netns=self.netns, what="gateway mode's NAT rules")
            if uplinks:
                self._accept_forward(self.iptables)
            if any(_family(u.subnet) == 6 for u in uplinks):
                # The engine's ip6tables FORWARD policy is DROP too (engine 28, ip6tables on).
                self._accept_forward(self.ip6tables)

    def remove(self) -> None:
        with self._lock:
            run_nft(self.nft, script="".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n"
                                             for f in ("ip", "ip6")), netns=self.netns)

    def listing(self) -> str:
        """`nft list table` of ours, both families ("" if there is none)."""
        out = []
        for family in ("ip", "ip6"):
            try:
                out.append(run_nft(self.nft, "list", "table", family, TABLE, netns=self.netns))
            except FirewallError:
                pass
        return "".join(out)

    def published(self) -> Optional[set[PortMapping]]:
        """The DNAT rules the tables hold, read back (None: no IPv4 table at all)."""
        found: set[PortMapping] = set()
        for family in ("ip", "ip6"):
            try:
                listing = json.loads(run_nft(self.nft, "-j", "list", "chain", family, TABLE, "ports",
                                             netns=self.netns))
            except FirewallError:
                if family == "ip":
                    return None
                continue  # the IPv6 table exists only with IPv6 uplinks
            for item in listing.get("nftables", []):
                rule = item.get("rule")
                if rule is not None:
                    found.add(_mapping(rule.get("expr", [])))
        return found

    def forward_accepted(self, ipv6: bool = False) -> bool:
        """Are both iptables FORWARD accepts for the uplinks in place (see the module's doc)?"""
        binary = self.ip6tables if ipv6 else self.iptables
        if shutil.which(binary) is None:
            return True  # no iptables: no engine FORWARD policy to get past
        return all(self._iptables(binary, "-C", rule).returncode == 0 for rule in FORWARD_ACCEPTS)

    def _accept_forward(self, binary: str) -> None:
        if binary in self._forward_ok:
            return
        if shutil.which(binary) is None:
            return  # no iptables: no engine FORWARD policy to get past
        for rule in FORWARD_ACCEPTS:
            if self._iptables(binary, "-C", rule).returncode == 0:
                continue
            done = self._iptables(binary, "-A", rule)
            if done.returncode != 0:
                raise FirewallError(f"{binary} refused to accept forwarding through the uplinks: "
                                    f"{done.stderr.strip()}")
        self._forward_ok.add(binary)

    def _iptables(self, binary: str, action: str, rule: list[str]) -> subprocess.CompletedProcess:
        """One iptables call, in the namespace the table is for."""
        cmd = ([] if not self.netns else ["nsenter", f"--net={self.netns}"]) + [binary, "-w", action, *rule]
        return subprocess.run(cmd, capture_output=True, text=True)
