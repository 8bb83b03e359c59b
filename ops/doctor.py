"""`pyoverlay doctor`: on this host, is everything where the store says?

Checks, each ok / warn / fail with what to do: the plugin socket answers,
the store answers and lists this host, the underlay interface and its MTU,
the VXLAN devices' UDP port, the overlay namespaces and veths, the kernel's
FDB/neighbour entries against the store's peers (missing and stale ones),
direct-mode routes, encrypted tunnels, gateway mode's uplinks and published
ports, and the engine's networks and endpoints against the store. Exit
status 1 when any check fails.

Read-only throughout: it never repairs (restarting the plugin does, as its
start reconciles the kernel with the store). Kernel state comes from the
dataplane's read methods; the comparison is driver/drift.py's, the same one
the plugin's start applies.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Optional

from driver.dataplane import Dataplane, DataplaneError, default_route_address
from driver.dataplane.direct import direct_mac
from driver.dataplane.natrules import NatTable
from driver.defaults import DRIVER_NAME
from driver.drift import KernelView, StoreView, drift
from driver.engine import Engine, EngineRefused, EngineUnavailable
from driver.model import Endpoint, Network, Peer
from driver.peersync import split_direct
from driver.rules import VXLAN_OVERHEAD
from driver.settings import (DEFAULT_DAEMON_JSON, DEFAULT_DNS_ADDR, DEFAULT_ENCRYPTED_VXLAN_PORT, DEFAULT_KEY_DIR,
                             DEFAULT_SOCKET, DEFAULT_VXLAN_PORT, env, env_on)
from driver.state import State
from driver.store.base import Store, StoreError

from .checks import FAIL, OK, SKIP, WARN, Check  # noqa: F401 (importers take them from here too)
from .client import call
from .doctor_crypto import check_encryption
from .doctor_gateway import check_gateway
from .doctor_dns import check_daemon_config, check_resolver
from .storeargs import open_store_from

SOCKET_TIMEOUT = 5.0


def _fmt(p: Peer) -> str:
    return f"{p.ip}{' ' + p.ip6 if p.ip6 else ''} {p.mac} via {p.vtep}"


class Doctor:
    def __init__(self, store: Store, host: str, dataplane: Dataplane, *, socket_path: Optional[str] = None,
                 engine: Optional[Engine] = None, driver: str = DRIVER_NAME,
                 ip_forward_path: Optional[str] = None,
                 dns_addr: Optional[str] = None, daemon_json: Optional[str] = None,
                 key_dir: Optional[str] = None, nat=None):
        self.key_dir = key_dir  # None: encrypted overlays are not checked
        self.nat = nat  # the gateway-mode NAT table (dataplane/natrules.NatTable); None: not checked
        self.ip_forward_path = ip_forward_path  # None: not checked
        self.dns_addr = dns_addr  # None: the cluster resolver is not checked
        self.daemon_json = daemon_json
        self.store = store
        self.state = State(store)
        self.host = host
        self.dataplane = dataplane
        self.socket_path = socket_path  # None: not checked
        self.engine = engine  # None: not checked
        self.driver = driver
        self._networks: Optional[list[Network]] = None  # this host's, from the store

    def run(self) -> list[Check]:
        checks = [self.check_socket(), self.check_store()]
        store_ok = checks[-1].status != FAIL
        checks.append(self.check_underlay(store_ok))
        checks.append(self.check_vxlan_port(store_ok))
        if store_ok:
            checks += [self.check_overlays(), self.check_peers()]
            direct = self.check_direct()
            if direct is not None:  # only where a direct-mode network is
                checks.append(direct)
            checks.append(self.check_engine())
            crypto = check_encryption(self.state, self.dataplane, self.host, self.key_dir) if self.key_dir else None
            if crypto is not None:  # only on a host with encrypted networks (or a tunnel left over)
                checks.append(crypto)
            gateway = check_gateway(self.state, self.dataplane, self.host, self.nat) if self.nat else None
            if gateway is not None:  # only on a host with gateway-mode networks (or a table left over)
                checks.append(gateway)
        else:
            for name in ("overlays", "peers", "engine"):
                checks.append(Check(name, SKIP, "not checked: the store does not answer"))
        if self.ip_forward_path is not None:
            checks.append(check_ip_forward(self.ip_forward_path))
        if self.dns_addr:
            checks.append(check_resolver(self.dns_addr))
            if self.daemon_json:
                checks.append(check_daemon_config(self.daemon_json, self.dns_addr))
        return checks

    # -- helpers -----------------------------------------------------------------

    def _local_networks(self) -> list[Network]:
        if self._networks is None:
            self._networks = self.state.networks(host=self.host)
        return self._networks

    def _local_endpoints(self) -> list[Endpoint]:
        return self.state.endpoints(host=self.host)

    # -- checks ------------------------------------------------------------------

    def check_socket(self) -> Check:
        path = self.socket_path
        if path is None:
            return Check("plugin socket", SKIP, "not checked")
        if not os.path.exists(path):
            return Check("plugin socket", FAIL, f"no socket at {path}: is `pyoverlay serve` running "
                                                "(systemctl status pyoverlay)?")
        started = time.perf_counter()
        try:
            status, body = call(path, "Plugin.Activate", timeout=SOCKET_TIMEOUT)
        except (OSError, http.client.HTTPException) as e:
            return Check("plugin socket", FAIL, f"{path} does not answer ({e or type(e).__name__}): "
                                                "the engine cannot use the driver; restart the plugin")
        took = (time.perf_counter() - started) * 1000
        if status != 200 or not isinstance(body, dict) or "NetworkDriver" not in (body.get("Implements") or []):
            return Check("plugin socket", FAIL, f"{path} answered {status} {body}: "
                                                "is it pyoverlay's socket?")
        return Check("plugin socket", OK, f"{path} answers ({took:.1f} ms)")

    def check_store(self) -> Check:
        where = getattr(self.store, "url", "") or "the store"
        try:
            hosts = list(self.state.hosts())
        except StoreError as e:
            return Check("store", FAIL, f"{e}; check that the store runs and that --store points at it")
        if self.host not in hosts:
            return Check("store", FAIL, f"{where} answers, but has no record of this host ({self.host}) "
                                        f"among {len(hosts)} live hosts: is the plugin running here with "
                                        f"--advertise-addr {self.host}?", sorted(hosts))
        return Check("store", OK, f"{where} answers; {len(hosts)} live host(s), this one included")

    def check_underlay(self, store_ok: bool) -> Check:
        try:
            name, mtu = self.dataplane.underlay_link(self.host) or (None, 0)
        except (OSError, DataplaneError) as e:
            return Check("underlay", FAIL, f"cannot read the interfaces: {e}")
        if name is None:
            return Check("underlay", FAIL, f"no interface holds {self.host}: pass this host's underlay "
                                           "address as --advertise-addr")
        room = mtu - VXLAN_OVERHEAD
        summary = f"{name} holds {self.host}, MTU {mtu}: overlays up to MTU {room}"
        if not store_ok:
            return Check("underlay", OK, summary)
        too_big = [f"VNI {n.vni} has MTU {n.mtu} > {room}: large packets are lost; recreate it with "
                   f"-o com.docker.network.driver.mtu={room}" for n in self._local_networks() if n.mtu > room]
        return Check("underlay", FAIL if too_big else OK, summary, too_big)

    def check_vxlan_port(self, store_ok: bool) -> Check:
        port = self.dataplane.vxlan_port
        vnis = sorted(self.dataplane.networks())
        if not vnis:
            return Check("vxlan port", OK, f"UDP {port} (no overlay on this host yet)")
        vtep = self.dataplane.vtep
        unread, kernel = {}, KernelView(namespaces=set(vnis))
        for vni in vnis:
            try:
                kernel.vxlan[vni] = self.dataplane.vxlan_settings(vni)
            except (OSError, DataplaneError) as e:
                unread[vni] = e
        # The store is not needed here: every overlay must match this host's flags
        # (an encrypted one's port is --encrypted-vxlan-port: known only with the store).
        encrypted = {o.vni for o in self.state.overlays() if o.encrypted} if store_ok else set()
        found = drift(StoreView(networks=set(vnis) - encrypted, vtep=vtep, vxlan_port=port),
                      KernelView(namespaces=set(vnis) - encrypted,
                                 vxlan={v: s for v, s in kernel.vxlan.items() if v not in encrypted}))
        secure = drift(StoreView(networks=set(vnis) & encrypted, vtep=vtep, vxlan_port=self.dataplane.encrypted_port),
                       KernelView(namespaces=set(vnis) & encrypted,
                                  vxlan={v: s for v, s in kernel.vxlan.items() if v in encrypted}))
        found.vxlan.update(secure.vxlan)
        wrong = []
        for vni in vnis:
            if vni in unread:
                wrong.append(f"VNI {vni}: cannot read vxlan0: {unread[vni]}")
                continue
            if vni not in found.vxlan:
                continue
            have = found.vxlan[vni][0]
            if have is None:
                wrong.append(f"VNI {vni}: {self.dataplane.netns_name(vni)} has no vxlan0: "
                             "delete the network and create it again")
            else:
                wrong.append(f"VNI {vni}: vxlan0 has id {have.vni}, port {have.port}, local {have.vtep}; expected "
                             f"{vni}, {port}, {vtep}: was the plugin restarted with "
                             "other --vxlan-port/--advertise-addr? Recreate the network")
        if wrong:
            return Check("vxlan port", FAIL, f"{len(wrong)} of {len(vnis)} overlays are not on UDP {port}", wrong)
        return Check("vxlan port", OK, f"UDP {port} on all {len(vnis)} overlay(s), local {vtep}")

    def check_overlays(self) -> Check:
        try:
            wanted = {n.vni for n in self._local_networks()}
            have = self.dataplane.networks()
            endpoints = self._local_endpoints()
            store = StoreView(networks=wanted, endpoints={
                vni: {e.endpoint_id[:10] for e in endpoints if e.vni == vni} for vni in wanted})
            found = drift(store, KernelView(namespaces=have, veths={
                vni: self.dataplane.endpoints(vni) for vni in wanted & have}))
        except (StoreError, DataplaneError, OSError) as e:
            return Check("overlays", FAIL, f"cannot compare: {e}")
        problems, notes = [], []
        for vni in found.missing_namespaces:
            problems.append(f"VNI {vni}: no namespace {self.dataplane.netns_name(vni)}: containers on it "
                            "are cut off; restart the plugin (its start re-creates it)")
        for vni in found.stale_namespaces:
            problems.append(f"VNI {vni}: namespace {self.dataplane.netns_name(vni)} is not in the store: "
                            "debris; restart the plugin (its start removes it)")
        for vni in sorted(wanted & have):
            for stale in found.stale_veths.get(vni, ()):
                problems.append(f"VNI {vni}: veth pyb{stale} belongs to no endpoint in the store: "
                                "debris; restart the plugin (its start removes it)")
            for missing in found.missing_veths.get(vni, ()):
                notes.append(f"VNI {vni}: endpoint {missing} has no interface (its container is not "
                             "started yet, or it was lost: restart the container)")
        details = problems + notes
        status = FAIL if problems else (WARN if notes else OK)
        summary = f"{len(wanted)} overlay(s) in the store, {len(have)} in the kernel"
        return Check("overlays", status, summary + (f"; {len(problems)} problem(s)" if problems else ""), details)

    def check_peers(self) -> Check:
        try:
            expected: dict[int, set[Peer]] = {}
            for vni, _, record in self.state.peers():
                expected.setdefault(vni, set()).add(record)
            wanted = {n.vni for n in self._local_networks()}
            have = self.dataplane.networks()
            overlays = self.state.overlays()
            multicast = {o.vni for o in overlays if o.multicast}
            for o in overlays:
                if o.encap and o.vni in expected:  # direct mode: vxlan0 holds only what goes through it
                    expected[o.vni] = set(split_direct(expected[o.vni], o.encap, self.host,
                                                       self.dataplane.same_subnet).vxlan)
            kernel = KernelView(namespaces=have, peers={vni: self.dataplane.peers(vni) for vni in wanted & have},
                                flood={vni: self.dataplane.flood(vni) for vni in wanted & have})
            found = drift(StoreView(networks=wanted, peers=expected, vtep=self.host, multicast=multicast), kernel)
        except (StoreError, DataplaneError, OSError) as e:
            return Check("peers", FAIL, f"cannot compare: {e}")
        missing, stale = [], []
        for vni in sorted(kernel.peers):
            missing += [f"VNI {vni}: missing {_fmt(p)}" for p in sorted(found.missing_peers.get(vni, ()), key=_fmt)]
            stale += [f"VNI {vni}: stale {_fmt(p)}" for p in sorted(found.stale_peers.get(vni, ()), key=_fmt)]
            # The flood list of a -o multicast=true overlay: one all-zero FDB entry per remote host.
            missing += [f"VNI {vni}: missing flood entry to {v}" for v in found.missing_flood.get(vni, ())]
            stale += [f"VNI {vni}: stale flood entry to {v}" for v in found.stale_flood.get(vni, ())]
        if missing or stale:
            return Check("peers", FAIL,
                         f"{len(missing)} missing and {len(stale)} stale FDB/neighbour entries: traffic to "
                         "those containers (or their broadcast and multicast) is lost or misdirected; restart "
                         "the plugin (its start reconciles the kernel with the store)", missing + stale)
        total = sum(map(len, kernel.peers.values()))  # no drift: the kernel holds exactly the store's
        flooding = sum(map(len, kernel.flood.values()))
        return Check("peers", OK, f"the kernel holds exactly the store's {total} remote peer(s)"
                                  + (f" and {flooding} flood entr{'y' if flooding == 1 else 'ies'}" if flooding else ""))

    def check_direct(self) -> Optional[Check]:
        """Direct-mode overlays (-o encap=...): direct0 there, each route and
        neighbour as the store's peers want, and the hosts encap=never cannot reach."""
        try:
            direct = {o.vni: o.encap for o in self.state.overlays() if o.encap}
            local = {n.vni for n in self._local_networks()} & set(direct) & self.dataplane.networks()
            if not local:
                return None
            peers: dict[int, list[Peer]] = {}
            for vni, _, record in self.state.peers():
                if vni in local:
                    peers.setdefault(vni, []).append(record)
            problems, notes = [], []
            for vni in sorted(local):
                if not self.dataplane.has_direct(vni):
                    problems.append(f"VNI {vni}: no direct0 in {self.dataplane.netns_name(vni)}: containers on "
                                    "other hosts are cut off; restart the plugin (its start re-creates it)")
                    continue
                split = split_direct(peers.get(vni, ()), direct[vni], self.host, self.dataplane.same_subnet)
                want = {p.ip: ("br0", p.mac) for p in split.local}
                want.update((p.ip, ("direct0", direct_mac(p.vtep, vni))) for p in split.routed)
                off = {p.vtep for p in split.unreachable}
                have = self.dataplane.direct_routes(vni)
                problems += [f"VNI {vni}: missing route to {ip} via {dev} ({mac})"
                             for ip, (dev, mac) in sorted(want.items()) if have.get(ip) != (dev, mac)]
                problems += [f"VNI {vni}: stale route to {ip} via {have[ip][0]}"
                             for ip in sorted(have.keys() - want.keys())]
                if off:
                    notes.append(f"VNI {vni} (encap=never): hosts {', '.join(sorted(off))} are off this host's "
                                 f"underlay subnet {self.dataplane.underlay_subnet()}: their containers on it are "
                                 "unreachable from here; recreate the network with -o encap=cross-subnet to reach "
                                 "them over VXLAN")
        except (StoreError, DataplaneError, OSError) as e:
            return Check("direct", FAIL, f"cannot compare: {e}")
        if problems:
            return Check("direct", FAIL, f"{len(problems)} direct-mode route(s) wrong: traffic to those containers "
                                         "is lost; restart the plugin (its start reconciles the kernel with the "
                                         "store)", problems + notes)
        if notes:
            return Check("direct", WARN, f"{len(local)} direct-mode network(s); some hosts are unreachable", notes)
        return Check("direct", OK, f"{len(local)} direct-mode network(s): routes as the store says")

    def check_engine(self) -> Check:
        if self.engine is None:
            return Check("engine", SKIP, "not checked")
        try:
            ours = self.engine.networks(self.driver)
        except (EngineUnavailable, EngineRefused) as e:
            return Check("engine", FAIL, f"{e}: the plugin cannot learn network names here")
        try:
            stored = {n.network_id: n for n in self._local_networks()}
            endpoints = self._local_endpoints()
            catalog = self.state.catalog_entries()
            records = {name: rec for (host, name), rec in self.state.every_engine_network().items()
                       if host == self.host}
        except StoreError as e:
            return Check("engine", FAIL, f"cannot compare: {e}")
        problems, notes = [], []
        ids = {info.id for info in ours}
        names = {info.name for info in ours}
        for info in ours:
            if info.id not in stored:
                problems.append(f"network {info.name} ({info.id[:12]}) is in the engine but not in the store: "
                                f"containers cannot join it; docker network rm {info.name} and create it again")
                continue
            known = {e.endpoint_id for e in endpoints if e.network_id == info.id}
            for endpoint_id, container in sorted(info.containers.items()):
                if endpoint_id not in known:
                    problems.append(f"network {info.name}: container {container}'s endpoint "
                                    f"{endpoint_id[:12]} is not in the store: other hosts cannot reach it; "
                                    f"reconnect it (docker network disconnect/connect {info.name} {container})")
            for endpoint_id in sorted(known - set(info.containers)):
                notes.append(f"network {info.name}: endpoint {endpoint_id[:12]} is in the store but no "
                             "container of the engine uses it (left over from an engine crash?)")
        for network_id, network in sorted(stored.items()):
            if network_id not in ids:
                problems.append(f"the store has network {network_id[:12]} (VNI {network.vni}) for this host, "
                                "but the engine does not (it stopped while creating it?): the plugin's catalog "
                                "forgets such networks within seconds; is it off (--no-catalog)?")
        for name, entry in sorted(catalog.items()):
            record = records.get(name)
            if record is not None and record.error:
                notes.append(f"catalog network {name}: {record.error}")
            elif name not in names:
                notes.append(f"catalog network {name} ({entry.subnet}) is not in this engine yet: is the "
                             "plugin's catalog on (no --no-catalog) and the engine reachable?")
        for name, record in sorted(records.items()):
            if name not in catalog and record.removing and record.error:
                problems.append(f"network {name}: {record.error}")  # the engine miscounts: it must restart
        status = FAIL if problems else (WARN if notes else OK)
        summary = f"{len(ours)} {self.driver} network(s) in the engine at {self.engine.url}"
        return Check("engine", status, summary, problems + notes)


