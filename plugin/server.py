"""The plugin process: gunicorn on the unix socket, and the driver wired up
inside the worker (netlink handles and store connections must never cross a
fork).

The socket is bound by the gunicorn master before anything can block, so the
engine never waits on a slow store (field notes 2 and 4); restoring the
kernel from the store runs in the background and retries until it succeeds.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from gunicorn.app.base import BaseApplication

from driver.catalog import Catalog
from driver.dataplane import Dataplane
from driver.dataplane.firewall import Firewall
from driver.dataplane.natrules import NatTable
from driver.engine import Engine
from driver.events import EventPump
from driver.gateway import GatewayMode
from driver.ipam import Ipam
from driver.lastseen import LastSeenWriter
from driver.leftovers import Leftovers
from driver.membership import Membership
from driver.network import NetworkDriver
from driver.peersync import PeerSync
from driver.state import State
from driver.store import open_store
from driver.defaults import DEFAULT_POOL, ENCRYPTED_VXLAN_PORT, KEY_ROTATION, VXLAN_PORT, WIREGUARD_PORT
from driver.encryption import Encryption
# The cluster resolver (not built with --no-dns).
from driver.dns.server import Resolver
from driver.dns.upstreams import parse_upstreams, upstreams_from_resolv_conf
from driver.dnslisteners import Listeners
from driver.namepub import NamePublisher
from driver.names import NameTable
from driver.sweep import EndpointSweep

from .app import create_app
from .metrics import Metrics
from driver.settings import DEFAULT_DNS_ADDR, DEFAULT_ETCD_PREFIX, DEFAULT_KEY_DIR

log = logging.getLogger("pyoverlay")

VERSION = "0.1.0"


@dataclass
class Config:
    socket: str
    store: str
    vtep: str  # this host's underlay address (--advertise-addr)
    vxlan_port: int = VXLAN_PORT
    default_pool: str = DEFAULT_POOL
    etcd_prefix: str = DEFAULT_ETCD_PREFIX
    etcd_cacert: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line
    docker_host: str | None = None  # the engine the catalog talks to (None: DOCKER_HOST, else the local socket)
    catalog: bool = True  # cluster-wide network names, through the engine's API
    metrics_addr: str | None = None  # HOST:PORT for Prometheus; None: no metrics
    driver_name: str | None = None  # as the engine knows it; None: the socket's basename
    etcd_user: str | None = None  # etcd authentication (with etcd_password)
    etcd_password: str | None = None
    block_grace: float = 120.0  # seconds an empty address block stays with this host
    # The cluster resolver (issue 10): names of every host's containers.
    dns: bool = True
    dns_addr: str = DEFAULT_DNS_ADDR
    dns_upstream: str | None = None  # "IP[:PORT],..."; None: the host's /etc/resolv.conf at start
    names_ttl: int = 10  # seconds a dead host's names outlive it (their lease)
    # The endpoint sweep (driver/sweep.py): endpoints the engine forgot while the plugin was down.
    sweep_grace: float = 60.0  # seconds; 0: no sweep
    # Encrypted overlays (issue 17, driver/encryption.py).
    key_rotation: float = float(KEY_ROTATION)
    key_dir: str = DEFAULT_KEY_DIR
    encrypted_vxlan_port: int = ENCRYPTED_VXLAN_PORT
    wireguard_port: int = WIREGUARD_PORT

    @property
    def name(self) -> str:
        """The driver name, as the engine knows it: a legacy plugin is called
        by its socket's basename, a managed one by its reference (pyoverlay:latest)."""
        if self.driver_name:
            return self.driver_name
        base = os.path.basename(self.socket)
        return base[: -len(".sock")] if base.endswith(".sock") else base


