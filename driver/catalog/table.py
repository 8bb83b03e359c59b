"""The catalog as this host last saw it: a table of desired networks,
kept in step with catalog/ by a store watch. The watch thread only fills the
table and says it changed; it never calls the engine."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..model import NamedNetwork
from ..state import State

log = logging.getLogger(__name__)


class DesiredTable:
    def __init__(self, state: State, on_change: Callable[[], None], metrics=None):
        self.state = state
        self.on_change = on_change  # called after every change; must only queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._table: dict[str, tuple[NamedNetwork, int]] = {}  # name -> (entry, mod revision)
        self.synced = threading.Event()  # the first snapshot is in

    def follow(self, stop: threading.Event) -> None:
        """The watch thread's body: until stop."""
        self.state.follow_catalog(stop, self.load, self.change, self._on_error)

    def _on_error(self, exc: Exception) -> None:
        log.warning("catalog watch: %s (resuming)", exc)
        if self.metrics is not None:
            self.metrics.watch_error("catalog", exc)

    def load(self, table: dict[str, tuple[NamedNetwork, int]]) -> None:
        with self._lock:
            self._table = dict(table)
        self.synced.set()
        self.on_change()

    def change(self, changes: list[tuple[str, Optional[NamedNetwork], int]]) -> None:
        with self._lock:
            for name, entry, revision in changes:
                if entry is not None:
                    self._table[name] = (entry, revision)
                else:
                    self._table.pop(name, None)
        self.on_change()

    def snapshot(self) -> dict[str, NamedNetwork]:
        with self._lock:
            return {name: entry for name, (entry, _) in self._table.items()}

    def entry(self, name: str) -> Optional[NamedNetwork]:
        with self._lock:
            return self._table.get(name, (None, 0))[0]

    def withdrawn(self, name: str, revision: int) -> None:
        """This host deleted the entry at that revision: drop it now, not when
        the watch says so (a pass in between would create the network again)."""
        with self._lock:
            current = self._table.get(name)
            if current is not None and current[1] <= revision:
                del self._table[name]
