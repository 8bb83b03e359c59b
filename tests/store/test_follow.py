"""follow(): snapshot, events, and everything that must not stop it."""

from __future__ import annotations

import threading
import time

import pytest

from driver.store import StoreError
from driver.store import follow as follow_module
from driver.store.memory import MemoryStore

from .conftest import wait_until


def test_backoff_defaults():
    assert (follow_module.BACKOFF_MIN, follow_module.BACKOFF_MAX) == (0.1, 2.0)


def test_snapshot_then_events(store, followers):
    store.put("peers/1", "a")
    store.put("peers/2", "b")
    store.put("other/1", "x")
    f = followers(store, "peers/")
    f.wait_state({"peers/1": "a", "peers/2": "b"})
    (kvs, revision), = f.snapshots
    assert revision >= store.get("peers/2").mod_revision
    store.put("peers/3", "c")
    store.delete("peers/1")
    store.put("other/2", "y")
    store.put("peers/2", "B")
    f.wait_state({"peers/2": "B", "peers/3": "c"})
    assert all(e.key.startswith("peers/") for e in f.events)
    assert len(f.snapshots) == 1 and f.errors == []
    assert f.close() < 1.0


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_compaction_while_behind_takes_a_new_snapshot(store, followers):
    # The consumer is stuck in a callback while history it has not seen is compacted.
    gate, entered = threading.Event(), threading.Event()

    def slow(batch):
        entered.set()
        assert gate.wait(10)

    f = followers(store, "c/", on_events=slow)
    f.wait(lambda: f.snapshots, what="first snapshot")
    store.put("c/1", "a")
    assert entered.wait(5)
    store.put("c/2", "b")
    store.delete("c/1")
    store.compact(store.put("c/3", "c"))
    gate.set()
    f.wait(lambda: len(f.snapshots) == 2, what="a second snapshot")
    f.wait_state({"c/2": "b", "c/3": "c"})
    assert any(type(e).__name__ == "Compacted" for e in f.errors)


class FlakyStore(MemoryStore):
    """A memory store whose list and watch fail on demand, recording when they were called."""

    def __init__(self, list_failures=0, watch_failures=0, fail_after_each_batch=False):
        super().__init__()
        self.list_failures, self.watch_failures = list_failures, watch_failures
        self.fail_after_each_batch = fail_after_each_batch
        self.calls: list[tuple[str, float, int]] = []

    def list(self, prefix):
        self.calls.append(("list", time.monotonic(), 0))
        if self.list_failures:
            self.list_failures -= 1
            raise StoreError("flaky store: list failed")
        return super().list(prefix)

    def watch(self, prefix, start_revision, stop):
        self.calls.append(("watch", time.monotonic(), start_revision))
        if self.watch_failures:
            self.watch_failures -= 1
            raise StoreError("flaky store: watch failed")
        for batch in super().watch(prefix, start_revision, stop):
            yield batch
            if self.fail_after_each_batch:
                raise StoreError("flaky store: stream broke")


def _gaps(calls):
    return [round(b[1] - a[1], 3) for a, b in zip(calls, calls[1:])]


def test_backoff_doubles_to_the_cap_and_resets_after_success(monkeypatch, followers):
    monkeypatch.setattr(follow_module, "BACKOFF_MIN", 0.05)
    monkeypatch.setattr(follow_module, "BACKOFF_MAX", 0.2)
    store = FlakyStore(list_failures=6, watch_failures=2)
    store.put("k/1", "v")
    f = followers(store, "k/")
    f.wait_state({"k/1": "v"})
    wait_until(lambda: len([c for c in store.calls if c[0] == "watch"]) == 3, what="third watch")
    lists = [c for c in store.calls if c[0] == "list"]
    assert len(lists) == 7
    # Lower bounds show the doubling, upper bounds the cap (slack for a busy machine).
    gaps = _gaps(lists)
    for gap, want in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2, 0.2]):
        assert want * 0.9 <= gap < want + 0.1, gaps
    # The snapshot succeeded, so the watch failures start again from the minimum
    # (without the reset the first wait would be the 0.2 s cap).
    gaps = _gaps([c for c in store.calls if c[0] == "watch"])
    assert 0.045 <= gaps[0] < 0.15 and 0.09 <= gaps[1] < 0.2, gaps
    assert len(f.errors) == 8 and all(isinstance(e, StoreError) for e in f.errors)
    store.put("k/2", "w")
    f.wait_state({"k/1": "v", "k/2": "w"})