class Runtime:
    """Everything one worker process runs: the composition root."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics() if config.metrics_addr else None
        self.store = open_store(
            config.store, prefix=config.etcd_prefix,
            cacert=config.etcd_cacert, cert=config.etcd_cert, key=config.etcd_key,
            user=config.etcd_user, password=config.etcd_password,
        )
        if self.metrics is not None:
            self.store = self.metrics.wrap_store(self.store)
        vtep = config.vtep
        host = vtep  # the store knows a host by its underlay address
        self.dataplane = Dataplane(vtep=vtep, vxlan_port=config.vxlan_port,
                                   encrypted_port=config.encrypted_vxlan_port)
        self.encryption = Encryption(self.store, self.dataplane, host, vtep,
                                     key_file=os.path.join(config.key_dir, f"{host}.json"),
                                     rotation=config.key_rotation, port=config.wireguard_port)
        self.peers = PeerSync(self.store, self.dataplane, vtep=vtep, metrics=self.metrics)
        # Only peer hosts' VTEPs may send VXLAN here; peer sync keeps the set.
        self.firewall = Firewall(port=config.vxlan_port)
        self.peers.on_vteps = self.firewall.allow
        state = State(self.store)
        self._build_dns(config, host)
        self.network = NetworkDriver(state, self.dataplane, self.peers, host=host, vtep=vtep, name=config.name,
                                     dns=self.dns_listeners, encryption=self.encryption,
                                     gateway=GatewayMode(state, self.dataplane, NatTable(), host))
        self.ipam = Ipam(state, host, default_pool=config.default_pool, host_routes=self.dataplane.routes,
                         block_grace=config.block_grace, metrics=self.metrics)
        self.network.claims_from = self.ipam.claims_from  # restore never frees what this process just claimed
        self.network.release_unused = self.ipam.release_unused
        self.membership = Membership(self.store, host, vtep, VERSION)
        self.last_seen = LastSeenWriter(self.store, host, vtep)
        self.catalog = None
        if config.catalog:
            self.catalog = Catalog(state, Engine(config.docker_host), host, config.name, metrics=self.metrics,
                                   leftovers=Leftovers(state, host, self._forget_network, self.metrics))
        self._build_engine_events(config)
        self.restored = threading.Event()
        self.sweep = None
        if config.sweep_grace > 0:
            self.sweep = EndpointSweep(state, Engine(config.docker_host), host, self.network.delete_endpoint,
                                       self.ipam.release_address, self.ipam.release_unused,
                                       grace=config.sweep_grace,
                                       every=min(10.0, max(config.sweep_grace / 3, 1.0)))

    def _build_dns(self, config: Config, host: str) -> None:
        """The cluster resolver: a table of every host's names, this host's
        publisher, and the listeners (see driver/dnslisteners.py). None of it with --no-dns."""
        self.resolver = self.names = self.name_publisher = self.dns_listeners = None
        if not config.dns:
            return
        upstreams = (parse_upstreams(config.dns_upstream) if config.dns_upstream
                     else upstreams_from_resolv_conf(exclude=(config.dns_addr,)))
        self.names = NameTable(self.store, metrics=self.metrics)
        self.resolver = Resolver(self.names.lookup, upstreams, metrics=self.metrics)
        self.dns_listeners = Listeners(self.dataplane, self.resolver, config.dns_addr)
        self.name_publisher = NamePublisher(State(self.store), Engine(config.docker_host), host, ttl=config.names_ttl)

    def _dns_parts(self) -> list:
        """The cluster resolver's parts, in the order they start (stopped in reverse)."""
        return [] if self.resolver is None else [self.resolver, self.names, self.dns_listeners, self.name_publisher]

    def _build_engine_events(self, config: Config) -> None:
        """One engine event stream for the catalog and the name publisher (driver/events.py)."""
        subscribers = [s for s in (self.catalog, self.name_publisher) if s is not None]
        self.engine_events = EventPump(Engine(config.docker_host)) if subscribers else None
        for subscriber in subscribers:
            self.engine_events.subscribe(subscriber)

    def start(self) -> None:
        for part in self._dns_parts():  # before restore: it puts the overlays' listeners in place
            part.start()
        if self.metrics is not None:
            self.metrics.track_peers(self.peers.programmed)
            try:
                self.metrics.serve(self.config.metrics_addr)
            except OSError as exc:  # metrics are an extra: the driver runs without them
                log.error("metrics: cannot listen on %s (%s); running without metrics", self.config.metrics_addr, exc)
        self.firewall.install()  # before peer sync: it keeps the set a previous run left
        self.peers.start()
        self.encryption.start()  # before restore: the tunnel's peers follow the store from the first
        self.ipam.start()  # its watches fill the address cache before the first RequestAddress
        self.membership.start()
        self.last_seen.start()
        if self.catalog is not None:
            self.catalog.start()
        if self.engine_events is not None:
            self.engine_events.start()  # after its subscribers: they take its events from the first
        if self.sweep is not None:
            self.sweep.start()
        threading.Thread(target=self._restore, name="restore", daemon=True).start()

    def _forget_network(self, network_id: str, subnet: str) -> None:
        """What the engine left half done: its DeleteNetwork (if a network) and ReleasePool."""
        if network_id:
            self.network.delete_network(network_id)
        self.ipam.release_pool(subnet)

    def _restore(self) -> None:
        delay = 0.1
        while True:
            try:
                self.network.restore()
                self.restored.set()
                return
            except Exception as exc:  # store down or kernel busy: keep serving, retry
                log.warning("restore from store failed (%s); retrying in %.1fs", exc, delay)
                threading.Event().wait(delay)
                delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        if self.sweep is not None:
            self.sweep.stop()
        if self.engine_events is not None:
            self.engine_events.stop()
        for part in reversed(self._dns_parts()):
            part.stop()
        if self.catalog is not None:
            self.catalog.stop()
        self.last_seen.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.peers.stop()
        self.encryption.stop()
        self.ipam.close()
        self.firewall.close()
        self.membership.stop()
        self.dataplane.close()
        self.store.close()


class PluginServer(BaseApplication):
    def __init__(self, config: Config):
        self.config = config
        super().__init__()

    def load_config(self) -> None:
        settings = {
            "bind": f"unix:{self.config.socket}",
            # One process: state shared between requests lives in the store and
            # the kernel, and one peer watch per host is enough.
            "workers": 1,
            "worker_class": "gthread",
            "threads": 8,
            "umask": 0o177,  # socket 0600: only root may drive the network
            # gunicorn's own control socket ($HOME/.gunicorn) is not needed and
            # would be shared by every plugin process on a machine.
            "control_socket_disable": True,
            "timeout": 120,
            "graceful_timeout": 5,
            "loglevel": self.config.log_level,
            **({"logger_class": "plugin.logs.JsonGunicornLogger"} if self.config.log_format == "json" else {}),
            "post_worker_init": self._post_worker_init,
            "worker_exit": self._worker_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def _post_worker_init(self, worker) -> None:
        self.runtime.start()

    def _worker_exit(self, server, worker) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.stop()

    def load(self):
        self.runtime = Runtime(self.config)
        metrics = self.runtime.metrics
        return create_app(self.runtime.network, self.runtime.ipam, observe=metrics.observe if metrics else None)


def serve(config: Config) -> None:
    os.makedirs(os.path.dirname(config.socket) or ".", exist_ok=True)
    PluginServer(config).run()
