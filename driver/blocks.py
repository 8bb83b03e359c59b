"""Per-host address blocks: what keeps hosts from racing for the same addresses.

A pool is cut into blocks (a /26 by default, see default_block_size). A host
claims a block with one create-if-absent and then hands out its addresses
itself; each address is still its own key, created only if absent, so blocks
only spread the writes and never decide who owns an address. When its blocks
are full a host claims another, starting from a point derived from its name
so hosts do not all try the same one; when no block is free it borrows a free
address from anyone's block.

The fast path reads nothing from the store: a host keeps each pool's blocks
(followed with a watch, store/follow.py: one event per block claim) and the
addresses it knows of in memory, so RequestAddress is one transaction. It
does not follow addresses/: every host would then process every other host's
every address, and that fan-out, not the claims, was what a burst from many
hosts spent its CPU on. Which addresses are taken it learns instead from one
read at start, from its own claims and releases, from a claim that fails
(someone holds that address: borrowed or --ip), and from reading its own
blocks' addresses now and then (refresh). Only the slow paths read more: a
pool with no free block is read whole before borrowing, and a dead host's
block is read before it is taken over or given back.

A sweeper gives back a block that stayed empty for the grace period, removes
empty blocks of hosts whose lease expired, and adopts unclaimed blocks holding
only this host's addresses (a store written before blocks existed).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import zlib
from collections import Counter
from typing import Callable, Iterable, Optional

from .errors import DriverError
from .model import Address, Block
from .state import ADDRESSES, BLOCKS, State, decode_address, decode_block
from .store.base import KeyValue, Store, StoreError
from .store.follow import follow

log = logging.getLogger(__name__)

#: Attempts at one RequestAddress (each failed compare-and-set teaches the cache something).
ATTEMPTS = 64
#: Seconds an empty block stays with its host before it is given back.
DEFAULT_GRACE = 120.0
#: A claim this process lost without the watch telling it the winner yet is
#: taken as in use for this long (the watch normally answers in milliseconds).
UNSURE_FOR = 10.0
#: Seconds between reads of this host's own blocks' addresses (others' --ip or
#: borrowed addresses in them, or released: the cache has no watch on them).
REFRESH_EVERY = 30.0
#: Seconds between looks for blocks of hosts whose lease expired.
REAP_EVERY = 10.0
#: A pool read whole for borrowing is good for this long.
BORROW_READ_FOR = 1.0
GATEWAY_HOLDER = ""  # the gateway belongs to the pool, not to a host


def default_block_size(subnet: ipaddress.IPv4Network) -> int:
    """64 addresses (a /26, Calico's default): one claim per 62 containers on
    a host, 1,024 blocks in a /16. A smaller pool still gets at least 16
    blocks (a /24: /28s), so 16 hosts each hold one before anyone borrows;
    never smaller than 4 addresses."""
    return min(30, max(26, subnet.prefixlen + 4))


def check_block_size(subnet: ipaddress.IPv4Network, value) -> int:
    low, high = subnet.prefixlen, 30
    try:
        size = int(str(value), 10)
    except ValueError:
        size = None
    if size is None or not low <= size <= high:
        raise DriverError(
            f"-o block_size={value} is not valid: the address block size is a prefix length from "
            f"{low} (the whole {subnet}) to {high} (4 addresses); leave it out for /{default_block_size(subnet)}"
        )
    return size


class _Pool:
    """One subnet as this host's cache knows it (offsets from its network address)."""

    def __init__(self, subnet: ipaddress.IPv4Network):
        self.net = subnet
        self.base = int(subnet.network_address)
        self.last = subnet.num_addresses - 1  # the broadcast address
        self.used: dict[int, str] = {}  # offset -> holder host (GATEWAY_HOLDER for the gateway)
        self.unsure: dict[int, float] = {}  # offset -> when a claim of ours on it failed
        self.pending: set[int] = set()  # offsets this process is claiming right now
        self.blocks: dict[int, list] = {}  # start offset -> [holder, mod_revision (0: ours, not seen yet), prefixlen]
        self.freed: dict[int, float] = {}  # offset -> when this host released it (a read begun before is stale there)
        self.read_whole = float("-inf")  # when the whole pool was last read (for borrowing)
        # One block claim at a time per host: callers that find the blocks full
        # together wait for one new block rather than each claiming one.
        self.claiming = threading.Lock()

    def usable(self, off: int) -> bool:
        return 0 < off < self.last or self.net.num_addresses <= 2

    def taken(self, off: int, now: float) -> bool:
        if off in self.pending:
            return True
        if off in self.used:
            return not (self.used[off] == "?" and now - self.unsure.get(off, now) > UNSURE_FOR)
        return False

    def span(self, start: int, prefixlen: int) -> range:
        return range(start, start + (1 << (32 - prefixlen)))

    def empty(self, start: int, prefixlen: int) -> bool:
        """No address in use but the gateway (the pool's, not a host's), none being claimed."""
        return not any(off in self.pending or self.used.get(off, GATEWAY_HOLDER) != GATEWAY_HOLDER
                       for off in self.span(start, prefixlen))

    def pick_own(self, host: str, now: float) -> Optional[int]:
        for start in sorted(self.blocks):
            holder, _, prefixlen = self.blocks[start]
            if holder != host:
                continue
            for off in self.span(start, prefixlen):
                if self.usable(off) and not self.taken(off, now):
                    self.pending.add(off)
                    return off
        return None

    def pick_any(self, first: int, now: float) -> Optional[int]:
        n = self.net.num_addresses
        for i in range(n):
            off = (first + i) % n
            if self.usable(off) and not self.taken(off, now):
                self.pending.add(off)
                return off
        return None

    def busy(self, prefixlen: int) -> Counter:
        shift = 32 - prefixlen
        return Counter(off >> shift for off in (*self.used, *self.pending))

    def free_block(self, prefixlen: int, first: int, host: str, alive: Optional[set]) -> Optional[tuple[int, int]]:
        """(start, mod_revision to compare) of a block to claim: an unclaimed
        empty one first, then an unclaimed one with room; with alive given,
        also an empty block of a host no longer alive."""
        count = 1 << (prefixlen - self.net.prefixlen)
        size = 1 << (32 - prefixlen)
        if not self.blocks:
            # The pool's first block is its lowest, as a single host (or Docker's
            # own IPAM) would hand out .2 first; hosts that lose that race learn
            # of the winner and move on to their own starting points.
            first = 0
        busy = self.busy(prefixlen)
        # Preferred: blocks no other host has addresses in (the gateway and this
        # host's own addresses do not count).
        shift = 32 - prefixlen
        foreign = Counter(off >> shift for off, holder in self.used.items() if holder not in (GATEWAY_HOLDER, host))
        roomy = None
        for i in range(count):
            j = (first + i) % count
            start = j * size
            block = self.blocks.get(start)
            if block is None:
                room = size - busy[j] - (j == 0) - (j == count - 1)
                if foreign[j] == 0 and room > 0:
                    return start, 0
                if roomy is None and room > 0:
                    roomy = (start, 0)
            elif alive is not None and block[0] not in alive and block[0] != host and block[1] > 0 \
                    and self.empty(start, prefixlen):
                return start, block[1]
        return roomy


class BlockAllocator:
    def __init__(
        self,
        store: Store,
        host: str,
        block_size: Callable[[ipaddress.IPv4Network], int],
        grace: float = DEFAULT_GRACE,
        metrics=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.state = State(store)
        self.host = host
        self.block_size = block_size
        self.grace = grace
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self._have = {ADDRESSES: threading.Event(), BLOCKS: threading.Event()}
        self._stop = threading.Event()
        self._started = False
        self._empty_since: dict[tuple[str, int], float] = {}
        self._learnt: dict[tuple[str, int], float] = {}  # own block -> when its addresses were last read
        self._reaped = float("-inf")
        self._first = zlib.crc32(host.encode())  # where this host starts looking
        # The revision of the first read of addresses/: every claim this process
        # makes comes after it (requests wait for that read).
        self.first_revision = 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=follow, name="ipam-blocks", daemon=True, args=(
            self.store, BLOCKS, self._stop,
            lambda kvs, rev: self._snapshot(BLOCKS, kvs, rev),
            lambda events: self._events(BLOCKS, events),
            lambda exc: self._watch_error(BLOCKS, exc),
        )).start()
        threading.Thread(target=self._first_read, name="ipam-addresses", daemon=True).start()
        threading.Thread(target=self._sweeper, name="ipam-sweeper", daemon=True).start()

    def _first_read(self) -> None:
        """Every pool's addresses, once (until it succeeds): the cache's start."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                kvs, revision = self.store.list(ADDRESSES)
            except StoreError as e:
                self._watch_error(ADDRESSES, e)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._snapshot(ADDRESSES, kvs, revision)
            return

    def stop(self) -> None:
        self._stop.set()

    def ready(self, timeout: float = 10.0) -> None:
        self.start()
        deadline = time.monotonic() + timeout
        for have in self._have.values():
            if not have.wait(max(0.0, deadline - time.monotonic())):
                raise DriverError(
                    f"pyoverlay's IPAM has not read the store's addresses yet ({self.store.url or 'store'} "
                    "not answering?); retry in a moment"
                )

    def _watch_error(self, prefix: str, exc: Exception) -> None:
        log.warning("following %s: %s", prefix, exc)
        if self.metrics is not None:
            self.metrics.watch_error("ipam-" + prefix[:-1], exc)

    # -- the cache, fed by the watches ---------------------------------------------

    def _pool(self, subnet: str) -> _Pool:
        pool = self._pools.get(subnet)
        if pool is None:
            pool = self._pools[subnet] = _Pool(ipaddress.ip_network(subnet))
        return pool

    def _apply(self, prefix: str, key: str, value: Optional[str], revision: int) -> None:
        entry = (decode_address if prefix == ADDRESSES else decode_block)(key, value)
        if entry is None:
            return  # not a record (skipped, logged once, counted by state.py)
        subnet, item, record = entry
        if ":" in subnet:
            return  # IPv6 pools are blocks6.py's (no blocks, no cache here)
        try:
            pool = self._pool(subnet)
            if prefix == ADDRESSES:
                off = int(ipaddress.ip_address(item)) - pool.base
                if record is None:
                    pool.used.pop(off, None)
                else:
                    pool.used[off] = GATEWAY_HOLDER if record.kind == "gateway" else record.host
                pool.unsure.pop(off, None)
            else:
                block = ipaddress.ip_network(item)
                start = int(block.network_address) - pool.base
                if record is None:
                    pool.blocks.pop(start, None)
                else:
                    pool.blocks[start] = [record.host, revision, block.prefixlen]
        except (ValueError, TypeError, KeyError) as e:  # a key naming no address of its subnet
            log.warning("ignoring %s in the store: %s", key, e)

    def _snapshot(self, prefix: str, kvs: list[KeyValue], revision: int = 0) -> None:
        """A whole read of addresses/ (at start) or blocks/ (the watch's lists)."""
        with self._lock:
            if prefix == ADDRESSES and not self.first_revision:
                self.first_revision = revision
            for pool in self._pools.values():
                if prefix == ADDRESSES:
                    pool.used.clear()
                    pool.unsure.clear()
                else:
                    pool.blocks.clear()
            for kv in kvs:
                self._apply(prefix, kv.key, kv.value, kv.mod_revision)
        self._have[prefix].set()

    def _events(self, prefix: str, events) -> None:
        with self._lock:
            for e in events:
                self._apply(prefix, e.key, e.value, e.revision)

    def released(self, subnet: str, ip: ipaddress.IPv4Address) -> None:
        """This host freed ip: usable again at once."""
        with self._lock:
            pool = self._pools.get(subnet)
            if pool is not None:
                off = int(ip) - pool.base
                pool.used.pop(off, None)
                pool.freed[off] = self.clock()

    def _learn(self, subnet: str, pool: _Pool, block: Optional[tuple[int, int]]) -> None:
        """Read the addresses of block ((start, prefixlen): a few short lists),
        or of the whole pool (None), and make the cache hold exactly those
        there; what this host claimed or freed while the read ran stays."""
        began = self.clock()
        span = None if block is None else pool.span(*block)
        with self._lock:
            before = set(pool.used) if span is None else {off for off in span if off in pool.used}
        if block is None:
            found = [(ip, record) for ip, record, _ in self.state.addresses(subnet)]
        else:
            found = [(ip, record) for ip, record, _ in self.state.addresses_in(subnet, str(self._cidr(pool, *block)))]
        with self._lock:
            if self._pools.get(subnet) is not pool:
                return  # forgotten meanwhile
            stored = {}
            for ip, record in found:
                off = int(ipaddress.ip_address(ip)) - pool.base
                if span is None or off in span:
                    stored[off] = GATEWAY_HOLDER if record.kind == "gateway" else record.host
            for off in before - stored.keys() - pool.pending:
                pool.used.pop(off, None)
                pool.unsure.pop(off, None)
            for off, holder in stored.items():
                if pool.freed.get(off, float("-inf")) < began:
                    pool.used[off] = holder
                    pool.unsure.pop(off, None)
            for off, when in list(pool.freed.items()):
                if when < began - 60:
                    del pool.freed[off]
            if span is None:
                pool.read_whole = began

    def forget(self, subnet: str) -> None:
        with self._lock:
            self._pools.pop(subnet, None)

    @staticmethod
    def _cidr(pool: _Pool, start: int, prefixlen: int) -> ipaddress.IPv4Network:
        return ipaddress.ip_network((pool.base + start, prefixlen))

    # -- allocation -------------------------------------------------------------

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.ipam_event(what)

    def allocate(self, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
        """A free address of subnet, claimed for this host."""
        self.ready()
        began = self.clock()
        key = str(subnet)
        prefixlen = self.block_size(subnet)
        for _ in range(ATTEMPTS):
            with self._lock:
                pool = self._pool(key)
                off = pool.pick_own(self.host, self.clock())
            borrowed = False
            if off is None:
                with pool.claiming:
                    with self._lock:
                        off = pool.pick_own(self.host, self.clock())
                    # Still full after waiting for another caller's claim: claim one.
                    claimed = self._claim_block(key, pool, prefixlen) if off is None else None
                if off is None and claimed is not None:
                    continue  # won (room now) or lost (the cache learnt of it): look again
            if off is None:
                with self._lock:
                    stale = self.clock() - pool.read_whole > BORROW_READ_FOR
                if stale:  # no block free: which addresses are free is only known from the store
                    self._learn(key, pool, None)
                with self._lock:
                    off = pool.pick_any(self._first % pool.net.num_addresses, self.clock())
                    full_since = pool.read_whole
                if off is None and full_since < began:  # "full" only from a read this call saw begin
                    self._learn(key, pool, None)
                    with self._lock:
                        off = pool.pick_any(self._first % pool.net.num_addresses, self.clock())
                if off is None:
                    raise DriverError(
                        f"no free address left in {subnet}; remove unused containers or use a larger --subnet"
                    )
                borrowed = True
            ip = subnet.network_address + off
            won = self.state.claim_address(key, str(ip), Address.container(self.host))
            with self._lock:
                pool.pending.discard(off)
                if won:
                    pool.used[off] = self.host
                elif off not in pool.used or pool.used[off] == "?":
                    pool.used[off] = "?"  # someone has it; the watch will say who
                    pool.unsure[off] = self.clock()
            if won:
                if borrowed:
                    self._count("borrow")
                return ip
            self._count("cas_retry")
        raise DriverError(f"too much contention for addresses of {subnet} in the store; retry")

    def _claim_block(self, subnet: str, pool: _Pool, prefixlen: int) -> Optional[bool]:
        """Claim a block: True if won, False if another host got there first,
        None if no block is free (or could be taken over)."""
        count = 1 << (prefixlen - pool.net.prefixlen)
        with self._lock:
            found = pool.free_block(prefixlen, self._first % count, self.host, None)
        if found is None:
            alive = self._alive()
            while True:
                with self._lock:
                    found = pool.free_block(prefixlen, self._first % count, self.host, alive)
                if found is None:
                    return None
                # A dead host's block looks empty to a cache that does not follow
                # its addresses: read them before taking it over.
                self._learn(subnet, pool, (found[0], prefixlen))
                with self._lock:
                    if pool.empty(found[0], prefixlen):
                        break
        start, rev = found
        block = ipaddress.ip_network((int(pool.net.network_address) + start, prefixlen))
        won = self.state.claim_block(subnet, str(block), Block(host=self.host, claimed=time.time()), rev)
        with self._lock:
            if won:
                current = pool.blocks.get(start)
                if current is None or current[0] != self.host:  # the watch may have told us first
                    pool.blocks[start] = [self.host, 0, prefixlen]
                # What the cache knows of others' addresses there may be old
                # (the first read): learn the block as it is now.
                stale = any(pool.used.get(off, self.host) not in (self.host, GATEWAY_HOLDER)
                            for off in pool.span(start, prefixlen))
            elif pool.blocks.get(start, [None, rev])[1] == rev:
                pool.blocks[start] = ["?", -1, prefixlen]  # the watch will name the winner
        if won and stale:
            self._learn(subnet, pool, (start, prefixlen))
        self._count("block_claim" if won else "cas_retry")
        if not won:
            self._catch_up(subnet, pool)
        if won:
            log.info("claimed address block %s%s", block, f" (taken over, rev {rev})" if rev else "")
        return won

    def _catch_up(self, subnet: str, pool: _Pool) -> None:
        """After a lost claim, read the pool's blocks: when many hosts claim at
        once (or this host is starved of CPU) the watch may lag by more blocks
        than a request has attempts. Only adds what is newer than the cache
        knows: a watch event still on its way may be older than this read."""
        found = self.state.blocks(subnet)
        with self._lock:
            for _, cidr, record, revision in found:  # keys state.py could not read are left out
                block = ipaddress.ip_network(cidr)
                start = int(block.network_address) - pool.base
                current = pool.blocks.get(start)
                if current is None or (current[1] < revision and current[1] != 0):
                    pool.blocks[start] = [record.host, revision, block.prefixlen]

    def _alive(self) -> set[str]:
        return {h.host for h in self.state.hosts().values()} | {self.host}

    # -- the sweeper ------------------------------------------------------------

    def _sweeper(self) -> None:
        interval = max(0.05, min(self.grace / 4, 5.0))
        while not self._stop.wait(interval):
            if not all(h.is_set() for h in self._have.values()):
                continue
            try:
                self.sweep()
            except (StoreError, DriverError) as e:
                log.warning("address blocks: %s", e)
            except Exception:
                log.exception("address blocks sweep")

    def sweep(self) -> None:
        now = self.clock()
        self._refresh(now)
        release, foreign = [], False
        with self._lock:
            for subnet, pool in self._pools.items():
                for start, (holder, rev, prefixlen) in list(pool.blocks.items()):
                    empty = pool.empty(start, prefixlen)
                    if holder != self.host:
                        foreign = foreign or (rev > 0 and holder != "?")
                        continue
                    mark = (subnet, start)
                    if not empty:
                        self._empty_since.pop(mark, None)
                    elif now - self._empty_since.setdefault(mark, now) >= self.grace and rev > 0:
                        del pool.blocks[start]  # no pick may land in it while it goes
                        release.append((subnet, pool, start, rev, prefixlen))
        for subnet, pool, start, rev, prefixlen in release:
            self._drop(subnet, pool, start, rev, prefixlen, restore=True)
            self._empty_since.pop((subnet, start), None)
        if foreign and now - self._reaped >= min(REAP_EVERY, self.grace):
            self._reaped = now
            self._reap()
        self._adopt()

    def _refresh(self, now: float) -> None:
        """Read this host's blocks' addresses: every REFRESH_EVERY (grace, if
        shorter), and soon after a claim there failed (someone's address the
        cache did not know)."""
        every = min(REFRESH_EVERY, self.grace)
        due = []
        with self._lock:
            for subnet, pool in self._pools.items():
                for start, (holder, _, prefixlen) in pool.blocks.items():
                    if holder != self.host:
                        continue
                    span = pool.span(start, prefixlen)
                    last = self._learnt.get((subnet, start), float("-inf"))
                    unsure = any(off in span and when > last for off, when in pool.unsure.items())
                    if unsure or now - last >= every:
                        due.append((subnet, pool, start, prefixlen))
        for subnet, pool, start, prefixlen in due:
            self._learnt[(subnet, start)] = now
            self._learn(subnet, pool, (start, prefixlen))

    def _drop(self, subnet: str, pool: _Pool, start: int, rev: int, prefixlen: int, restore: bool) -> None:
        block = ipaddress.ip_network((int(pool.net.network_address) + start, prefixlen))
        if self.state.release_block(subnet, str(block), rev):
            self._count("block_release")
            log.info("released empty address block %s", block)
        elif restore:
            with self._lock:  # it changed meanwhile: the watch has (or will have) the news
                pool.blocks.setdefault(start, [self.host, rev, prefixlen])

    def _reap(self) -> None:
        """Empty blocks of hosts whose lease expired go back to the pool (their
        addresses read first: the cache does not follow other hosts')."""
        alive = self._alive()
        dead = []
        with self._lock:
            for subnet, pool in self._pools.items():
                for start, (holder, rev, prefixlen) in pool.blocks.items():
                    if holder not in alive and holder != "?" and rev > 0:
                        dead.append((subnet, pool, start, rev, prefixlen))
        for subnet, pool, start, rev, prefixlen in dead:
            self._learn(subnet, pool, (start, prefixlen))
            with self._lock:
                empty = pool.empty(start, prefixlen)
            if empty:
                self._drop(subnet, pool, start, rev, prefixlen, restore=False)

    def _adopt(self) -> None:
        """Unclaimed blocks whose addresses are all this host's become its own:
        a store from before blocks (or a block lost while down) is taken over
        with every address kept."""
        wanted = []
        with self._lock:
            pools = list(self._pools.items())
        for subnet, pool in pools:
            with self._lock:  # the watch threads change pool.used: never iterate it unlocked
                mine = any(holder == self.host for holder in pool.used.values())
            if not mine:
                continue
            prefixlen = self.block_size(pool.net)
            shift = 32 - prefixlen
            with self._lock:
                claimed = {start >> shift for start, b in pool.blocks.items()}
                holders: dict[int, set] = {}
                for off, holder in pool.used.items():
                    if holder != GATEWAY_HOLDER:
                        holders.setdefault(off >> shift, set()).add(holder)
                for j, who in holders.items():
                    if j not in claimed and who == {self.host}:
                        wanted.append((subnet, pool, j << shift, prefixlen))
        for subnet, pool, start, prefixlen in wanted:
            block = ipaddress.ip_network((int(pool.net.network_address) + start, prefixlen))
            if self.state.claim_block(subnet, str(block), Block(host=self.host, claimed=time.time())):
                with self._lock:
                    pool.blocks.setdefault(start, [self.host, 0, prefixlen])
                self._count("block_adopt")
                log.info("adopted address block %s (it holds only this host's addresses)", block)

    # -- for status and tests ---------------------------------------------------

    def blocks_of(self, subnet: str) -> dict[str, tuple[str, int]]:
        """block -> (holder, addresses in use), as this host's cache has it."""
        with self._lock:
            pool = self._pools.get(subnet)
            if pool is None:
                return {}
            out = {}
            for start, (holder, _, prefixlen) in sorted(pool.blocks.items()):
                block = ipaddress.ip_network((int(pool.net.network_address) + start, prefixlen))
                out[str(block)] = (holder, sum(off in pool.used for off in pool.span(start, prefixlen)))
            return out


def blocks_in_use(block: ipaddress.IPv4Network, addresses: Iterable[str]) -> int:
    return sum(ipaddress.ip_address(a) in block for a in addresses)
