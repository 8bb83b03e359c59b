"""Cluster-wide IPAM: pools keyed by subnet, addresses claimed atomically.

Every host's engine asks for the same pool when the same overlay is created
on it, so a pool is shared and held per host. An address is a key created
only if absent, so two hosts racing for one address never both get it.
Which free address a host tries comes from its address blocks (blocks.py;
for IPv6, its region of the pool, blocks6.py).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Callable, Iterable, Optional

from . import rules
from .blocks import DEFAULT_GRACE, BlockAllocator, default_block_size
from .blocks6 import V6Allocator
from .defaults import ADDRESS_SPACE, DEFAULT_POOL
from .errors import DriverError
from .rules import parse_ip, parse_subnet  # noqa: F401 (importable from here as before)
from .model import Address, Pool
from .state import State

log = logging.getLogger(__name__)

GATEWAY_REQUEST = "com.docker.network.gateway"
REQUEST_ADDRESS_TYPE = "RequestAddressType"


class Ipam:
    def __init__(
        self,
        state: State,
        host: str,
        default_pool: str = DEFAULT_POOL,
        default_prefixlen: int = 24,
        host_routes: Callable[[], Iterable[str]] = lambda: (),
        block_grace: float = DEFAULT_GRACE,
        metrics=None,
    ):
        self.state = state
        self.host = host
        self.default_pool = ipaddress.ip_network(default_pool)
        self.default_prefixlen = default_prefixlen
        self.host_routes = host_routes
        # Started on first use (or by start()): its watches feed the fast path.
        self.blocks = BlockAllocator(state.store, host, self.block_size, grace=block_grace, metrics=metrics)
        self.v6 = V6Allocator(state, host)
        self._sizes: dict[str, tuple[int, float]] = {}  # subnet -> (block prefix length, valid until)
        self._held: set[str] = set()  # pools this host's engine holds (checked once)

    def start(self) -> None:
        self.blocks.start()

    def close(self) -> None:
        self.blocks.stop()

    def block_size(self, subnet: ipaddress.IPv4Network) -> int:
        """The overlay's -o block_size, the same on every host; the default for
        the subnet while no overlay uses it yet (only the gateway is asked for
        before CreateNetwork, and it is not allocated from a block)."""
        key = str(subnet)
        size, until = self._sizes.get(key, (0, 0.0))
        if not size or time.monotonic() > until:
            claim = self.state.subnet_claim(key)
            overlay = self.state.overlay(claim.vni) if claim else None
            if overlay is None or overlay.subnet != key:
                # No overlay yet: the default, looked up again in a while.
                size, until = default_block_size(subnet), time.monotonic() + 5.0
            else:  # fixed for the overlay's life
                size, until = overlay.block_size or default_block_size(subnet), float("inf")
            self._sizes[key] = (size, until)
        return size

    @staticmethod
    def capabilities() -> dict:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    @staticmethod
    def default_address_spaces() -> dict:
        return {"LocalDefaultAddressSpace": ADDRESS_SPACE, "GlobalDefaultAddressSpace": ADDRESS_SPACE}

    # Pools

    def request_pool(self, address_space: str, pool: str, sub_pool: str, v6: bool) -> str:
        """Hold a pool for this host's engine; returns the subnet (also the PoolID)."""
        if address_space != ADDRESS_SPACE:
            raise DriverError(
                f"unknown address space {address_space!r}; pyoverlay's is {ADDRESS_SPACE!r}"
            )
        if sub_pool:
            raise DriverError("--ip-range is not supported by pyoverlay; leave it out")
        if v6 and not pool:
            raise DriverError("pyoverlay needs the IPv6 subnet given: pass an IPv6 --subnet such as fd00:20::/64 "
                              "with --ipv6 (docker network create --ipv6 --subnet <v4 cidr> --subnet <v6 cidr>)")
        if pool:
            subnet = parse_subnet(pool, v6=v6)
            self._check_overlap(subnet)
            self._hold(subnet)
            return str(subnet)
        return str(self._hold_free_subnet())

    def release_pool(self, pool_id: str) -> None:
        subnet = self._known_subnet(pool_id)
        if subnet is None:
            return
        self._held.discard(subnet)
        self._sizes.pop(subnet, None)

        def drop_host(current: Optional[Pool]) -> Optional[Pool]:
            if current is None:
                return None
            current.hosts = [h for h in current.hosts if h != self.host]
            return current if current.hosts else None

        if self.state.update_pool(subnet, drop_host) is None:
            # Last holder gone: its addresses (the gateway, any leftovers) and blocks go too.
            self.state.forget_pool_items(subnet)
            self.blocks.forget(subnet)
            self.v6.forget(subnet)

    def _hold(self, subnet: ipaddress.IPv4Network) -> None:
        def add_host(current: Optional[Pool]) -> Pool:
            current = current or Pool(subnet=str(subnet))
            if self.host in current.hosts:
                raise DriverError(
                    f"subnet {subnet} is already used by another pyoverlay network on this "
                    "host; use another --subnet or remove that network"
                )
            current.hosts.append(self.host)
            return current

        self.state.update_pool(str(subnet), add_host)

    def _pools(self) -> list[Pool]:
        return self.state.pools()

    def _check_overlap(self, subnet: ipaddress.IPv4Network) -> None:
        rules.check_overlap(subnet, (p.subnet for p in self._pools()))

    def _hold_free_subnet(self) -> ipaddress.IPv4Network:
        taken = [ipaddress.ip_network(p.subnet) for p in self._pools()]
        taken += [ipaddress.ip_network(r, strict=False) for r in self.host_routes()]
        for candidate in self.default_pool.subnets(new_prefix=self.default_prefixlen):
            if any(candidate.overlaps(t) for t in taken):
                continue
            if self.state.create_pool(Pool(str(candidate), [self.host])):
                return candidate
        raise DriverError(
            f"no free /{self.default_prefixlen} left in pyoverlay's default range "
            f"{self.default_pool}; pass --subnet explicitly"
        )

    def _known_subnet(self, pool_id: str) -> Optional[str]:
        try:
            return str(ipaddress.ip_network(pool_id, strict=True))
        except ValueError:
            return None

    def _pool(self, pool_id: str) -> tuple[Optional[Pool], ipaddress.IPv4Network]:
        subnet = self._known_subnet(pool_id)
        if subnet in self._held:  # held pools are only released by this host: no read needed
            return None, ipaddress.ip_network(subnet)
        pool = self.state.pool(subnet) if subnet else None
        if pool is None or self.host not in pool.hosts:
            raise DriverError(
                f"pool {pool_id!r} is not held by pyoverlay on this host; "
                "remove the network and create it again"
            )
        self._held.add(subnet)
        return pool, ipaddress.ip_network(subnet)

    # Addresses

    def claims_from(self) -> int:
        """A store revision no address claimed by this process is older than
        (restore's orphan release must leave newer ones alone)."""
        self.blocks.ready()
        return self.blocks.first_revision

    def request_address(self, pool_id: str, address: str, options: Optional[dict]) -> str:
        self.blocks.ready()  # every claim of this process after its first read (claims_from)
        pool, subnet = self._pool(pool_id)
        if (options or {}).get(REQUEST_ADDRESS_TYPE) == GATEWAY_REQUEST:
            ip = self._claim_gateway(pool, subnet, address)
        elif address:
            ip = self._claim(subnet, self._in_subnet(subnet, address))
        else:
            ip = self._claim_free(subnet)
        return f"{ip}/{subnet.prefixlen}"

    def release_address(self, pool_id: str, address: str) -> None:
        subnet = self._known_subnet(pool_id)
        if subnet is None:
            return
        try:
            ip = parse_ip(address, v6=True)
        except DriverError:
            return
        def release(current: Optional[Address]) -> Optional[Address]:
            # The gateway belongs to the pool, not to one host; another host's
            # address is never this engine's to free.
            if current is not None and (current.kind == "gateway" or current.host != self.host):
                return current
            return None

        if self.state.update_address(subnet, str(ip), release) is None:
            (self.v6 if ip.version == 6 else self.blocks).released(subnet, ip)

    def release_unused(self, subnet: str, ip: str, revision: int) -> bool:
        """Release a claim of this host if it is still at revision: the endpoint
        sweep's, for an address the engine no longer knows of (driver/sweep.py)."""
        if not self.state.release_address_if_unchanged(subnet, ip, revision):
            return False
        address = ipaddress.ip_address(ip)
        (self.v6 if address.version == 6 else self.blocks).released(subnet, address)
        return True

    def _in_subnet(self, subnet: ipaddress.IPv4Network, address: str) -> ipaddress.IPv4Address:
        return rules.usable_address(subnet, address)

    def _claim_gateway(self, pool: Pool, subnet, address: str) -> ipaddress.IPv4Address:
        wanted = self._in_subnet(subnet, address) if address else None

        def set_gateway(current: Optional[Pool]) -> Pool:
            if current is None or self.host not in current.hosts:
                raise DriverError(f"pool {subnet} was released meanwhile; create the network again")
            rules.check_gateway(subnet, wanted, current.gateway)
            current.gateway = current.gateway or str(wanted or rules.default_gateway(subnet))
            return current

        pool = self.state.update_pool(str(subnet), set_gateway)
        gateway = ipaddress.ip_address(pool.gateway)
        existing = self.state.address(str(subnet), pool.gateway)
        if existing is None:
            self.state.claim_address(str(subnet), pool.gateway, Address(kind="gateway", host=self.host))
            existing = self.state.address(str(subnet), pool.gateway)
        if existing is None:  # a record there that does not decode (logged by state.py)
            raise DriverError(f"the store holds an unreadable record for gateway {gateway} (see the plugin's "
                              "log); delete it there, or pass another --gateway")
        if existing.kind != "gateway":
            raise DriverError(
                f"gateway {gateway} is already used by a container on host {existing.host}; "
                "pass a free --gateway"
            )
        return gateway

    def _claim(self, subnet, ip: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        if self.state.claim_address(str(subnet), str(ip), Address.container(self.host)):
            return ip
        holder = self.state.address(str(subnet), str(ip))
        what = "the network's gateway" if holder and holder.kind == "gateway" else "already in use"
        where = f" (host {holder.host})" if holder and holder.kind != "gateway" else ""
        raise DriverError(f"address {ip} is {what}{where}; choose another --ip or leave it out")

    def _claim_free(self, subnet):
        return self.v6.allocate(subnet) if subnet.version == 6 else self.blocks.allocate(subnet)
