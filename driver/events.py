"""The local engine's events: one stream per process, fanned out.

    local engine -- docker events -->  EventPump  --> catalog (driver/catalog/)
                                                  --> name publisher (driver/namepub.py)

One thread owns the stream. It subscribes (Engine.events), tells every
subscriber the engine is up, which makes each one do a full pass (a resync:
events missed while the stream was down are in what the pass reads), then
hands each event to the subscribers that want it, in order. When the stream
ends it tells them the engine is down and reconnects with back-off.

Subscribers' callbacks run on the pump's thread and must only queue: the
work (engine calls, store writes) happens on each subscriber's own thread,
so a slow store behind one never holds up the other's events.

A network connect makes both subscribers inspect the container (the catalog
for the endpoint ID, the publisher for its names): EngineEvent.container()
does that inspect once, for whichever asks first, and hands the other the same
answer. Container inspect, never network inspect (Engine.endpoint_of says why).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional, Protocol

from .engine import Engine, EngineRefused, EngineUnavailable
from .store.base import StoreError

log = logging.getLogger(__name__)

#: Back-off between engine connection attempts.
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0


class EngineEvent:
    """One event of the engine's stream, as the docker API decodes it."""

    def __init__(self, raw: dict):
        self.raw = raw
        actor = raw.get("Actor") or {}
        self.type: str = raw.get("Type") or ""
        self.action: str = raw.get("Action") or raw.get("status") or ""
        self.actor_id: str = actor.get("ID") or raw.get("id") or ""
        self.attributes: dict = actor.get("Attributes") or {}
        self._lock = threading.Lock()
        self._inspected = False
        self._inspect: Optional[dict] = None

    @property
    def container_id(self) -> str:
        """The container the event is about: a network event's container attribute, or the actor."""
        if self.type == "network":
            return self.attributes.get("container") or ""
        return self.actor_id

    def container(self, engine: Engine) -> Optional[dict]:
        """That container's inspect (None: gone), asked of the engine once per event.
        A failed inspect is not kept: the next subscriber asks again."""
        with self._lock:
            if not self._inspected:
                self._inspect = engine.container(self.container_id) if self.container_id else None
                self._inspected = True
            return self._inspect


class Subscriber(Protocol):
    def wants(self, event: EngineEvent) -> bool: ...

    def engine_up(self) -> None:
        """The stream is open (again): make a full pass."""

    def engine_event(self, event: EngineEvent) -> None: ...

    def engine_down(self) -> None:
        """The stream ended; engine_up follows once it is open again."""


def attempt(step: Callable[[], Optional[bool]], who: str) -> bool:
    """A subscriber's step (a pass, one event) on its own thread: a store failure,
    an engine refusal or a lost engine means try again later (False); so does a
    bug, which must not end the subscriber for good. step's False means the same."""
    try:
        result = step()
        return True if result is None else result
    except StoreError as e:
        log.warning("%s: the store failed (%s); retrying", who, e)
    except EngineRefused as e:
        log.warning("%s: the engine refused (%s); retrying", who, e)
    except EngineUnavailable as e:
        # The pump sees the stream end too; a pass follows its reconnect.
        log.warning("%s: lost the engine (%s); retrying", who, e)
    except Exception:
        log.exception("%s: unexpected error; retrying", who)
    return False


class QueuedSubscriber:
    """A subscriber whose worker thread takes ("up" | "event" | "down", payload)
    from self._queue; EVENTS: the (type, action) pairs it follows."""

    EVENTS: frozenset[tuple[str, str]] = frozenset()
    _queue: "queue.Queue"

    def wants(self, event: EngineEvent) -> bool:
        return (event.type, event.action) in self.EVENTS

    def engine_up(self) -> None:
        self._queue.put(("up", None))

    def engine_event(self, event: EngineEvent) -> None:
        self._queue.put(("event", event))

    def engine_down(self) -> None:
        self._queue.put(("down", None))


class EventPump:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._subscribers: list[Subscriber] = []
        self._stop = threading.Event()
        self._stream = None
        self._lock = threading.Lock()  # guards _stream between the pump and stop()
        self._thread: Optional[threading.Thread] = None
        self.streams = 0  # streams opened (tests count them)

    def subscribe(self, subscriber: Subscriber) -> None:
        """Before start(): the list is read by the pump's thread without a lock."""
        self._subscribers.append(subscriber)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.engine.close()

    def _run(self) -> None:
        delay, reported = BACKOFF_MIN, None
        while not self._stop.is_set():
            try:
                stream = self.engine.events()
            except (EngineUnavailable, EngineRefused) as e:
                # Usual while the engine starts or restarts: say it once.
                (log.debug if reported == str(e) else log.warning)("engine events: %s; retrying", e)
                reported = str(e)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            with self._lock:
                self._stream = stream
            if self._stop.is_set():  # stop() came between the subscribe and the lock
                stream.close()
            delay, reported = BACKOFF_MIN, None
            self.streams += 1
            log.info("following the events of the engine at %s", self.engine.url)
            opened = time.monotonic()
            self._tell("engine_up")
            try:
                for raw in stream:
                    event = EngineEvent(raw)
                    for subscriber in self._subscribers:
                        if subscriber.wants(event):
                            subscriber.engine_event(event)
            except Exception:  # a bug in a subscriber must not end the pump for good
                log.exception("engine events: unexpected error; reconnecting")
            finally:
                with self._lock:
                    self._stream = None
                stream.close()
            if not self._stop.is_set():  # a stop is no outage: the subscribers stop too
                self._tell("engine_down")
                log.warning("engine events: the stream from %s ended; reconnecting", self.engine.url)
                if time.monotonic() - opened < BACKOFF_MIN:
                    self._stop.wait(BACKOFF_MIN)  # a stream that ends at once must not spin

    def _tell(self, what: str) -> None:
        for subscriber in self._subscribers:
            try:
                getattr(subscriber, what)()
            except Exception:
                log.exception("engine events: %s of %r raised", what, subscriber)
