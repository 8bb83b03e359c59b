"""The command line of `pyoverlay network create|rm` and `pyoverlay status`
(commands.py holds what they do; doctor.py its own): flags, one store opened
per run, results printed as a table or JSON, errors as one line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Callable

from driver import rules
from driver.store.base import StoreError
from driver.settings import DEFAULT_WAIT

from . import doctor
from .commands import (CommandError, HostResult, collect_status, network_create, network_rm, render_status, table,
                       wait_created, wait_removed)
from .storeargs import open_store_from

def add_operator_commands(commands, add_store_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    def with_store(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_store_flags(parser)
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        return parser

    network = commands.add_parser("network", help="networks on every host (the catalog)")
    sub = network.add_subparsers(dest="network_command", required=True)
    create = with_store(sub.add_parser("create", help="create a network on every host"))
    create.add_argument("name")
    create.add_argument("--subnet", required=True, action="append",
                        help="IPv4 CIDR, for example 10.20.0.0/24; again with an IPv6 one (fd00:20::/64) for "
                             "dual stack, or an IPv6 one alone for IPv6 only (hosts need Docker 28)")
    create.add_argument("--gateway", default=[], action="append",
                        help="default: the subnet's first address (one per family)")
    create.add_argument("--ipv6", action="store_true", help="as docker's: IPv6 (needs an IPv6 --subnet)")
    create.add_argument("--vni", type=int, help="VXLAN network identifier, the same as -o vni=N "
                                                "(default: a free one from %d)" % rules.VNI_AUTO_START)
    create.add_argument("--mtu", type=int, help=f"overlay MTU, the same as -o {rules.OPT_MTU}=N "
                                                f"(default: each host's underlay MTU minus {rules.VXLAN_OVERHEAD})")
    create.add_argument("-o", "--opt", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                        help=f"as docker network create's: {rules.OPT_VNI}, {rules.OPT_MTU}, "
                             f"{rules.OPT_MULTICAST}=true|false, encrypted=true|false")
    create.add_argument("--internal", action="store_true", help="no way out of the overlay")
    create.add_argument("--wait", type=float, default=DEFAULT_WAIT,
                        help="seconds to wait for the hosts to create it (default %(default)s; 0: do not wait)")
    create.set_defaults(run=_run_create)

    rm = with_store(sub.add_parser("rm", help="remove a network from every host where no container uses it"))
    rm.add_argument("name")
    rm.add_argument("--wait", type=float, default=DEFAULT_WAIT,
                    help="seconds to wait for the hosts to remove it (default %(default)s; 0: do not wait)")
    rm.set_defaults(run=_run_rm)

    status = with_store(commands.add_parser("status", help="hosts, networks and endpoints of the cluster"))
    status.set_defaults(run=_run_status)

    doctor.add_parser(commands, with_store)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (for example -o {rules.OPT_VNI}=5000)")
    return key, value


def _guarded(fn):
    """Operator errors and store failures become one line on stderr and exit 1."""
    def run(args) -> int:
        try:
            return fn(args)
        except (CommandError, StoreError, ValueError) as e:
            print(f"pyoverlay: {e}", file=sys.stderr)
            return 1
    return run


def _print_results(title: str, results: list[HostResult], as_json: bool, extra: dict) -> None:
    if as_json:
        print(json.dumps({**extra, "hosts": [asdict(r) for r in results]}, indent=2))
        return
    print(title)
    if results:
        print(table(["HOST", "RESULT", "DETAIL"], [(r.host, r.result, r.detail) for r in results]))


def _by_family(subnets: list[str], gateways: list[str], ipv6: bool) -> tuple[str, str, str, str]:
    """--subnet/--gateway given once per family -> (subnet, subnet6, gateway, gateway6) as
    network_create takes them: subnet is the IPv4 one, or the IPv6 one of an IPv6-only network."""
    six = [s for s in subnets if ":" in s]
    four = [s for s in subnets if ":" not in s]
    if len(four) > 1 or len(six) > 1:
        raise CommandError("give at most one IPv4 and one IPv6 --subnet")
    if ipv6 and not six:
        raise CommandError("pyoverlay needs the IPv6 subnet given: pass an IPv6 --subnet such as fd00:20::/64 "
                           "with --ipv6")
    gw6 = [g for g in gateways if ":" in g]
    gw4 = [g for g in gateways if ":" not in g]
    if len(gw4) > 1 or len(gw6) > 1:
        raise CommandError("give at most one --gateway per family")
    if not four:
        if gw4:
            raise CommandError(f"--gateway {gw4[0]} is IPv4 and the network has no IPv4 --subnet")
        return six[0], "", (gw6 or [""])[0], ""
    return four[0], (six or [""])[0], (gw4 or [""])[0], (gw6 or [""])[0]


@_guarded
def _run_create(args) -> int:
    store = open_store_from(args)
    try:
        subnet, subnet6, gateway, gateway6 = _by_family(args.subnet, args.gateway, args.ipv6)
        entry = network_create(store, args.name, subnet, gateway, args.vni, args.mtu, args.internal,
                               options=dict(args.opt), subnet6=subnet6, gateway6=gateway6)
        results = wait_created(store, args.name, args.wait) if args.wait > 0 else []
    finally:
        store.close()
    mtu = f", MTU {entry.mtu}" if entry.mtu else ""
    gateways = " ".join(filter(None, (entry.gateway, entry.gateway6)))
    title = (f"network {entry.name}: {entry.subnets()}, gateway {gateways}, VNI {entry.vni}{mtu}"
             f"{', internal' if entry.internal else ''}; every host running pyoverlay creates it")
    _print_results(title, results, args.json, {"network": asdict(entry)})
    return 0 if all(r.result == "created" for r in results) else 1


@_guarded
def _run_rm(args) -> int:
    store = open_store_from(args)
    try:
        entry = network_rm(store, args.name)
        results = wait_removed(store, args.name, args.wait) if args.wait > 0 else []
    finally:
        store.close()
    title = f"network {args.name} removed from the catalog" if entry else \
        f"network {args.name} was already out of the catalog"
    left = [r for r in results if r.result != "removed"]
    if left and not args.json:
        title += "; still on " + ", ".join(f"{r.host} ({r.result})" for r in left)
    _print_results(title, results, args.json, {"network": args.name})
    return 0 if not left else 1


@_guarded
def _run_status(args) -> int:
    store = open_store_from(args)
    try:
        status = collect_status(store)
    finally:
        store.close()
    print(json.dumps(status, indent=2) if args.json else render_status(status), end="" if not args.json else "\n")
    return 0
