"""Operator commands: `pyoverlay network create|rm`, `pyoverlay status`
(and `pyoverlay doctor`, in doctor.py).

They read and write the store only, so they run on any machine that
reaches it. Output is a readable table, or JSON with --json for scripts.
Each command is a function over a store (tested with the in-memory one)
plus a thin argparse wrapper in commandline.py.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from driver import rules
from driver.defaults import OPT_ENCRYPTED
from driver.encryption import check_overlay_encrypted, encrypted_option
from driver.errors import DriverError
from driver.gateway import OPT_GATEWAY, gateway_option
from driver.model import EngineNetwork, Host, NamedNetwork
from driver.state import State
from driver.store.base import Store

# Docker's own rule for network names.
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
POLL = 0.2  # seconds between looks at the store while waiting for hosts


class CommandError(Exception):
    """What went wrong, said so the operator knows what to do."""


# -- reading the store -------------------------------------------------------

def engine_records(store: Store) -> dict[tuple[str, str], EngineNetwork]:
    """(host, name) -> what that host's engine holds under that catalog name."""
    return State(store).every_engine_network()


def alive_hosts(store: Store) -> dict[str, Host]:
    return State(store).hosts()


# -- network create ------------------------------------------------------------

def network_create(store: Store, name: str, subnet: str, gateway: str = "", vni: Optional[int] = None,
                   mtu: Optional[int] = None, internal: bool = False,
                   options: Optional[dict[str, str]] = None, subnet6: str = "", gateway6: str = "") -> NamedNetwork:
    """Check and write catalog/<name>; every host's catalog creates the network.

    options: `-o KEY=VALUE` as `docker network create` takes them (vni, the
    MTU, multicast); vni and mtu are the same given as --vni/--mtu. The checks are the
    driver's own (driver/rules.py), so a refusal reads as docker's would.
    subnet6/gateway6: a dual-stack network's IPv6 side; subnet may itself be
    IPv6 (an IPv6-only network, which hosts with an engine before 28 refuse)."""
    if not _NAME.match(name):
        raise CommandError(f"network name {name!r} is not valid: use letters, digits, '_', '.', '-', "
                           "starting with a letter or digit")
    try:
        options = _options(options, vni, mtu)
        net = rules.parse_subnet(subnet, v6=":" in subnet)
        subnet = str(net)
        net6 = rules.parse_subnet6(subnet6) if subnet6 else None
        if net6 is not None and net.version == 6:
            raise CommandError("give one IPv4 and one IPv6 --subnet for a dual-stack network, or one IPv6 "
                               "--subnet for an IPv6-only one")
        subnet6 = str(net6) if net6 is not None else ""
        state = State(store)
        if state.catalog_entry(name)[0] is not None:
            raise CommandError(f"a network named {name} already exists in the catalog; "
                               f"remove it first (pyoverlay network rm {name}) or pick another name")
        mtu = rules.mtu_option(options)  # each host checks its own underlay when it creates the network
        vni = rules.vni_option(options)
        multicast = rules.multicast_option(options)
        gateway_mode = gateway_option(options)
        encrypted = encrypted_option(options)
        encap = rules.encap_option(options)
        rules.check_encap_fits(encap, multicast, encrypted, net6 is not None or net.version == 6)
        catalog = state.catalog_entries()
        for other in catalog.values():
            for mine in filter(None, (net, net6)):
                for theirs in filter(None, (other.subnet, other.subnet6)):
                    theirs = ipaddress.ip_network(theirs)
                    if theirs.version == mine.version and theirs.overlaps(mine):
                        raise CommandError(f"subnet {mine} overlaps {theirs} of network {other.name}; "
                                           "choose another --subnet")
        for mine in filter(None, (net, net6)):
            rules.check_overlap(mine, (p.subnet for p in state.pools()
                                       if ipaddress.ip_network(p.subnet).version == mine.version))

        found = state.subnet_claim(subnet)
        claim = found.vni if found else None
        if vni is not None:
            rules.check_subnet_vni(subnet, vni, claim)
            overlay = state.overlay(vni)
            rules.check_vni_subnet(vni, subnet, overlay.subnet if overlay else None)
            if any(o.vni == vni and o.name != name for o in catalog.values()):
                raise CommandError(f"VNI {vni} is already used by another network in the catalog; "
                                   f"choose another -o {rules.OPT_VNI}")
        else:
            overlay = state.overlay(claim) if claim else None
            vni = claim or _free_vni(state, catalog.values())
        if overlay is not None:  # hosts already carry it: it floods as it was made
            rules.check_overlay_multicast(overlay.vni, multicast, overlay.multicast)
            multicast = overlay.multicast
            check_overlay_encrypted(overlay.vni, encrypted, overlay.encrypted)
            encrypted = overlay.encrypted
            rules.check_overlay_encap(overlay.vni, encap, overlay.encap)
            encap = overlay.encap
            rules.check_overlay_subnet6(overlay.vni, subnet6, overlay.subnet6)

        wanted = rules.usable_address(net, gateway) if gateway else None
        pool = state.pool(subnet)
        shared = pool.gateway if pool else ""
        rules.check_gateway(net, wanted, shared)
        # The same default the IPAM picks, so every host's inspect shows the same.
        gateway = str(wanted or shared or rules.default_gateway(net))
        if net6 is not None:
            wanted6 = rules.usable_address(net6, gateway6) if gateway6 else None
            pool6 = state.pool(subnet6)
            rules.check_gateway(net6, wanted6, pool6.gateway if pool6 else "")
            gateway6 = str(wanted6 or (pool6.gateway if pool6 else "") or rules.default_gateway(net6))
        elif gateway6:
            raise CommandError("--gateway for IPv6 needs an IPv6 --subnet")
    except DriverError as e:
        raise CommandError(str(e)) from None

    entry = NamedNetwork(name, subnet, gateway, vni, mtu or 0, internal, origin="cli", multicast=bool(multicast),
                         gateway_mode=gateway_mode, encrypted=bool(encrypted), subnet6=subnet6, gateway6=gateway6,
                         encap="" if encap in (None, rules.ENCAP_ALWAYS) else encap)
    if not State(store).add_catalog_entry(entry):
        raise CommandError(f"a network named {name} was added to the catalog meanwhile; "
                           "look at it with pyoverlay status")
    return entry


