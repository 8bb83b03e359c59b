"""Where pyoverlay keeps its state: open_store(url) picks the backend.

    memory://                       in-process, for tests
    sqlite:///var/lib/pyoverlay/state.db   one host (the default)
    etcd://h1:2379,h2:2379          shared by every host (https with cacert, or etcds://)
    zk://h1:2181,h2:2181[/root]     shared by every host, in ZooKeeper (TLS: zks:// or cacert)
"""

from __future__ import annotations

import os
from typing import Optional

from .base import Compacted, Event, KeyValue, Store, StoreError

__all__ = ["open_store", "Store", "KeyValue", "Event", "StoreError", "Compacted"]

ACCEPTED = (
    "memory://, sqlite:///absolute/path/state.db, "
    "etcd://host:2379[,host2:2379...] or etcds://host:2379[,...] (TLS), "
    "zk://host:2181[,host2:2181...][/root] or zks://host:2281[,...][/root] (ZooKeeper, TLS)"
)


def _host_ports(hosts: str, what: str, default_port: int) -> list[str]:
    """"a:1,[v6]:2,b" -> ["a:1", "[v6]:2", "b:<default_port>"]; what names the
    address in messages ("etcd endpoint", "ZooKeeper address")."""
    found = []
    for host in hosts.split(","):
        host = host.strip()
        if not host:
            continue
        if host.startswith("["):  # [v6]:port
            addr, _, port = host[1:].partition("]")
            port, host = port.lstrip(":"), f"[{addr}]"
        elif host.count(":") == 1:
            host, port = host.split(":")
        elif ":" in host:
            raise ValueError(f"write an IPv6 {what} in brackets: [{host}]:{default_port}")
        else:
            port = ""
        if port and not port.isdigit():
            raise ValueError(f"bad port in {what} {host}:{port}; accepted forms: {ACCEPTED}")
        found.append(f"{host}:{port or default_port}")
    if not found:
        raise ValueError(f"{what.split()[0]} store URL names no host; accepted forms: {ACCEPTED}")
    return found


def _zk_hosts(hosts: str) -> list[str]:
    return _host_ports(hosts, "ZooKeeper address", 2181)


def _etcd_endpoints(hosts: str, scheme: str) -> list[str]:
    return [f"{scheme}://{hp}" for hp in _host_ports(hosts, "etcd endpoint", 2379)]


def open_store(
    url: str,
    *,
    prefix: str = "/pyoverlay/",
    cacert: Optional[str] = None,
    cert: Optional[str] = None,
    key: Optional[str] = None,
    user: Optional[str] = None,
    password: Optional[str] = None,
) -> Store:
    """The store at url. prefix is the key prefix in a shared etcd (the other
    backends hold only pyoverlay's keys and ignore it); user and password log
    in to an etcd with authentication on."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"store URL {url!r} has no scheme; accepted forms: {ACCEPTED}")
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        path = rest.split("?", 1)[0]
        if not path.startswith("/"):
            raise ValueError(f"sqlite store needs an absolute path (sqlite:///dir/state.db), got {url!r}")
        from .sqlite import SqliteStore

        return SqliteStore(os.path.normpath(path))
    if scheme in ("etcd", "etcds"):
        from .etcd import EtcdStore

        tls = scheme == "etcds" or bool(cacert or cert)
        hosts = rest.split("/", 1)[0]
        return EtcdStore(
            _etcd_endpoints(hosts, "https" if tls else "http"),
            prefix=prefix, cacert=cacert, cert=cert, key=key, user=user, password=password,
        )
    if scheme in ("zk", "zks"):
        from .zookeeper import ZooKeeperStore

        hosts, slash, root = rest.split("?", 1)[0].partition("/")
        root = "/" + root.strip("/") if slash and root.strip("/") else "/pyoverlay"
        if "//" in root:
            raise ValueError(f"ZooKeeper root {root!r} in {url!r} has an empty part; accepted forms: {ACCEPTED}")
        return ZooKeeperStore(
            _zk_hosts(hosts), root, tls=scheme == "zks", cacert=cacert, cert=cert, key=key,
            user=user, password=password,
        )
    raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r}; accepted forms: {ACCEPTED}")