# -- IP forwarding -----------------------------------------------------------------
#: Per network namespace: read by a process in the host's (as doctor runs).
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def check_ip_forward(path: str = IP_FORWARD) -> Check:
    """Egress and -p of pyoverlay's containers go through docker_gwbridge and
    the host's routing. Docker's iptables backend turns forwarding on itself;
    Docker 29's nftables backend (--firewall-backend=nftables) does not, and
    then creating docker_gwbridge fails, so no container starts."""
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError as e:
        return Check("ip forwarding", WARN, f"cannot read {path}: {e}")
    if value == "1":
        return Check("ip forwarding", OK, "net.ipv4.ip_forward is 1")
    return Check("ip forwarding", FAIL,
                 f"net.ipv4.ip_forward is {value}: containers on pyoverlay networks cannot reach outside or "
                 "be reached through -p, and Docker 29 with --firewall-backend=nftables cannot create "
                 "docker_gwbridge",
                 ["turn it on: sysctl -w net.ipv4.ip_forward=1, and keep it across reboots: "
                  "echo net.ipv4.ip_forward=1 > /etc/sysctl.d/99-pyoverlay.conf",
                  "(Docker's iptables backend turns it on itself; its nftables backend does not)"])


# -- output ----------------------------------------------------------------------

def render(checks: list[Check]) -> str:
    label = {OK: " ok ", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}
    lines = []
    for c in checks:
        lines.append(f"[{label[c.status]}] {c.name}: {c.summary}")
        lines += [f"         {d}" for d in c.details]
    failed = sum(c.status == FAIL for c in checks)
    lines.append(f"{failed} check(s) failed" if failed else "no problem found")
    return "\n".join(lines) + "\n"