def test_resumes_after_each_broken_stream_without_losing_or_repeating(monkeypatch, followers):
    monkeypatch.setattr(follow_module, "BACKOFF_MIN", 0.005)
    store = FlakyStore(fail_after_each_batch=True)
    f = followers(store, "k/")
    f.wait(lambda: f.snapshots, what="snapshot")
    written = []
    for i in range(30):
        written.append(("put", f"k/{i % 7}", str(i), store.put(f"k/{i % 7}", str(i))))
        if i % 5 == 0:
            written.append(("delete", f"k/{i % 7}", None, store.list("")[1] + 1))
            store.delete(f"k/{i % 7}")
    expected = {kv.key: kv.value for kv in store.list("k/")[0]}
    f.wait_state(expected)
    got = [(e.kind, e.key, e.value, e.revision) for e in f.events]
    assert got == written  # every event once, in order, although every stream broke
    assert len(f.snapshots) == 1
    # Each resume asked for the revision after the last one delivered.
    starts = [c[2] for c in store.calls if c[0] == "watch"][1:]
    delivered = [b[-1].revision + 1 for b in f.batches]
    assert starts == delivered[: len(starts)]


class Boom(Exception):
    pass


def _run_follow(store, prefix, on_snapshot, on_events, on_error):
    stop = threading.Event()
    outcome = {}

    def run():
        try:
            follow_module.follow(store, prefix, stop, on_snapshot, on_events, on_error)
            outcome["returned"] = True
        except BaseException as e:
            outcome["raised"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return stop, t, outcome


def test_raising_callbacks_are_reported_and_followed_by_a_new_snapshot():
    store = MemoryStore()
    store.put("k/1", "v")
    errors, snapshots, batches = [], [], []
    fail = {"snapshot": 1, "events": 1}

    def on_snapshot(kvs, rev):
        if fail["snapshot"]:
            fail["snapshot"] -= 1
            raise Boom("snapshot")
        snapshots.append({kv.key: kv.value for kv in kvs})

    def on_events(batch):
        if fail["events"]:
            fail["events"] -= 1
            raise Boom("events")
        batches.append(batch)

    stop, t, outcome = _run_follow(store, "k/", on_snapshot, on_events, errors.append)
    try:
        wait_until(lambda: snapshots, what="a snapshot after the failed one")
        store.put("k/2", "w")  # on_events raises for this batch: a fresh snapshot carries it
        wait_until(lambda: len(snapshots) == 2, what="a snapshot after the failed batch")
        store.put("k/3", "x")
        wait_until(lambda: batches, what="the next batch")
    finally:
        stop.set()
        t.join(3)
    assert outcome == {"returned": True}
    assert [repr(e.__cause__) for e in errors] == ["Boom('snapshot')", "Boom('events')"]
    assert "on_snapshot raised" in str(errors[0]) and "on_events raised" in str(errors[1])
    assert snapshots == [{"k/1": "v"}, {"k/1": "v", "k/2": "w"}]
    assert [(e.key, e.value) for b in batches for e in b] == [("k/3", "x")]


class BrokenStore(MemoryStore):
    def list(self, prefix):
        raise RuntimeError("a bug, not a StoreError")


def test_never_raises_even_when_everything_does(monkeypatch):
    monkeypatch.setattr(follow_module, "BACKOFF_MAX", 0.05)
    calls = []

    def on_error(exc):
        calls.append(exc)
        raise Boom("on_error too")

    stop, t, outcome = _run_follow(BrokenStore(), "k/", None, None, on_error)
    wait_until(lambda: len(calls) >= 5, what="repeated attempts")
    assert t.is_alive()
    stop.set()
    t.join(3)
    assert outcome == {"returned": True}
    assert all(isinstance(e, RuntimeError) for e in calls)


def test_stop_ends_a_long_backoff_at_once(monkeypatch):
    monkeypatch.setattr(follow_module, "BACKOFF_MIN", 30.0)
    errors = []
    stop, t, outcome = _run_follow(BrokenStore(), "k/", None, None, errors.append)
    wait_until(lambda: errors, what="the first failure")
    began = time.monotonic()
    stop.set()
    t.join(3)
    assert time.monotonic() - began < 0.5
    assert outcome == {"returned": True}


def test_default_on_error_logs(caplog):
    stop, t, outcome = _run_follow(BrokenStore(), "k/", None, None, None)
    wait_until(lambda: any("a bug" in r.getMessage() for r in caplog.records), what="a log record")
    stop.set()
    t.join(3)
    assert outcome == {"returned": True}
