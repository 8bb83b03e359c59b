"""Where the cluster resolver listens on this host: one UDP+TCP pair in each
overlay namespace this host has (tagged with the overlay's VNI, so a query's
listener and source address name the querying endpoint), and one in the host
namespace on `lo` (tag None: containers on no pyoverlay network, which get
everything forwarded).

The driver tells it when an overlay namespace is made (create, restore) and
before one goes; addresses stay behind when the plugin stops, so a query then
meets a closed port (ICMP unreachable) and the engine moves on to its next
server at once rather than after a timeout.
"""

from __future__ import annotations

import logging
import threading

from .dataplane import dnsplane

log = logging.getLogger(__name__)

DEFAULT_ADDR = "169.254.53.53"


class Listeners:
    def __init__(self, dataplane, resolver, address: str = DEFAULT_ADDR, port: int = dnsplane.DNS_PORT):
        self.dataplane = dataplane
        self.resolver = resolver
        self.address = address
        self.port = port
        self._lock = threading.Lock()
        self._tags: set = set()

    def start(self) -> None:
        """The host namespace's listener. A failure is logged: the driver runs without it."""
        try:
            self.dataplane.add_local_address(self.address)
            self._listen(None, None)
        except Exception as e:
            log.error("dns: cannot listen on %s:%d in the host namespace (%s); containers on no pyoverlay "
                      "network will fall back to the engine's next dns server", self.address, self.port, e)

    def stop(self) -> None:
        with self._lock:
            tags, self._tags = set(self._tags), set()
        for tag in tags:
            self.resolver.remove_listener(tag)

    def network_added(self, vni: int, subnet: str) -> None:
        """The overlay namespace exists: its address and route (kernel errors
        raise: the network's creation is undone), then its listener."""
        self.dataplane.add_dns_address(vni, subnet, self.address)
        try:
            self._listen(vni, self.dataplane.netns_name(vni))
        except OSError as e:
            log.error("dns: cannot listen on %s:%d for VNI %d (%s); its containers will fall back to the "
                      "engine's next dns server", self.address, self.port, vni, e)

    def network_removed(self, vni: int) -> None:
        """Before the namespace goes: an open socket would keep it alive."""
        with self._lock:
            known = vni in self._tags
            self._tags.discard(vni)
        if known:
            self.resolver.remove_listener(vni)

    def tags(self) -> set:
        with self._lock:
            return set(self._tags)

    def _listen(self, tag, netns_path) -> None:
        with self._lock:
            if tag in self._tags:
                return
            udp, tcp = dnsplane.listen(netns_path, self.address, self.port)
            self._tags.add(tag)
        self.resolver.add_listener(tag, udp, tcp)
        log.info("dns: answering on %s:%d %s", self.address, self.port,
                 "in the host namespace" if tag is None else f"for VNI {tag}")