#: The -o options `pyoverlay network create` takes (block_size is per overlay, not in the catalog).
CREATE_OPTIONS = (rules.OPT_VNI, rules.OPT_MTU, rules.OPT_MULTICAST, OPT_GATEWAY, OPT_ENCRYPTED, rules.OPT_ENCAP)


def _options(options: Optional[dict[str, str]], vni: Optional[int], mtu: Optional[int]) -> dict[str, str]:
    """-o KEY=VALUE merged with --vni/--mtu, which are the same options."""
    merged = dict(options or {})
    unknown = sorted(set(merged) - set(CREATE_OPTIONS))
    if unknown:
        raise CommandError(f"unknown option {', '.join('-o ' + u for u in unknown)}; pyoverlay network create "
                           f"accepts -o {rules.OPT_VNI}=<{rules.VNI_MIN}-{rules.VNI_MAX}>, "
                           f"-o {rules.OPT_MTU}=<bytes> (or --vni, --mtu), -o {rules.OPT_MULTICAST}=true|false, "
                           f"-o {OPT_GATEWAY}=pyoverlay|docker_gwbridge, -o {OPT_ENCRYPTED}=true|false "
                           f"and -o {rules.OPT_ENCAP}={'|'.join(rules.ENCAP_MODES)}")
    for key, flag, value in ((rules.OPT_VNI, "--vni", vni), (rules.OPT_MTU, "--mtu", mtu)):
        if value is None:
            continue
        if key in merged and str(merged[key]) != str(value):
            raise CommandError(f"{flag} {value} and -o {key}={merged[key]} disagree: give it once")
        merged[key] = str(value)
    return merged


def _free_vni(state: State, catalog: Iterable[NamedNetwork]) -> int:
    used = {o.vni for o in state.overlays()} | {c.vni for c in catalog}
    return rules.free_vni(used)


@dataclass
class HostResult:
    host: str
    result: str  # created / refused / pending / removed / in use / down
    detail: str = ""
    containers: list[str] = field(default_factory=list)


