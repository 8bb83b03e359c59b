"""Fixtures for the store tests: one conformance suite, three backends.

The etcd backend runs against a real etcd started once per session on free
loopback ports; each test gets its own key prefix in it, so tests never see
each other's keys (revisions, being store-wide, are never assumed contiguous).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from driver.store.etcd import EtcdStore
from driver.store.memory import MemoryStore
from driver.store.sqlite import SqliteStore
from tests.etcdserver import EtcdServer

BACKENDS = ["memory", "sqlite", "etcd"]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01, what: str = "condition"):
    """Poll predicate until it returns a true value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Watcher:
    """Runs store.watch in a thread and collects what it yields."""

    def __init__(self, store, prefix: str, start_revision: int):
        self.events, self.batches = [], []
        self.error = None
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(store, prefix, start_revision), daemon=True)
        self._thread.start()

    def _run(self, store, prefix, start_revision):
        try:
            for batch in store.watch(prefix, start_revision, self.stop):
                with self._cond:
                    self.batches.append(batch)
                    self.events.extend(batch)
                    self._cond.notify_all()
        except Exception as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.events) < n and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"watch delivered {len(self.events)} of {n} events in {timeout} s: {self.events}")
                self._cond.wait(left)
            if self.error is not None:
                raise self.error
            return list(self.events)

    def close(self, timeout: float = 3.0) -> float:
        """Stop the watch; returns how long it took to return."""
        began = time.monotonic()
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "watch did not return after stop was set"
        return time.monotonic() - began


@pytest.fixture(scope="session")
def etcd_server():
    server = EtcdServer()
    server.start()
    yield server
    server.close()


def etcd_store(server: EtcdServer, **kw) -> EtcdStore:
    kw.setdefault("prefix", f"/test-{uuid.uuid4().hex[:8]}/")
    return EtcdStore([server.endpoint], **kw)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def store(backend, request, tmp_path):
    if backend == "memory":
        s = MemoryStore()
    elif backend == "sqlite":
        s = SqliteStore(str(tmp_path / "state.db"))
    else:
        s = etcd_store(request.getfixturevalue("etcd_server"))
    yield s
    s.close()


@pytest.fixture
def watchers():
    """Watchers started by a test, all stopped at its end."""
    started = []

    def start(store, prefix, start_revision):
        w = Watcher(store, prefix, start_revision)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()
