"""The store interface every backend implements.

Keys are relative strings such as ``endpoints/<id>``; a backend may add its own
prefix (etcd: ``/pyoverlay/``). Values are strings (the callers store JSON).
Every write bumps one store-wide revision, as etcd does, so that a watcher can
resume exactly where it left off.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional


class StoreError(Exception):
    """The store could not answer. The message names the store and its address."""


class Compacted(StoreError):
    """A watch asked for history the store no longer keeps; re-list and resume."""

    def __init__(self, message: str, compact_revision: int):
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # "put" or "delete"
    key: str
    value: Optional[str]  # None for a delete
    revision: int


class Store(abc.ABC):
    #: Human-readable location, used in error messages ("etcd at http://...").
    url: str = ""

    @abc.abstractmethod
    def get(self, key: str) -> Optional[KeyValue]:
        ...

    @abc.abstractmethod
    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under prefix, sorted by key, and the store revision they were read at."""

    @abc.abstractmethod
    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Write unconditionally; returns the new revision."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove key; True if it existed."""

    @abc.abstractmethod
    def txn(
        self,
        compare: Mapping[str, int],
        put: Mapping[str, str] = {},
        delete: Iterable[str] = (),
        lease: int = 0,
    ) -> bool:
        """Atomically apply put and delete if every compared key is at the given
        mod_revision (0 means the key must not exist). False, and nothing
        changed, when a comparison fails."""

    @abc.abstractmethod
    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[list[Event]]:
        """Yield batches of events under prefix with revision >= start_revision,
        in revision order, until stop is set. Raises Compacted if
        start_revision is no longer kept, StoreError if the store is gone
        (callers resume from the last revision seen + 1)."""

    @abc.abstractmethod
    def grant_lease(self, ttl: int) -> int:
        """A lease id; keys put with it vanish ttl seconds after the last keepalive."""

    @abc.abstractmethod
    def keepalive(self, lease: int) -> bool:
        """Refresh the lease; False if it has already expired."""

    @abc.abstractmethod
    def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys."""

    def close(self) -> None:
        pass
