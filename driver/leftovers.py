"""What the store holds for this host that its engine does not have.

An engine that stops in the middle of `docker network create` or of its
rollback (the plugin said yes to CreateNetwork, or the ReleasePool never
came) leaves a network record, a joined overlay or a pool hold behind, and
the same subnet could never be created here again. These are the driver's
and the IPAM's own records, forgotten through their own operations
(DeleteNetwork, ReleasePool: the forget callback); the catalog calls sweep()
on every pass because it is the one part that reads the engine's networks
(restore never talks to the engine: the engine may be waiting on us).

A leftover must stay one for PHANTOM_GRACE (a create in flight holds the pool
before CreateNetwork, for milliseconds), and the engine must hold at least
one of this host's networks, or it may not be the engine that uses this plugin.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional

from .model import Network, Pool
from .state import State

log = logging.getLogger(__name__)

#: Seconds a network must be in the store and not in the engine before it is forgotten.
PHANTOM_GRACE = 5.0

Summary = tuple[str, str, str, tuple[str, ...]]  # an engine network: (id, name, driver, subnets)


def find(mine: Iterable[Network], pools: Iterable[Pool], summaries: Iterable[Summary]) -> dict[tuple[str, str], str]:
    """(network ID or "", subnet) -> what it is, for this host's networks and pool
    holds the engine has no network for. mine, pools: this host's."""
    mine = {n.network_id: n for n in mine}
    summaries = list(summaries)
    # Every engine network counts here, whatever its driver's name.
    engine_ids = {network_id for network_id, _, _, _ in summaries}
    engine_subnets = {subnet for _, _, _, subnets in summaries for subnet in subnets}
    found: dict[tuple[str, str], str] = {}
    if not set(mine) & engine_ids:
        return found
    for network_id in set(mine) - engine_ids:
        found[(network_id, mine[network_id].subnet)] = f"network {network_id[:12]}"
    used = {n.subnet for n in mine.values()} | engine_subnets
    for pool in pools:
        if pool.subnet not in used:
            found[("", pool.subnet)] = "the hold on the pool"
    return found


class Leftovers:
    def __init__(self, state: State, host: str, forget: Callable[[str, str], None], metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.host = host
        self.forget = forget  # forget(network_id or "", subnet): the driver's DeleteNetwork + ReleasePool
        self.metrics = metrics
        self.clock = clock
        self._seen: dict[tuple[str, str], float] = {}  # leftover -> when first seen

    def next_due(self) -> Optional[float]:
        """When (clock time) the oldest leftover's grace ends; None: none waits."""
        return min(self._seen.values()) + PHANTOM_GRACE if self._seen else None

    def sweep(self, summaries: list[Summary], in_engine: Callable[[str], bool]) -> None:
        """summaries: every engine network; in_engine(network_id): asked again just before forgetting."""
        now = self.clock()
        found = find(self.state.networks(host=self.host), [p for p in self.state.pools() if self.host in p.hosts], summaries)
        self._seen = {k: t for k, t in self._seen.items() if k in found}
        for (network_id, subnet), what in sorted(found.items()):
            first = self._seen.setdefault((network_id, subnet), now)
            if now - first < PHANTOM_GRACE or (network_id and in_engine(network_id)):
                continue
            try:
                self.forget(network_id, subnet)
            except Exception as e:  # the kernel or the store: try again next pass
                log.warning("catalog: could not forget %s on %s: %s", what, subnet, e)
                continue
            del self._seen[(network_id, subnet)]
            log.warning("catalog: forgot %s on %s: the store had it for this host, the engine does not "
                        "(the engine stopped in the middle of a create or remove?)", what, subnet)
            if self.metrics is not None:
                self.metrics.catalog_action("forgotten")
