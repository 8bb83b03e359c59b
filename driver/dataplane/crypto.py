"""Encrypted overlays, the kernel half: one WireGuard device per host that
carries the VXLAN of every -o encrypted=true network between hosts.

Why WireGuard, and why wireguard-go: see README, *Encrypted networks*. In
short, the kernels this was built on have neither ESP (CONFIG_INET_ESP) nor
the WireGuard module, nor loadable modules, so pyroute2's xfrm and WireGuard
(generic netlink) support has nothing to talk to. wireguard-go (Debian's
package) is the same protocol over a TUN device; it is configured through
its UAPI socket (/var/run/wireguard/<dev>.sock, a line protocol), which this
module speaks directly. Routes and rules still go through pyroute2; the two
filter rules through `nft`, as firewall.py does.

Layout, in the host namespace (where the vxlan sockets live)::

    pyw<vtep hex>     the WireGuard device; one peer per other host with
                      encryption: AllowedIPs = that host's VTEP/32
    ip rule           udp to the encrypted VXLAN port -> table TABLE
    table TABLE       <peer vtep>/32 dev pyw..., and a blackhole default
    nft table inet pyoverlay-crypto
                      drop udp to the encrypted port that leaves by another
                      device, or arrives by another device

An encrypted network's vxlan0 uses its own UDP port (encrypted_port): the
route lookup of its datagrams matches the rule and goes into the tunnel; an
unencrypted network's (vxlan_port) never does. No fallback to clear text: a
peer with no tunnel route hits the blackhole, and the nft rules drop what
would leave or arrive outside the tunnel even if the rule were gone.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterable

from pyroute2.netlink.exceptions import NetlinkError

from driver.defaults import TUNNEL_OVERHEAD  # noqa: F401 (the MTU arithmetic's, importable here)
from driver.model import TunnelPeer

from .base import DataplaneError, ipv4, step
from .worker import Worker

#: Routing table and rule priority of the encrypted VXLAN flow (any free ones).
TABLE = 0x7079
RULE_PRIORITY = 0x7079
NFT_TABLE = "pyoverlay-crypto"
UAPI_DIR = "/var/run/wireguard"
WIREGUARD_GO = "wireguard-go"


def device_name(vtep: str) -> str:
    """pyw + the VTEP in hex: unique per host even where hosts share /var/run
    (wireguard-go names its UAPI socket after the device)."""
    return "pyw" + ipaddress.IPv4Address(vtep).packed.hex()


class CryptoStage(Worker):
    encrypted_port: int  # set by Worker.__init__

    @property
    def tunnel_device(self) -> str:
        return device_name(self.vtep)

    def _uapi_path(self) -> str:
        return os.path.join(UAPI_DIR, self.tunnel_device + ".sock")

    def encryption_problem(self) -> str:
        """Why this host cannot encrypt ("" if it can), saying what to do."""
        if shutil.which(WIREGUARD_GO) is None:
            return ("this host cannot encrypt: wireguard-go is not installed (this kernel has no WireGuard "
                    "or ESP); install it (apt-get install wireguard-go) and retry, or create the network "
                    "without -o encrypted=true")
        if shutil.which("nft") is None:
            return ("this host cannot encrypt: `nft` is not installed (needed to keep encrypted VXLAN out of "
                    "clear text); install Debian's nftables package and retry")
        if not os.path.exists("/dev/net/tun"):
            return ("this host cannot encrypt: /dev/net/tun is missing (wireguard-go needs a TUN device); "
                    "load the tun module or give the plugin /dev/net/tun, and retry")
        return ""

    # -- the device ---------------------------------------------------------------

    def tunnel_up(self, private_key: bytes, listen_port: int, mtu: int) -> None:
        """The WireGuard device with this key and port, its rule, table and nft
        filter; idempotent (a running device keeps its peers and sessions)."""
        if len(private_key) != 32:
            raise DataplaneError("tunnel_up: the private key must be 32 bytes")
        problem = self.encryption_problem()
        if problem:
            raise DataplaneError(problem)
        self._call(self._tunnel_up, private_key, listen_port, mtu)

    def _tunnel_up(self, private_key: bytes, listen_port: int, mtu: int) -> None:
        host = self._host_handle()
        # No device and no rule: nothing encrypted runs here, so a failure may
        # take back all this call made (a running tunnel is never torn down).
        fresh = host.index(self.tunnel_device) is None and \
            not any(r["priority"] == RULE_PRIORITY for r in self._rules(host))
        try:
            self._build_tunnel(host, private_key, listen_port, mtu)
        except BaseException as error:
            if fresh:
                try:
                    self._tunnel_down()
                except DataplaneError as cleanup:
                    error.add_note(f"cleaning up also failed: {cleanup}")
            raise

    def _build_tunnel(self, host, private_key: bytes, listen_port: int, mtu: int) -> None:
        name = self.tunnel_device
        # Filter first: from here on nothing on the encrypted port passes in clear.
        self._nft(self._filter_script())
        with step(f"starting {WIREGUARD_GO} {name}", "see the plugin log; is /dev/net/tun usable?"):
            if host.index(name) is None or not self._uapi_alive():
                self._spawn(name)
        # Only what differs: setting even the same private key expires every
        # session in wireguard-go (a restart would cost a round of handshakes).
        have = dict(self._uapi("get=1\n"))
        change = [f"{k}={v}" for k, v in (("private_key", private_key.hex()), ("listen_port", str(listen_port)))
                  if have.get(k) != v]
        if change:
            self._uapi("set=1\n" + "\n".join(change) + "\n")
        with step(f"bringing {name} up (mtu {mtu})"):
            index = host.index(name)
            host.ipr.link("set", index=index, mtu=mtu, state="up")
        with step(f"routing the encrypted VXLAN port {self.encrypted_port} into {name}"):
            self._ensure(lambda: host.ipr.route("add", dst="0.0.0.0/0", type="blackhole", table=TABLE))
            if not any(r.get("priority") == RULE_PRIORITY for r in self._rules(host)):
                host.ipr.rule("add", table=TABLE, priority=RULE_PRIORITY, FRA_IP_PROTO=socket.IPPROTO_UDP,
                              FRA_DPORT_RANGE=f"{self.encrypted_port}:{self.encrypted_port}")

    @staticmethod
    def _rules(host) -> list[dict]:
        return [{"priority": r.get_attr("FRA_PRIORITY"), "table": r.get_attr("FRA_TABLE")}
                for r in host.ipr.get_rules(family=socket.AF_INET)]

    @staticmethod
    def _ensure(add) -> None:
        try:
            add()
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    def _spawn(self, name: str) -> None:
        path = self._uapi_path()
        if os.path.exists(path):
            os.unlink(path)  # a dead daemon's socket
        cmd = [WIREGUARD_GO, name]
        if self.host_netns:
            cmd = ["nsenter", f"--net={self.host_netns}", *cmd]
        # wireguard-go detaches itself: the device (and encryption) outlives a
        # plugin restart; it ends when the device is deleted (tunnel_down).
        env = {**os.environ, "LOG_LEVEL": "error"}
        env.pop("WG_PROCESS_FOREGROUND", None)
        # Its output to an unlinked file, not a pipe: the detached daemon keeps
        # the descriptor, and a pipe would never reach end of file.
        with tempfile.TemporaryFile() as out:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, timeout=15,
                                  start_new_session=True)
            if done.returncode != 0:
                out.seek(0)
                said = out.read().decode(errors="replace")[-300:].strip()
                raise RuntimeError(f"{WIREGUARD_GO} exited {done.returncode}: {said}")
        deadline = time.monotonic() + 10
        while not self._uapi_alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{WIREGUARD_GO} started but {path} never answered")
            time.sleep(0.02)

    def tunnel_down(self) -> None:
        """Device (wireguard-go ends with it), rule, table and filter. Idempotent."""
        self._call(self._tunnel_down)

    def _tunnel_down(self) -> None:
        host = self._host_handle()
        with step(f"removing {self.tunnel_device} and its routing"):
            # The rule first: with it gone no datagram is routed toward a missing device.
            for rule in host.ipr.get_rules(family=socket.AF_INET):
                if rule.get_attr("FRA_PRIORITY") == RULE_PRIORITY:
                    host.ipr.rule("del", table=TABLE, priority=RULE_PRIORITY)
            index = host.index(self.tunnel_device)
            if index is not None:
                host.link_del(index)
            try:
                host.ipr.flush_routes(table=TABLE)
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise
        # The nft filter stays while an encrypted vxlan could still send: only
        # delete it with the last encrypted network (the caller's order).
        self._nft(f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")

    def tunnel_present(self) -> bool:
        return self._call(lambda: self._host_handle().index(self.tunnel_device) is not None)

    # -- peers ----------------------------------------------------------------------

    def set_tunnel_peers(self, peers: Iterable[TunnelPeer]) -> tuple[int, int]:
        """Make the device's peers exactly these (one read, then the differences;
        a peer whose key or endpoint is unchanged keeps its session). Returns
        (added or changed, removed)."""
        want = {p.public: p for p in peers}
        for p in want.values():
            ipv4(p.vtep, "tunnel peer VTEP")
            if len(p.public) != 32 or len(p.psk) != 32:
                raise DataplaneError(f"tunnel peer {p.vtep}: keys must be 32 bytes")
        return self._call(self._set_tunnel_peers, want)

    def _set_tunnel_peers(self, want: dict[bytes, TunnelPeer]) -> tuple[int, int]:
        have = {p.public: p for p in self._tunnel_peers()}
        lines = []
        for public in have.keys() - want.keys():
            lines += [f"public_key={public.hex()}", "remove=true"]
        changed = [p for k, p in want.items() if have.get(k) != p]
        for p in changed:
            lines += [f"public_key={p.public.hex()}", f"preshared_key={p.psk.hex()}"]
            old = have.get(p.public)
            if old is None or (old.vtep, old.port) != (p.vtep, p.port):
                # Not for a key change alone: replacing the allowed IPs leaves a
                # moment with none, in which the peer's packets would be dropped.
                lines += [f"endpoint={p.vtep}:{p.port}", "replace_allowed_ips=true", f"allowed_ip={p.vtep}/32"]
        if lines:
            self._uapi("set=1\n" + "\n".join(lines) + "\n")
        host = self._host_handle()
        index = host.index(self.tunnel_device)
        with step("routing tunnel peers"):
            routed = {r.get_attr("RTA_DST") for r in host.ipr.get_routes(table=TABLE, family=socket.AF_INET)
                      if r["dst_len"] == 32}
            wanted = {p.vtep for p in want.values()}
            for vtep in wanted - routed:
                self._ensure(lambda: host.ipr.route("add", dst=f"{vtep}/32", oif=index, table=TABLE))
            for vtep in routed - wanted:
                host.ipr.route("del", dst=f"{vtep}/32", table=TABLE)
        return len(changed), len(have.keys() - want.keys())

    def tunnel_peers(self) -> list[TunnelPeer]:
        """The device's peers as the daemon holds them ([] without a device)."""
        return self._call(self._tunnel_peers)

    def _tunnel_peers(self) -> list[TunnelPeer]:
        if not os.path.exists(self._uapi_path()):
            return []
        peers, current = [], None
        for key, value in self._uapi("get=1\n"):
            if key == "public_key":
                current = {"public": bytes.fromhex(value), "vtep": "", "port": 0, "psk": b"\0" * 32}
                peers.append(current)
            elif current is None:
                continue
            elif key == "preshared_key":
                current["psk"] = bytes.fromhex(value)
            elif key == "endpoint":
                addr, _, port = value.rpartition(":")
                current["vtep"], current["port"] = addr, int(port)
            elif key == "allowed_ip" and not current["vtep"]:
                current["vtep"] = value.split("/")[0]
        return [TunnelPeer(**p) for p in peers]

    def tunnel_handshakes(self) -> dict[str, int]:
        """VTEP -> seconds since the epoch of its latest handshake (0: none)."""
        def read() -> dict[str, int]:
            found, vtep = {}, None
            for key, value in self._uapi("get=1\n") if os.path.exists(self._uapi_path()) else []:
                if key == "endpoint":
                    vtep = value.rpartition(":")[0]
                elif key == "last_handshake_time_sec" and vtep:
                    found[vtep] = int(value)
            return found
        return self._call(read)

    # -- the UAPI socket and nft ----------------------------------------------------

    def _uapi_alive(self) -> bool:
        try:
            self._uapi("get=1\n")
            return True
        except (OSError, DataplaneError):
            return False

    def _uapi(self, request: str) -> list[tuple[str, str]]:
        """One request on wireguard-go's UAPI socket; its key=value lines. A
        request ends with an empty line, and so does the answer (errno=N last)."""
        with step(f"talking to {WIREGUARD_GO} on {self._uapi_path()}",
                  "is wireguard-go running? the plugin restarts it with the next encrypted network"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(self._uapi_path())
                sock.sendall(request.encode() + b"\n")
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        pairs = [tuple(line.split("=", 1)) for line in data.decode().splitlines() if "=" in line]
        status = dict(pairs).get("errno", "0")
        if status != "0":
            raise DataplaneError(f"{WIREGUARD_GO} refused the configuration (errno {status})")
        return [p for p in pairs if p[0] != "errno"]

    def _filter_script(self) -> str:
        dev, port = self.tunnel_device, self.encrypted_port
        # Declared then flushed: one atomic transaction, whether or not it existed.
        return (f"table inet {NFT_TABLE}\nflush table inet {NFT_TABLE}\n"
                f"table inet {NFT_TABLE} {{\n"
                f"  chain out {{ type filter hook output priority filter - 10; policy accept;\n"
                f"    udp dport {port} oifname != \"{dev}\" counter drop\n  }}\n"
                f"  chain in {{ type filter hook input priority filter - 10; policy accept;\n"
                f"    udp dport {port} iifname != \"{dev}\" counter drop\n  }}\n}}\n")

    def _nft(self, script: str) -> None:
        cmd = ["nft", "-f", "-"]
        if self.host_netns:
            cmd = ["nsenter", f"--net={self.host_netns}", *cmd]
        with step("applying the encrypted VXLAN filter (nft)"):
            done = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip())

    def tunnel_filter_present(self) -> bool:
        cmd = ["nft", "list", "table", "inet", NFT_TABLE]
        if self.host_netns:
            cmd = ["nsenter", f"--net={self.host_netns}", *cmd]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

