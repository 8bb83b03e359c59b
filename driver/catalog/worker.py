"""The catalog's two threads: the store watch (table.py) and the worker that
owns the engine calls. The worker makes a full pass after the engine's event
stream (re)opens, after every catalog change and every RESYNC seconds, and
handles each event as it comes. A store failure or an engine refusal ends in
a later pass; neither reaches the driver: no request ever waits on this."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

from ..engine import Engine
from ..events import QueuedSubscriber, attempt
from ..leftovers import Leftovers
from ..state import State
from .apply import Applier
from .table import DesiredTable

log = logging.getLogger("driver.catalog")

#: Seconds between full passes when nothing happens (missed events, lost writes).
RESYNC = 30.0
#: Back-off between failed passes.
BACKOFF_MIN = 0.2


class Catalog(QueuedSubscriber):
    #: The engine events the catalog follows (driver/events.py fans them out).
    EVENTS = frozenset(("network", action) for action in ("create", "destroy", "connect", "disconnect"))

    def __init__(self, state: State, engine: Engine, host: str, driver: str, metrics=None,
                 resync: float = RESYNC, leftovers: Optional[Leftovers] = None):
        self.engine = engine
        self.metrics = metrics
        self.resync = resync
        self._queue: queue.Queue = queue.Queue()
        self._dirty = threading.Event()  # a catalog change is queued: coalesces pokes
        self.table = DesiredTable(state, self._poke, metrics)
        self.applier = Applier(state, engine, host, driver, self.table, metrics, leftovers)
        self.leftovers = leftovers
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.synced = self.table.synced  # the first catalog snapshot is in
        self.connected = threading.Event()  # the engine's event stream is open

    @property
    def passes(self) -> int:
        """Full passes completed (tests wait on it)."""
        return self.applier.passes

    def start(self) -> None:
        for target, name in ((lambda: self.table.follow(self._stop), "catalog-watch"), (self._run, "catalog-engine")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(("stop", None))
        for thread in self._threads:
            thread.join(timeout=5)
        self.engine.close()

    def desired(self):
        return self.table.snapshot()

    def _poke(self) -> None:
        if not self._dirty.is_set():
            self._dirty.set()
            self._queue.put(("catalog", None))

    # -- the worker ---------------------------------------------------------------

    def _run(self) -> None:
        up, due, retry = False, 0.0, BACKOFF_MIN  # due: monotonic time of the next full pass
        while not self._stop.is_set():
            if up and self.synced.is_set() and time.monotonic() >= due:
                # Never before the first snapshot: an empty table would read as
                # "every network was deleted from the catalog".
                self._dirty.clear()
                ok = attempt(self.applier.run_pass, "catalog")
                due = time.monotonic() + (self.resync if ok else retry)
                retry = BACKOFF_MIN if ok else min(retry * 2, self.resync)
                if self.leftovers is not None and self.leftovers.next_due() is not None:
                    due = min(due, self.leftovers.next_due())
            wait = max(0.0, due - time.monotonic()) if up and self.synced.is_set() else 0.5
            try:
                kind, payload = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if kind == "stop":
                return
            if kind == "catalog":
                due = 0.0
            elif kind == "up":
                up, due, retry = True, 0.0, BACKOFF_MIN
                self._connected(True)
            elif kind == "down":
                up = False
                self._connected(False)
                log.warning("catalog: lost the engine (its event stream ended); waiting for it")
            elif up:
                if not attempt(lambda: self.applier.on_event(payload), "catalog"):
                    due = min(due, time.monotonic() + retry)  # a full pass sets it right
                elif self.applier.wants_pass:
                    due = 0.0
                self.applier.wants_pass = False

    def _connected(self, up: bool) -> None:
        (self.connected.set if up else self.connected.clear)()
        if self.metrics is not None:
            self.metrics.engine_connected(up)
