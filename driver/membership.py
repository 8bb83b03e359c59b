"""This host's record in the store, kept under a lease so that others (and
operators) see which hosts are alive."""

from __future__ import annotations

import logging
import threading
import time

from .model import Host
from .state import State
from .store.base import Store, StoreError

log = logging.getLogger(__name__)


class Membership:
    def __init__(self, store: Store, host: str, vtep: str, version: str, ttl: int = 10):
        self.store = store
        self.record = Host(host=host, vtep=vtep, started=time.time(), version=version)
        self.ttl = ttl
        self._stop = threading.Event()
        self._lease = 0

    def start(self) -> None:
        threading.Thread(target=self._run, name="membership", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._lease:
            try:
                self.store.revoke(self._lease)
            except StoreError:
                pass  # it expires by itself

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._lease or not self.store.keepalive(self._lease):
                    self._lease = self.store.grant_lease(self.ttl)
                    State(self.store).put_host(self.record, self._lease)
            except StoreError as exc:
                self._lease = 0
                log.warning("host record: %s", exc)
            self._stop.wait(self.ttl / 3)
