"""VXLAN source filter: only known peer VTEPs may send to the VXLAN port.

Why: the kernel's vxlan device decapsulates any UDP datagram sent to its
port that carries a VNI it holds, whoever sent it. Anyone on the underlay who
guesses a VNI (pyoverlay allocates them from 4096 up) could put frames on an
overlay, straight into containers' interfaces. The hosts that may legitimately
send are exactly the VTEPs of the remote peers of the overlays this host
carries, and peer sync knows them.

How: a table of pyoverlay's own in the host namespace, where the vxlan
sockets live, hooked on input before the usual filter priority:

    table inet pyoverlay {
        set vteps { type ipv4_addr; elements = { <peer VTEPs> } }
        chain vxlan-in {
            type filter hook input priority filter - 10; policy accept;
            udp dport 4789 ip saddr @vteps accept
            udp dport 4789 counter drop          # also every IPv6 datagram to the port
        }
    }

Only the set changes at run time, as one nft transaction (flush + add), so
there is never a moment without the filter and the drop counter keeps
counting. A restarted plugin keeps the set it finds until peer sync has read
the store, so a restart (or a store outage) never cuts live traffic. The
table stays when the plugin exits: traffic keeps being filtered as the last
known peers allow. Remove it by hand with `nft delete table inet pyoverlay`.

Why the `nft` command (Debian's nftables package) rather than a library:
pyroute2's nftables module is marked a prototype upstream, builds rules from
raw netlink expressions and cannot be pointed at another namespace;
python-iptables drives the legacy xtables backend, while Debian 12's iptables
is the nf_tables one (the two must not be mixed); the libnftables binding
(python3-nftables) is a Debian package that is not on PyPI. `nft -f -` is
netfilter's own front end, applies a whole script as one atomic transaction,
and costs about 10 ms per change, which happens only when the set of peer
hosts changes.

Caveats: a source address can be forged by anyone on the underlay's L2
segment; this filter stops other hosts and routed networks, not a spoofing
neighbour (encrypt the underlay for that). The filter is per host, not per
VNI: a peer host may send on any VNI this host carries.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
import threading
from typing import Iterable, Optional

from driver.defaults import VXLAN_PORT

log = logging.getLogger(__name__)

TABLE = "pyoverlay"
SET = "vteps"
CHAIN = "vxlan-in"
RETRY_MIN, RETRY_MAX = 0.5, 10.0


class FirewallError(Exception):
    pass


class Firewall:
    """Keeps the allowed-VTEP set equal to what allow() was last told.

    netns: a namespace path to program instead of our own (tests)."""

    def __init__(self, port: int = VXLAN_PORT, netns: Optional[str] = None, nft: str = "nft"):
        self.port = int(port)
        self.netns = netns
        self.nft = nft
        self.enabled = False
        self._lock = threading.Lock()
        self._wanted: Optional[frozenset[str]] = None
        self._applied: Optional[frozenset[str]] = None
        self._retry: Optional[threading.Timer] = None
        self._delay = RETRY_MIN
        self._closed = False

    # -- running nft -----------------------------------------------------------

    def _run(self, *args: str, script: Optional[str] = None) -> str:
        return run_nft(self.nft, *args, script=script, netns=self.netns, what="the VXLAN filter")

    def _table_script(self, vteps: Iterable[str]) -> str:
        elements = ", ".join(sorted(vteps))
        # "add" then "delete" makes the delete safe when the table is absent;
        # the whole script is one transaction.
        return (
            f"add table inet {TABLE}\n"
            f"delete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            f"  set {SET} {{\n"
            f"    type ipv4_addr\n"
            + (f"    elements = {{ {elements} }}\n" if elements else "")
            + "  }\n"
            f"  chain {CHAIN} {{\n"
            f"    type filter hook input priority filter - 10; policy accept;\n"
            f"    udp dport {self.port} ip saddr @{SET} accept\n"
            f"    udp dport {self.port} counter drop\n"
            "  }\n"
            "}\n"
        )

    def _set_script(self, vteps: frozenset[str]) -> str:
        script = f"flush set inet {TABLE} {SET}\n"
        if vteps:
            script += f"add element inet {TABLE} {SET} {{ {', '.join(sorted(vteps))} }}\n"
        return script

    def allowed(self) -> set[str]:
        """The VTEPs the kernel's set holds now (empty if there is no table)."""
        try:
            out = self._run("-j", "list", "set", "inet", TABLE, SET)
        except FirewallError:
            return set()
        for item in json.loads(out).get("nftables", []):
            if "set" in item:
                return {e for e in item["set"].get("elem", []) if isinstance(e, str)}
        return set()

    # -- life cycle --------------------------------------------------------------

    def install(self) -> bool:
        """Put the table in place, keeping the VTEPs a previous run allowed.
        False (and an error in the log) if this host cannot filter."""
        if shutil.which(self.nft) is None:
            log.error("VXLAN source filter is OFF: `%s` not found (install Debian's nftables package); "
                      "VXLAN datagrams from any address reach the overlays", self.nft)
            return False
        try:
            kept = self.allowed()
            self._run(script=self._table_script(kept))
        except FirewallError as exc:
            log.error("VXLAN source filter is OFF: %s", exc)
            return False
        with self._lock:
            self.enabled = True
            self._applied = frozenset(kept)
        log.info("VXLAN source filter on UDP port %d: %d peer VTEPs allowed", self.port, len(kept))
        return True

    def allow(self, vteps: Iterable[str]) -> None:
        """Make the allowed set exactly vteps. Never raises: a failure is
        logged and retried in the background until it succeeds."""
        wanted = frozenset(_valid(vteps))
        with self._lock:
            if not self.enabled or self._closed:
                return
            self._wanted = wanted
            if wanted != self._applied:
                self._apply()

    def close(self) -> None:
        """Stop retrying. The table stays (see the module docstring)."""
        with self._lock:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()

    def _apply(self) -> None:
        wanted, before = self._wanted, self._applied or frozenset()
        try:
            try:
                self._run(script=self._set_script(wanted))
            except FirewallError:
                self._run(script=self._table_script(wanted))  # the table was removed behind us
        except FirewallError as exc:
            log.warning("VXLAN source filter: %s; retrying in %.1fs", exc, self._delay)
            if self._retry is None:
                self._retry = threading.Timer(self._delay, self._retry_now)
                self._retry.daemon = True
                self._retry.start()
                self._delay = min(self._delay * 2, RETRY_MAX)
            return
        self._applied, self._delay = wanted, RETRY_MIN
        log.info("VXLAN source filter: %d peer VTEPs allowed (+%d -%d)",
                 len(wanted), len(wanted - before), len(before - wanted))

    def _retry_now(self) -> None:
        with self._lock:
            self._retry = None
            if not self._closed and self._wanted is not None and self._wanted != self._applied:
                self._apply()


def run_nft(nft: str, *args: str, script: Optional[str] = None, netns: Optional[str] = None,
            what: str = "the rules") -> str:
    """`nft args...`, or `nft -f -` fed script (one atomic transaction), in
    netns if given; FirewallError on failure. Shared with natrules.py."""
    cmd = [nft, *args] if script is None else [nft, "-f", "-"]
    if netns:
        cmd = ["nsenter", f"--net={netns}", *cmd]
    try:
        done = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"running {' '.join(cmd)} failed: {exc}") from None
    if done.returncode != 0:
        raise FirewallError(f"nft refused {what}: {done.stderr.strip()}")
    return done.stdout


def _valid(vteps: Iterable[str]) -> set[str]:
    """IPv4 addresses only: the values come from the store and go into an nft script."""
    good = set()
    for vtep in vteps:
        try:
            good.add(str(ipaddress.IPv4Address(vtep)))
        except ValueError:
            log.warning("VXLAN source filter: ignoring peer VTEP %r, not an IPv4 address", vtep)
    return good