def exit_status(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def add_parser(commands, with_store) -> None:
    doctor = with_store(commands.add_parser("doctor", help="check this host against the store"))
    doctor.add_argument("--socket", default=env("SOCKET", DEFAULT_SOCKET))
    doctor.add_argument("--advertise-addr", dest="vtep", default=env("ADVERTISE_ADDR"),
                        help="this host's underlay address (default: that of the default route's interface)")
    doctor.add_argument("--vxlan-port", type=int, default=int(env("VXLAN_PORT", DEFAULT_VXLAN_PORT)))
    doctor.add_argument("--docker-host", default=env("DOCKER_HOST"),
                        help="the local engine (default: $DOCKER_HOST, else unix:///var/run/docker.sock)")
    doctor.add_argument("--no-engine", action="store_true", help="do not compare with the engine")
    doctor.add_argument("--key-dir", default=env("KEY_DIR", DEFAULT_KEY_DIR),
                        help="the plugin's --key-dir, to check encrypted networks' tunnel (default %(default)s)")
    doctor.add_argument("--encrypted-vxlan-port", type=int,
                        default=int(env("ENCRYPTED_VXLAN_PORT", DEFAULT_ENCRYPTED_VXLAN_PORT)))
    doctor.add_argument("--dns-addr", default=env("DNS_ADDR", DEFAULT_DNS_ADDR),
                        help="the cluster resolver's address (default %(default)s)")
    doctor.add_argument("--daemon-json", default=DEFAULT_DAEMON_JSON,
                        help="the engine's daemon config, which must name the resolver (default %(default)s)")
    doctor.add_argument("--no-dns", action="store_true",
                        default=not env_on("DNS"),
                        help="do not check the cluster resolver (default when PYOVERLAY_DNS=0)")
    doctor.set_defaults(run=_run)


def _run(args) -> int:
    try:
        vtep = args.vtep or default_route_address()
        store = open_store_from(args)
    except (ValueError, DataplaneError) as e:
        print(f"pyoverlay: {e}", file=sys.stderr)
        return 1
    dataplane = Dataplane(vtep=vtep, vxlan_port=args.vxlan_port, encrypted_port=args.encrypted_vxlan_port)
    engine = None if args.no_engine else Engine(args.docker_host, timeout=SOCKET_TIMEOUT)
    driver = os.path.basename(args.socket).removesuffix(".sock")
    try:
        checks = Doctor(store, vtep, dataplane, socket_path=args.socket, engine=engine, driver=driver,
                        ip_forward_path=IP_FORWARD,
                        dns_addr=None if args.no_dns else args.dns_addr, daemon_json=args.daemon_json,
                        key_dir=args.key_dir, nat=NatTable()).run()
    finally:
        dataplane.close()
        store.close()
        if engine is not None:
            engine.close()
    if args.json:
        print(json.dumps({"host": vtep, "ok": exit_status(checks) == 0,
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(checks), end="")
    return exit_status(checks)
