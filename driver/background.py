"""A named daemon thread and the event that stops it: the shape of every
long-running job in the driver (the store watches, the engine event pump)."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from .store.follow import follow

log = logging.getLogger(__name__)


class Background:
    def __init__(self, name: str, run: Callable[[], None]):
        self.name = name
        self.stopping = threading.Event()  # run() returns soon after it is set
        self._run = run
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)


def store_watch(what: str, thread: str, store, prefix: str, on_snapshot, on_events,
                metrics=None, meanwhile: str = "") -> Background:
    """follow() prefix on a thread of its own. An error is logged (with what the
    watcher does meanwhile) and counted as metrics.watch_error(what, exc); the
    watch resumes by itself (driver/store/follow.py)."""
    def on_error(exc: Exception) -> None:
        log.warning("%s watch: %s (resuming%s)", what, exc, f"; {meanwhile}" if meanwhile else "")
        if metrics is not None:
            metrics.watch_error(what, exc)

    def run() -> None:
        follow(store, prefix, job.stopping, on_snapshot, on_events, on_error)

    job = Background(thread, run)
    return job
