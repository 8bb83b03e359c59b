"""seen/<host>: when each host was last alive, kept after it is gone.

hosts/<host> lives under a lease, so a dead host leaves no trace; operators
still want to read "h3: down, last seen 10:42". One small write a minute
per host is the price.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .model import Record
from .state import seen_key
from .store.base import Store, StoreError

log = logging.getLogger(__name__)

INTERVAL = 60.0


@dataclass
class LastSeen(Record):
    host: str
    vtep: str
    at: float  # seconds since the epoch


class LastSeenWriter:
    def __init__(self, store: Store, host: str, vtep: str, interval: float = INTERVAL, clock=time.time):
        self.store = store
        self.host = host
        self.vtep = vtep
        self.interval = interval
        self.clock = clock
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="last-seen", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.put(seen_key(self.host), LastSeen(self.host, self.vtep, self.clock()).to_json())
                wait = self.interval
            except StoreError as exc:
                log.debug("last seen: %s", exc)  # membership already reports store trouble
                wait = min(self.interval, 5.0)
            self._stop.wait(wait)
