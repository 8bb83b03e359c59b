"""An in-process store for unit tests: the same semantics as etcd, no server.

Thread-safe behind one lock; watchers wait on a Condition. Leases expire on a
monotonic clock: any call (and every waiting watcher) sweeps expired leases,
deleting their keys with delete events, so nothing needs a background thread.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from typing import Iterable, Iterator, Mapping, Optional

from .base import Compacted, Event, KeyValue, Store, StoreError

#: Events kept for watchers that fall behind; older ones are compacted away.
DEFAULT_HISTORY = 10000


def prefix_end(prefix: str) -> Optional[str]:
    """The smallest string above every string that starts with prefix (None: no bound)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


def check_txn(put: Mapping[str, str], delete: Iterable[str]) -> list[str]:
    """etcd rejects a txn that names a key twice; every backend does the same."""
    delete = list(delete)
    both = set(put) & set(delete)
    if both or len(set(delete)) != len(delete):
        raise ValueError(f"txn names a key more than once: {sorted(both) or delete}")
    return delete


class MemoryStore(Store):
    def __init__(self, history: int = DEFAULT_HISTORY, clock=time.monotonic):
        self.url = "memory store"
        self._history = history
        self._clock = clock
        self._cond = threading.Condition()
        self._kv: dict[str, KeyValue] = {}
        self._rev = 1  # etcd's empty store is at revision 1
        self._events: list[Event] = []  # sorted by revision
        self._compact_rev = 0  # watches from below this raise Compacted
        self._leases: dict[int, list] = {}  # id -> [ttl, deadline]
        self._lease_ids = itertools.count(1)

    # Internals; all run with self._cond held.

    def _commit(self, events: list[Event]) -> None:
        self._events.extend(events)
        if len(self._events) > self._history:
            # Drop whole revisions only, so a kept revision is never partial.
            cut = self._events[len(self._events) - self._history].revision
            self._drop_before(cut)
        self._cond.notify_all()

    def _drop_before(self, revision: int) -> None:
        i = bisect.bisect_left(self._events, revision, key=lambda e: e.revision)
        del self._events[:i]
        self._compact_rev = max(self._compact_rev, revision)

    def _expire(self) -> None:
        now = self._clock()
        for lease in [i for i, (_, deadline) in self._leases.items() if deadline <= now]:
            self._drop_lease(lease)

    def _drop_lease(self, lease: int) -> None:
        del self._leases[lease]
        keys = sorted(k for k, kv in self._kv.items() if kv.lease == lease)
        if keys:
            # As in etcd, all keys of one lease go in one revision.
            self._rev += 1
            for k in keys:
                del self._kv[k]
            self._commit([Event("delete", k, None, self._rev) for k in keys])

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self._leases:
            raise StoreError(f"{self.url}: lease {lease} not found (expired or revoked)")

    # The interface.

    def get(self, key: str) -> Optional[KeyValue]:
        with self._cond:
            self._expire()
            return self._kv.get(key)

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        with self._cond:
            self._expire()
            kvs = [kv for k, kv in self._kv.items() if k.startswith(prefix)]
            return sorted(kvs, key=lambda kv: kv.key), self._rev

    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._cond:
            self._expire()
            self._check_lease(lease)
            self._rev += 1
            self._kv[key] = KeyValue(key, value, self._rev, lease)
            self._commit([Event("put", key, value, self._rev)])
            return self._rev

    def delete(self, key: str) -> bool:
        with self._cond:
            self._expire()
            if key not in self._kv:
                return False
            self._rev += 1
            del self._kv[key]
            self._commit([Event("delete", key, None, self._rev)])
            return True

    def txn(
        self,
        compare: Mapping[str, int],
        put: Mapping[str, str] = {},
        delete: Iterable[str] = (),
        lease: int = 0,
    ) -> bool:
        delete = check_txn(put, delete)
        with self._cond:
            self._expire()
            for key, rev in compare.items():
                kv = self._kv.get(key)
                if (kv.mod_revision if kv else 0) != rev:
                    return False
            if put:
                self._check_lease(lease)
            gone = [k for k in delete if k in self._kv]
            if not put and not gone:
                return True
            rev = self._rev + 1
            events = []
            for key, value in put.items():
                self._kv[key] = KeyValue(key, value, rev, lease)
                events.append(Event("put", key, value, rev))
            for key in gone:
                del self._kv[key]
                events.append(Event("delete", key, None, rev))
            self._rev = rev
            self._commit(events)
            return True

    def watch(self, prefix: str, start_revision: int, stop: threading.Event) -> Iterator[list[Event]]:
        with self._cond:
            nxt = start_revision if start_revision > 0 else self._rev + 1
        while not stop.is_set():
            with self._cond:
                self._expire()
                if nxt < self._compact_rev:
                    raise Compacted(
                        f"{self.url}: revision {nxt} is compacted (oldest kept {self._compact_rev})",
                        self._compact_rev,
                    )
                batch = []
                if nxt <= self._rev:
                    i = bisect.bisect_left(self._events, nxt, key=lambda e: e.revision)
                    batch = [e for e in self._events[i:] if e.key.startswith(prefix)]
                    nxt = self._rev + 1
                if not batch:
                    # Wake for a write, a lease deadline, or to notice stop.
                    timeout = 0.05
                    if self._leases:
                        soonest = min(d for _, d in self._leases.values())
                        timeout = max(0.0, min(timeout, soonest - self._clock()))
                    self._cond.wait(timeout)
                    continue
            yield batch

    def grant_lease(self, ttl: int) -> int:
        with self._cond:
            lease = next(self._lease_ids)
            self._leases[lease] = [ttl, self._clock() + ttl]
            return lease

    def keepalive(self, lease: int) -> bool:
        with self._cond:
            self._expire()
            entry = self._leases.get(lease)
            if entry is None:
                return False
            entry[1] = self._clock() + entry[0]
            return True

    def revoke(self, lease: int) -> None:
        with self._cond:
            self._expire()
            if lease in self._leases:
                self._drop_lease(lease)

    # Not in the interface: lets tests exercise Compacted as with etcd.

    def compact(self, revision: int) -> None:
        """Forget the history below revision, as etcd's compaction does."""
        with self._cond:
            if revision > self._rev:
                raise ValueError(f"cannot compact to future revision {revision} (current {self._rev})")
            self._drop_before(revision)
