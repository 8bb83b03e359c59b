"""seen/<host>: when each host was last alive, kept after it is gone.

hosts/<host> lives under a lease, so a dead host leaves no trace; operators
still want to read "h3: down, last seen 10:42". One small write a minute
per host is the price.
"""

from __future__ import annotations

import logging
import threading
import time

from .model import LastSeen
from .state import State
from .store.base import Store, StoreError

log = logging.getLogger(__name__)

INTERVAL = 60.0


class LastSeenWriter:
    def __init__(self, store: Store, host: str, vtep: str, interval: float = INTERVAL, clock=time.time):
        self.state = State(store)
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
                self.state.put_last_seen(LastSeen(self.host, self.vtep, self.clock()))
                wait = self.interval
            except StoreError as exc:
                log.debug("last seen: %s", exc)  # membership already reports store trouble
                wait = min(self.interval, 5.0)
            self._stop.wait(wait)
