"""IPv6 addresses: one region of the pool per host, each address claimed on its own.

An IPv6 pool (usually a /64) holds far more addresses than a cluster will
ever use, so the IPv4 blocks' bookkeeping (claims, sweeps, take-overs,
borrowing, blocks.py) buys nothing there. Each host hands out addresses from
its own /112 (65,536 addresses): the one its name hashes to, lowest first. A
pool of a /112 or smaller is one region that every host shares.

Cluster-wide uniqueness does not rest on the regions: as for IPv4, every
address is its own key, created only if absent (state.claim_address), so two
hosts whose names hash to the same region (or two workers of one host) cost
each other a retry, never a duplicate. Nothing is written for a region: no
record to sweep or to leak.

The cache is the region's claimed addresses, read with one key list (IPv6
keys are exploded, state.ip_key: a /112's addresses share one prefix), then
kept from this process's claims and releases, a failed claim marking its
address taken, and read again after REFRESH_EVERY (another worker's releases).
"""

from __future__ import annotations

import ipaddress
import threading
import time
import zlib
from typing import Callable

from .errors import DriverError
from .model import Address
from .state import State

REGION = 112
#: Seconds a region's cache is used before it is read again.
REFRESH_EVERY = 30.0
ATTEMPTS = 64


class _Region:
    def __init__(self, subnet: ipaddress.IPv6Network, net: ipaddress.IPv6Network, used: set[int], read: float):
        self.net = net
        self.base = int(net.network_address)
        # Never handed out: the pool's first and last addresses (as usable_address),
        # nor a region's ::0 (legal, but read as a network's name).
        self.never = {int(subnet.network_address) - self.base, int(subnet.broadcast_address) - self.base, 0}
        self.used = used  # offsets from base
        self.pending: set[int] = set()
        self.read = read

    def pick(self) -> int | None:
        for off in range(self.net.num_addresses):
            if off not in self.used and off not in self.pending and off not in self.never:
                self.pending.add(off)
                return off
        return None


class V6Allocator:
    def __init__(self, state: State, host: str, clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.host = host
        self.clock = clock
        self._lock = threading.Lock()
        self._regions: dict[str, _Region] = {}

    def region(self, subnet: ipaddress.IPv6Network) -> ipaddress.IPv6Network:
        """This host's part of subnet."""
        if subnet.prefixlen >= REGION:
            return subnet
        index = zlib.crc32(self.host.encode()) % (1 << (REGION - subnet.prefixlen))
        return ipaddress.ip_network((int(subnet.network_address) + (index << (128 - REGION)), REGION))

    def _cached(self, subnet: ipaddress.IPv6Network) -> _Region:
        key = str(subnet)
        with self._lock:
            region = self._regions.get(key)
            if region is not None and self.clock() - region.read < REFRESH_EVERY:
                return region
        began = self.clock()
        net = self.region(subnet)
        used = {int(ipaddress.ip_address(ip)) - int(net.network_address)
                for ip, _, _ in self.state.addresses_in(key, str(net))}
        with self._lock:
            old = self._regions.get(key)
            fresh = _Region(subnet, net, used, began)
            if old is not None:
                fresh.pending = old.pending  # claims under way keep their offsets
            self._regions[key] = fresh
            return fresh

    def allocate(self, subnet: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
        """A free address of subnet, claimed for this host."""
        region = self._cached(subnet)
        for _ in range(ATTEMPTS):
            with self._lock:
                off = region.pick()
            if off is None:
                raise DriverError(
                    f"no free address left in {region.net}, this host's part of {subnet}; remove unused "
                    "containers" + ("" if region.net == subnet else " or use another IPv6 --subnet")
                )
            ip = ipaddress.ip_address(region.base + off)
            won = self.state.claim_address(str(subnet), str(ip), Address.container(self.host))
            with self._lock:
                region.pending.discard(off)
                region.used.add(off)  # ours now, or someone else's: taken either way
            if won:
                return ip
        raise DriverError(f"too much contention for addresses of {subnet} in the store; retry")

    def released(self, subnet: str, ip: ipaddress.IPv6Address) -> None:
        """This host freed ip: usable again at once."""
        with self._lock:
            region = self._regions.get(subnet)
            if region is not None and ip in region.net:
                region.used.discard(int(ip) - region.base)

    def forget(self, subnet: str) -> None:
        with self._lock:
            self._regions.pop(subnet, None)