def wait_created(store: Store, name: str, wait: float, clock=time.monotonic,
                 sleep=time.sleep) -> list[HostResult]:
    """Until every live host's catalog created (or refused) the network, or wait runs out."""
    deadline = clock() + wait
    while True:
        records = {h: r for (h, n), r in engine_records(store).items() if n == name}
        results = []
        for host in sorted(set(alive_hosts(store)) | set(records), key=_host_order):
            rec = records.get(host)
            if rec is not None and rec.network_id and not rec.error:
                results.append(HostResult(host, "created", f"network id {rec.network_id[:12]}"))
            elif rec is not None and rec.error:
                results.append(HostResult(host, "refused", rec.error))
            else:
                results.append(HostResult(host, "pending", "not created yet (engine down, or catalog off there?)"))
        if all(r.result != "pending" for r in results) or clock() >= deadline:
            return results
        sleep(POLL)


# -- network rm ------------------------------------------------------------------

def network_rm(store: Store, name: str) -> Optional[NamedNetwork]:
    """Delete catalog/<name>; every host's catalog removes the network where unused."""
    state = State(store)
    entry, revision = state.catalog_entry(name)
    if entry is None:
        if not any(n == name for (_, n) in engine_records(store)):
            raise CommandError(f"no network named {name} in the catalog (pyoverlay status lists them)")
        return None  # already deleted; still being removed somewhere
    if not state.delete_catalog_entry(name, revision):
        raise CommandError(f"network {name} changed meanwhile; run the command again")
    return entry


def wait_removed(store: Store, name: str, wait: float, clock=time.monotonic,
                 sleep=time.sleep) -> list[HostResult]:
    """Until every live host removed the network or said it is in use, or wait runs out."""
    deadline = clock() + wait
    seen: set[str] = set()
    while True:
        records = {h: r for (h, n), r in engine_records(store).items() if n == name}
        seen |= set(records)
        alive = alive_hosts(store)
        results = []
        for host in sorted(seen, key=_host_order):
            rec = records.get(host)
            if rec is None or not rec.network_id:
                results.append(HostResult(host, "removed"))
            elif rec.error:
                results.append(HostResult(host, "refused", rec.error))
            elif rec.removing:
                names = sorted(rec.containers.values())
                results.append(HostResult(host, "in use", f"by {', '.join(names)}: removed when they leave",
                                          names))
            elif host not in alive:
                results.append(HostResult(host, "down", "host is down: removed when it is back"))
            else:
                results.append(HostResult(host, "pending", "not removed yet (engine down?)"))
        if all(r.result != "pending" for r in results) or clock() >= deadline:
            return results
        sleep(POLL)


# -- status ------------------------------------------------------------------------

