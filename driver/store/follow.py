"""follow(): keep a consumer in step with a prefix of the store, whatever happens.

List the prefix, hand the snapshot over, then watch from the next revision and
hand over each batch. A store error (etcd down, restarted, stalled) backs off
(0.1 s doubling to 2 s) and resumes the watch from the last revision seen + 1,
so no event is lost or repeated. A compaction means history is gone: list
again and hand over a fresh snapshot. A callback that raises may have left
the consumer half-updated, so that too is reported and followed by a fresh
snapshot after a back-off. Only `stop` ends the loop; it never raises.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from .base import Compacted, Event, KeyValue, Store

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0


class _CallbackFailed(Exception):
    pass


def follow(
    store: Store,
    prefix: str,
    stop: threading.Event,
    on_snapshot: Callable[[list[KeyValue], int], None],
    on_events: Callable[[list[Event]], None],
    on_error: Optional[Callable[[Exception], None]] = None,
) -> None:
    def report(exc: Exception) -> None:
        try:
            if on_error is not None:
                on_error(exc)
            else:
                log.warning("following %s%s: %s", store.url and store.url + " ", prefix, exc)
        except Exception:
            log.exception("on_error raised while reporting %r", exc)

    def deliver(callback, *args) -> None:
        try:
            callback(*args)
        except Exception as e:
            raise _CallbackFailed(f"{getattr(callback, '__name__', 'callback')} raised {e!r}") from e

    delay = BACKOFF_MIN
    nxt: Optional[int] = None  # next revision to watch from; None: take a snapshot first
    compacted = False
    while not stop.is_set():
        began = time.monotonic()
        progressed, was_compacted, compacted = False, compacted, False
        watch = None
        try:
            if nxt is None:
                kvs, revision = store.list(prefix)
                deliver(on_snapshot, kvs, revision)
                nxt, progressed = revision + 1, True
            watch = store.watch(prefix, nxt, stop)
            for batch in watch:
                if not batch:
                    continue
                deliver(on_events, batch)
                nxt, progressed = batch[-1].revision + 1, True
                delay = BACKOFF_MIN
            # The watch returns only once stop is set.
        except Compacted as e:
            report(e)
            nxt, compacted = None, True
            if progressed or not was_compacted:
                delay = BACKOFF_MIN
                continue  # re-list at once (the finally below still runs)
        except _CallbackFailed as e:
            report(e)
            nxt = None  # the consumer's state is suspect: start over from a snapshot
        except Exception as e:  # StoreError, a socket error, a bug in a backend
            report(e)
        finally:
            if watch is not None:
                watch.close()  # release its connection now, not at garbage collection
        if stop.is_set():
            break
        # A run that got somewhere, or lasted longer than the longest back-off,
        # was a success: the next failure starts with a short wait again.
        if progressed or time.monotonic() - began > BACKOFF_MAX:
            delay = BACKOFF_MIN
        stop.wait(delay)
        delay = min(delay * 2, BACKOFF_MAX)
