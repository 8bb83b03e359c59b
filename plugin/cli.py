"""`pyoverlay` command line. Every flag of `serve` also reads PYOVERLAY_<FLAG>."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from driver.dataplane import default_route_address
from driver.dns.upstreams import parse_upstreams
from ops.commandline import add_operator_commands
from ops.dnsconfig import add_parser as add_dns_config_parser

from .logs import use_json
# Flag defaults and PYOVERLAY_* live in settings.py (ops/ reads them there too);
# the names stay importable from here.
from driver.settings import (DEFAULT_BLOCK_GRACE, DEFAULT_DEFAULT_POOL, DEFAULT_DNS_ADDR, DEFAULT_ETCD_PREFIX,  # noqa: F401
                       DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, DEFAULT_NAMES_TTL, DEFAULT_SOCKET, DEFAULT_STORE,
                       DEFAULT_VXLAN_PORT, env_on)
from driver.settings import DEFAULT_ENCRYPTED_VXLAN_PORT, DEFAULT_KEY_DIR, DEFAULT_KEY_ROTATION, DEFAULT_WIREGUARD_PORT
from driver.settings import env as _env


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=_env("STORE", DEFAULT_STORE),
                        help="sqlite:///path (single host, default %(default)s), etcd://h1:2379,h2:2379 "
                             "or zk://h1:2181,h2:2181[/root] (ZooKeeper; zks:// for TLS)")
    parser.add_argument("--etcd-prefix", default=_env("ETCD_PREFIX", DEFAULT_ETCD_PREFIX))
    parser.add_argument("--etcd-cacert", default=_env("ETCD_CACERT"))
    parser.add_argument("--etcd-cert", default=_env("ETCD_CERT"))
    parser.add_argument("--etcd-key", default=_env("ETCD_KEY"))
    # etcd authentication: a user whose role may touch only pyoverlay's prefix.
    # With zk:// the same two flags are a ZooKeeper digest user and password,
    # and --etcd-cacert/-cert/-key its TLS files.
    parser.add_argument("--etcd-user", default=_env("ETCD_USER"),
                        help="etcd user (etcd with authentication on), or ZooKeeper digest user; its password from --etcd-password")
    parser.add_argument("--etcd-password", default=_env("ETCD_PASSWORD"),
                        help="prefer PYOVERLAY_ETCD_PASSWORD: a flag shows in the process list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyoverlay", description="Multi-host VXLAN overlay network plugin for Docker")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the plugin in the foreground")
    serve.add_argument("--socket", default=_env("SOCKET", DEFAULT_SOCKET),
                       help="unix socket; its basename is the driver name (default %(default)s)")
    _add_store_flags(serve)
    serve.add_argument("--driver-name", default=_env("DRIVER_NAME"),
                       help="the name the engine calls this driver by (managed plugin: pyoverlay:latest); "
                            "default: the socket's basename")
    serve.add_argument("--advertise-addr", default=_env("ADVERTISE_ADDR"),
                       help="this host's underlay address (VTEP); default: the address of the default route's interface")
    serve.add_argument("--vxlan-port", type=int, default=int(_env("VXLAN_PORT", DEFAULT_VXLAN_PORT)))
    serve.add_argument("--default-pool", default=_env("DEFAULT_POOL", DEFAULT_DEFAULT_POOL),
                       help="range from which a /24 is taken for a network created without --subnet")
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", DEFAULT_LOG_LEVEL),
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default=_env("LOG_FORMAT", DEFAULT_LOG_FORMAT), choices=["text", "json"],
                       help="json: one JSON object per line")
    serve.add_argument("--docker-host", default=_env("DOCKER_HOST"),
                       help="the local engine, for cluster-wide network names (default: $DOCKER_HOST, "
                            "else unix:///var/run/docker.sock)")
    serve.add_argument("--catalog", action=argparse.BooleanOptionalAction,
                       default=env_on("CATALOG"),
                       help="share network names with every host: a network created on one appears on all "
                            "(through the engine's API; on unless --no-catalog or PYOVERLAY_CATALOG=0)")
    serve.add_argument("--metrics-addr", default=_env("METRICS_ADDR"),
                       help="HOST:PORT to serve Prometheus metrics on (default: no metrics)")
    # Per-host address blocks (driver/blocks.py).
    serve.add_argument("--block-grace", type=float, default=_env("BLOCK_GRACE", DEFAULT_BLOCK_GRACE),
                       help="seconds an empty address block stays with this host before it is given back "
                            "(default %(default)s)")
    # The endpoint sweep (driver/sweep.py).
    serve.add_argument("--sweep-grace", type=float, default=_env("SWEEP_GRACE", "60"),
                       help="seconds an endpoint no container of the engine has stays before it is removed "
                            "(left when the plugin was down as its container went; 0: never; default %(default)s)")
    _add_dns_flags(serve)
    _add_encryption_flags(serve)
    add_operator_commands(commands, _add_store_flags)
    _add_dns_config_command(commands)
    return parser


# -- the cluster resolver (issue 10) -----------------------------------------------

def _add_dns_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--dns", action=argparse.BooleanOptionalAction,
                       default=env_on("DNS"),
                       help="answer container names of every host on --dns-addr (on unless --no-dns or "
                            "PYOVERLAY_DNS=0; the engine needs `pyoverlay dns-config --write` once)")
    serve.add_argument("--dns-addr", default=_env("DNS_ADDR", DEFAULT_DNS_ADDR),
                       help="the resolver's address, port 53 UDP and TCP (default %(default)s)")
    serve.add_argument("--dns-upstream", default=_env("DNS_UPSTREAM"),
                       help="IP[:PORT],... to forward other names to (default: /etc/resolv.conf's servers, "
                            "read at start)")
    serve.add_argument("--names-ttl", type=int, default=int(_env("NAMES_TTL", DEFAULT_NAMES_TTL)),
                       help="seconds a dead host's container names outlive it (their lease; default %(default)s)")


# -- encrypted overlays (issue 17) -------------------------------------------------

def _add_encryption_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--key-rotation", type=float, default=_env("KEY_ROTATION", DEFAULT_KEY_ROTATION),
                       help="seconds between rotations of this host's key exchange key for -o encrypted=true "
                            "networks (default %(default)s, 12 hours)")
    serve.add_argument("--key-dir", default=_env("KEY_DIR", DEFAULT_KEY_DIR),
                       help="where this host keeps its private keys, readable by root only (default %(default)s)")
    serve.add_argument("--encrypted-vxlan-port", type=int,
                       default=int(_env("ENCRYPTED_VXLAN_PORT", DEFAULT_ENCRYPTED_VXLAN_PORT)),
                       help="UDP port of encrypted networks' VXLAN, inside the tunnel (default %(default)s; "
                            "the same on every host)")
    serve.add_argument("--wireguard-port", type=int, default=int(_env("WIREGUARD_PORT", DEFAULT_WIREGUARD_PORT)),
                       help="UDP port of the WireGuard tunnel between hosts (default %(default)s)")


def _encryption_flags_problem(args) -> str:
    if args.key_rotation < 1:
        return f"--key-rotation {args.key_rotation:g}: use 1 second or more (default 43200, 12 hours)"
    for flag, port in (("--encrypted-vxlan-port", args.encrypted_vxlan_port), ("--wireguard-port", args.wireguard_port)):
        if not 1 <= port <= 65535:
            return f"{flag} {port}: use 1 to 65535"
    if args.encrypted_vxlan_port in (args.vxlan_port, args.wireguard_port):
        return (f"--encrypted-vxlan-port {args.encrypted_vxlan_port} must differ from --vxlan-port and "
                "--wireguard-port")
    return ""


def _dns_flags_problem(args) -> str:
    try:
        ipaddress.IPv4Address(args.dns_addr)
    except ValueError:
        return f"--dns-addr {args.dns_addr!r} is not an IPv4 address (default {DEFAULT_DNS_ADDR})"
    try:
        if args.dns_upstream:
            parse_upstreams(args.dns_upstream)
    except ValueError as e:
        return str(e)
    if args.names_ttl < 2:
        return f"--names-ttl {args.names_ttl}: use 2 seconds or more"
    return ""


def _add_dns_config_command(commands) -> None:
    add_dns_config_parser(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, getattr(args, "log_level", "info").upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        use_json(level)
    if args.command == "serve":
        return _serve(args)
    if hasattr(args, "run"):
        return args.run(args)
    return 2


def _vtep_problem(vtep: str) -> str:
    """Why the underlay address cannot carry VXLAN here ("" if it can)."""
    try:
        address = ipaddress.ip_address(vtep)
    except ValueError:
        return f"--advertise-addr {vtep!r} is not an IP address; give this host's IPv4 underlay address"
    if address.version == 6:
        # VXLAN's overhead (hence the MTU), the FDB entries and the flood
        # lists are all IPv4 here: an IPv6 underlay is refused, not half-made.
        return (f"--advertise-addr {vtep} is IPv6: pyoverlay runs VXLAN over an IPv4 underlay only; give this "
                "host's IPv4 underlay address (containers can still have IPv6: docker network create --ipv6)")
    return ""


def _serve(args) -> int:
    # Not a circle: the operator commands need not load Flask and gunicorn.
    from .server import Config, serve

    vtep = args.advertise_addr or default_route_address()
    problem = _vtep_problem(vtep)
    if problem:
        print(f"pyoverlay: {problem}", file=sys.stderr)
        return 2
    if args.dns:
        problem = _dns_flags_problem(args)
        if problem:
            print(f"pyoverlay: {problem}", file=sys.stderr)
            return 2
    problem = _encryption_flags_problem(args)
    if problem:
        print(f"pyoverlay: {problem}", file=sys.stderr)
        return 2
    serve(Config(
        socket=args.socket, store=args.store, vtep=vtep, vxlan_port=args.vxlan_port,
        default_pool=args.default_pool, etcd_prefix=args.etcd_prefix, etcd_cacert=args.etcd_cacert,
        etcd_cert=args.etcd_cert, etcd_key=args.etcd_key, log_level=args.log_level,
        log_format=args.log_format, docker_host=args.docker_host, catalog=args.catalog,
        metrics_addr=args.metrics_addr, driver_name=args.driver_name,
        etcd_user=args.etcd_user, etcd_password=args.etcd_password,
        block_grace=args.block_grace, sweep_grace=args.sweep_grace,
        dns=args.dns, dns_addr=args.dns_addr, dns_upstream=args.dns_upstream, names_ttl=args.names_ttl,
        key_rotation=args.key_rotation, key_dir=args.key_dir, encrypted_vxlan_port=args.encrypted_vxlan_port,
        wireguard_port=args.wireguard_port,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