def _host_order(host: str):
    try:
        return (0, ipaddress.ip_address(host).packed, host)
    except ValueError:
        return (1, b"", host)


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def collect_status(store: Store, now: Optional[float] = None) -> dict:
    """Hosts, networks and endpoints as the store knows them, plain data."""
    now = time.time() if now is None else now
    alive = alive_hosts(store)
    state = State(store)
    seen = state.last_seen()
    catalog = state.catalog_entries()
    overlays = {o.vni: o for o in state.overlays()}
    endpoints = state.endpoints()
    engines = engine_records(store)

    hosts = []
    known = set(alive) | set(seen) | {h for o in overlays.values() for h in o.networks} | {h for h, _ in engines}
    for host in sorted(known, key=_host_order):
        record, last = alive.get(host), seen.get(host)
        hosts.append({
            "host": host,
            "address": record.vtep if record else (last.vtep if last else host),
            "alive": record is not None,
            "started": record.started if record else None,
            "last_seen": now if record else (last.at if last else None),
            "version": record.version if record else "",
        })

    names_by_subnet: dict[str, set[str]] = defaultdict(set)
    for (_, name), rec in engines.items():
        if rec.subnet:
            names_by_subnet[rec.subnet].add(name)
    container_of = {ep: cname for rec in engines.values() for ep, cname in rec.containers.items()}
    count = defaultdict(int)
    with_endpoints: dict[int, set[str]] = defaultdict(set)
    for ep in endpoints:
        count[ep.vni] += 1
        with_endpoints[ep.vni].add(ep.vtep)

    keys = state.host_keys()  # encrypted overlays: each host's exchange key (driver/encryption.py)
    networks, name_of_vni = [], {}
    entries = {(e.vni, e.subnet): e for e in catalog.values()}
    for vni in sorted(set(overlays) | {e.vni for e in catalog.values()}):
        overlay = overlays.get(vni)
        entry = next((e for (v, _), e in entries.items() if v == vni), None)
        subnet = overlay.subnet if overlay else entry.subnet
        name = entry.name if entry else ",".join(sorted(names_by_subnet.get(subnet, ()))) or ""
        name_of_vni[vni] = name
        notes = []
        for (host, n), rec in sorted(engines.items()):
            if n == name and rec.error:
                notes.append(f"{host}: {rec.error}")
            elif n == name and rec.removing:
                notes.append(f"{host}: being removed, in use by {', '.join(sorted(rec.containers.values()))}")
        multicast = overlay.multicast if overlay else entry.multicast
        encrypted = overlay.encrypted if overlay else entry.encrypted
        encap = (overlay.encap if overlay else "") or "always"
        if encap == "never":
            # Which hosts cannot reach which depends on each host's underlay prefix: doctor knows it there.
            notes.append("encap=never: hosts on different underlay subnets cannot reach each other's containers "
                         "on it; `pyoverlay doctor` on a host names the hosts it cannot reach")
        networks.append({
            "name": name,
            "vni": vni,
            "subnet": subnet,
            "mtu": overlay.mtu if overlay else (entry.mtu or None),
            "internal": entry.internal if entry else None,
            "multicast": multicast,
            # The VTEPs its broadcast and multicast go to: every host with a container
            # on it (each floods to the others); empty without -o multicast=true.
            "flood": sorted(with_endpoints[vni], key=_host_order) if multicast else [],
            "encrypted": encrypted,
            # Age in seconds of the oldest exchange key among its hosts (None: not encrypted, or no key yet).
            "key_age": _key_age(keys, overlay.networks if overlay else {}, now) if encrypted else None,
            "in_catalog": entry is not None,
            "hosts": sorted(overlay.networks if overlay else [], key=_host_order),
            "endpoints": count.get(vni, 0),
            "notes": notes,
            # cross-subnet or never (direct mode); left out for VXLAN, as records leave out unset options.
            **({"encap": encap} if encap != "always" else {}),
            # A dual-stack network's IPv6 subnet (left out for others: the rows read as before).
            **({"subnet6": overlay.subnet6} if overlay and overlay.subnet6 else {}),
        })

    endpoint_rows = [{
        "host": ep.host,
        "network": name_of_vni.get(ep.vni, ""),
        "vni": ep.vni,
        "container": container_of.get(ep.endpoint_id, ""),
        "ip": ep.ip,
        "mac": ep.mac,
        "endpoint_id": ep.endpoint_id,
        **({"ip6": ep.ip6} if ep.ip6 else {}),  # a dual-stack endpoint's IPv6 address
    } for ep in sorted(endpoints, key=lambda e: (_host_order(e.host), e.vni, ipaddress.ip_address(e.ip)))]
    _add_names(store, networks)
    return {"hosts": hosts, "networks": networks, "endpoints": endpoint_rows,
            "blocks": collect_blocks(store, set(alive)),
            "keys": [{"host": k.host, "epoch": k.epoch, "age": round(now - k.made, 1), "rotation": k.rotation}
                     for k in sorted(keys.values(), key=lambda k: _host_order(k.host))]}


def _key_age(keys: dict, hosts: Iterable[str], now: float) -> Optional[float]:
    ages = [now - keys[h].made for h in hosts if h in keys]
    return round(max(ages), 1) if ages else None


def _encrypted(network: dict) -> str:
    """off, or on and how old its oldest key is."""
    if not network.get("encrypted"):
        return "off"
    age = network.get("key_age")
    return "on" if age is None else f"on (key {_span(age)} old)"


def _add_names(store: Store, networks: list[dict]) -> None:
    """Each network's DNS names (the cluster resolver's records), as "names"."""
    by_vni: dict[int, list[dict]] = defaultdict(list)
    for (vni, _), rec in State(store).names().items():
        by_vni[vni].append({"name": rec.name, "aliases": list(rec.aliases), "address": rec.address,
                            "host": rec.host, "container": rec.container})
    for network in networks:
        network["names"] = sorted(by_vni.get(network["vni"], []),
                                  key=lambda n: (n["name"], ipaddress.ip_address(n["address"])))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; a lone header says "(none)"."""
    cells = [[str(h) for h in headers]] + [["-" if c in (None, "") else str(c) for c in row] for row in rows]
    if len(cells) == 1:
        return "  ".join(cells[0]) + "\n(none)"
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _multicast(network: dict) -> str:
    """off, or on and to how many hosts its broadcast and multicast go."""
    if not network.get("multicast"):
        return "off"
    flood = network.get("flood", [])
    return f"on ({len(flood)} host{'' if len(flood) == 1 else 's'})"


def render_status(status: dict, now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    hosts = table(["HOST", "ADDRESS", "STATE", "LAST SEEN", "VERSION"], [
        (h["host"], h["address"],
         (f"alive, up {_span(now - h['started'])}" if h["started"] else "alive") if h["alive"] else "down",
         "now" if h["alive"] else (f"{_span(now - h['last_seen'])} ago" if h["last_seen"] else "never"),
         h["version"])
        for h in status["hosts"]])
    networks = table(["NAME", "VNI", "SUBNET", "MTU", "MULTICAST", "ENCRYPTED", "HOSTS", "ENDPOINTS"], [
        (n["name"], n["vni"], " ".join(filter(None, (n["subnet"], n.get("subnet6")))), n["mtu"], _multicast(n),
         _encrypted(n), ",".join(n["hosts"]), n["endpoints"])
        for n in status["networks"]])
    notes = [f"  {n['name'] or n['vni']}: {note}" for n in status["networks"] for note in n["notes"]]
    endpoints = table(["HOST", "NETWORK", "CONTAINER", "IP", "MAC", "ENDPOINT"], [
        (e["host"], e["network"], e["container"], " ".join(filter(None, (e["ip"], e.get("ip6")))), e["mac"],
         e["endpoint_id"][:12])
        for e in status["endpoints"]])
    parts = ["HOSTS", hosts, "", "NETWORKS", networks]
    if notes:
        parts += ["notes:"] + notes
    names = table(["NETWORK", "NAME", "ALIASES", "IP", "HOST"], [
        (n["name"] or n["vni"], entry["name"], ",".join(entry["aliases"]), entry["address"], entry["host"])
        for n in status["networks"] for entry in n.get("names", [])])
    parts += ["", "ENDPOINTS", endpoints]
    if any(n.get("names") for n in status["networks"]):  # none: no cluster resolver runs (--no-dns)
        parts += ["", "NAMES", names]
    return "\n".join(parts + render_blocks(status.get("blocks", []))) + "\n"


# -- status: address blocks (issue 13) ---------------------------------------------

def collect_blocks(store: Store, alive: set) -> list[dict]:
    """Every address block: its pool, holder, whether the holder is alive, and
    how many of its addresses are in use (by anyone: others may borrow)."""
    used: dict[str, list[ipaddress.IPv4Address]] = defaultdict(list)
    state = State(store)
    for subnet, ip in state.every_address():
        used[subnet].append(ipaddress.ip_address(ip))
    rows = []
    for subnet, cidr, record, _ in state.blocks():
        block = ipaddress.ip_network(cidr)
        rows.append({"subnet": subnet, "block": cidr, "host": record.host, "alive": record.host in alive,
                     "used": sum(ip in block for ip in used[subnet]), "size": block.num_addresses})
    rows.sort(key=lambda r: (_host_order(r["host"]), ipaddress.ip_network(r["block"])))
    return rows


def render_blocks(blocks: list[dict]) -> list[str]:
    if not blocks:  # a store without blocks (single host, nothing allocated yet): nothing to show
        return []
    per_host: dict[str, list[dict]] = defaultdict(list)
    for b in blocks:
        per_host[b["host"]].append(b)
    summary = table(["HOST", "BLOCKS", "ADDRESSES IN USE"], [
        (host + ("" if rows[0]["alive"] else " (down)"), len(rows),
         f"{sum(r['used'] for r in rows)} of {sum(r['size'] for r in rows)}")
        for host, rows in per_host.items()])
    detail = table(["HOST", "SUBNET", "BLOCK", "USED"], [
        (b["host"], b["subnet"], b["block"], f"{b['used']}/{b['size']}") for b in blocks])
    return ["", "ADDRESS BLOCKS", summary, "", detail]
