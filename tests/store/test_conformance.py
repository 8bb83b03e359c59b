"""One suite, every backend: memory, sqlite and a real etcd must agree."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from driver.store import Compacted, Event, KeyValue, StoreError

from .conftest import wait_until


def test_get_put_delete(store):
    assert store.get("k") is None
    rev = store.put("k", "v1")
    assert store.get("k") == KeyValue("k", "v1", rev, 0)
    rev2 = store.put("k", "v2")
    assert rev2 > rev
    assert store.get("k") == KeyValue("k", "v2", rev2, 0)
    assert store.delete("k") is True
    assert store.get("k") is None
    assert store.delete("k") is False


def test_values_round_trip(store):
    for key, value in [("empty", ""), ("unicode/é€", "ünïcødé ✓"), ("json", '{"a": [1, 2], "b": "\\n"}')]:
        store.put(key, value)
        assert store.get(key).value == value


def test_list_prefix_isolation(store):
    for key in ["a/2", "a/1", "ab/1", "b/1", "a", "a/sub/3"]:
        last = store.put(key, key.upper())
    kvs, rev = store.list("a/")
    assert [kv.key for kv in kvs] == ["a/1", "a/2", "a/sub/3"]  # sorted, nothing from "ab/" or "a"
    assert [kv.value for kv in kvs] == ["A/1", "A/2", "A/SUB/3"]
    assert rev >= last
    assert store.list("nothing/")[0] == []
    assert [kv.key for kv in store.list("")[0]] == ["a", "a/1", "a/2", "a/sub/3", "ab/1", "b/1"]


def test_txn_create_if_absent(store):
    assert store.txn({"ip/10.0.0.2": 0}, {"ip/10.0.0.2": "ep1"}) is True
    assert store.txn({"ip/10.0.0.2": 0}, {"ip/10.0.0.2": "ep2"}) is False
    assert store.get("ip/10.0.0.2").value == "ep1"


def test_txn_compare_and_swap(store):
    rev = store.put("counter", "1")
    assert store.txn({"counter": rev}, {"counter": "2"}) is True
    new = store.get("counter")
    assert new.value == "2" and new.mod_revision > rev
    assert store.txn({"counter": rev}, {"counter": "3"}) is False  # stale revision
    assert store.txn({"counter": new.mod_revision}, delete=["counter"]) is True
    assert store.get("counter") is None
    assert store.txn({"counter": new.mod_revision}, {"counter": "4"}) is False  # gone


def test_txn_failure_changes_nothing(store, watchers):
    store.put("x", "1")
    store.put("y", "1")
    before, rev = store.list("")
    w = watchers(store, "", rev + 1)
    # One comparison of two fails: no put, no delete, no new revision.
    assert store.txn({"x": before[0].mod_revision, "y": 12345}, {"x": "2", "z": "2"}, ["y"]) is False
    after, rev_after = store.list("")
    assert after == before
    assert rev_after == rev
    store.put("marker", "m")
    assert [e.key for e in w.wait_for(1)] == ["marker"]  # the failed txn made no event


def test_txn_multi_key_atomic(store, watchers):
    store.put("old/1", "a")
    store.put("old/2", "b")
    _, rev = store.list("")
    w = watchers(store, "", rev + 1)
    assert store.txn({"old/1": store.get("old/1").mod_revision, "new/1": 0},
                     {"new/1": "x", "new/2": "y"}, ["old/1", "old/2"]) is True
    events = w.wait_for(4)
    assert {e.revision for e in events} == {store.get("new/1").mod_revision}  # one revision for all
    assert [(e.kind, e.key) for e in events] == [
        ("put", "new/1"), ("put", "new/2"), ("delete", "old/1"), ("delete", "old/2")]
    assert [kv.key for kv in store.list("")[0]] == ["new/1", "new/2"]


def test_txn_rejects_a_key_named_twice(store):
    with pytest.raises(ValueError):
        store.txn({}, {"k": "v"}, ["k"])
    assert store.get("k") is None


def test_revisions_strictly_increase(store):
    revs = [store.put(f"k{i}", "v") for i in range(5)]
    store.txn({"t": 0}, {"t": "v"})
    revs.append(store.get("t").mod_revision)
    assert store.delete("k0")
    revs.append(store.list("")[1])
    assert revs == sorted(set(revs))


def test_watch_events_in_order(store, watchers):
    _, rev = store.list("")
    w = watchers(store, "w/", rev + 1)
    r1 = store.put("w/a", "1")
    r2 = store.put("w/b", "2")
    r3 = store.put("w/a", "3")
    store.delete("w/b")
    events = w.wait_for(4)
    assert events[:3] == [Event("put", "w/a", "1", r1), Event("put", "w/b", "2", r2), Event("put", "w/a", "3", r3)]
    assert events[3].kind == "delete" and events[3].key == "w/b" and events[3].value is None
    assert events[3].revision > r3
    assert len(events) == 4


def test_watch_from_past_revision(store, watchers):
    revs = [store.put(f"p/{i}", str(i)) for i in range(4)]
    store.delete("p/0")
    w = watchers(store, "p/", revs[2])
    events = w.wait_for(3)
    assert [(e.kind, e.key, e.revision) for e in events[:2]] == [("put", "p/2", revs[2]), ("put", "p/3", revs[3])]
    assert (events[2].kind, events[2].key) == ("delete", "p/0")
    store.put("p/marker", "m")  # and nothing more before the next write
    assert [e.key for e in w.wait_for(4)][3:] == ["p/marker"]


def test_watch_prefix_filtering(store, watchers):
    _, rev = store.list("")
    w = watchers(store, "net/1/", rev + 1)
    store.put("net/10/a", "no")  # shares characters with the prefix, not the prefix
    store.put("net/1/a", "yes")
    store.put("net/2/a", "no")
    store.put("net/1", "no")
    store.put("net/1/b/c", "yes")
    events = w.wait_for(2)
    assert [e.key for e in events] == ["net/1/a", "net/1/b/c"]
    store.put("net/1/z", "yes")
    assert [e.key for e in w.wait_for(3)] == ["net/1/a", "net/1/b/c", "net/1/z"]


def test_watch_returns_soon_after_stop(store, watchers):
    w = watchers(store, "idle/", store.list("")[1] + 1)
    time.sleep(0.1)  # let it block waiting for events
    assert w.close() < 1.0


def test_watch_from_compacted_revision_raises(store):
    first = store.put("c/1", "a")
    store.put("c/1", "b")
    keep = store.put("c/2", "c")
    store.compact(keep)
    stop = threading.Event()
    with pytest.raises(Compacted) as info:
        next(iter(store.watch("c/", first, stop)))
    assert info.value.compact_revision == keep
    assert isinstance(info.value, StoreError)
    # From the compaction revision on, history is still there.
    batch = next(iter(store.watch("c/", keep, stop)))
    assert batch == [Event("put", "c/2", "c", keep)]
    stop.set()


def test_lease_expiry_and_keepalive(store, watchers):
    _, rev = store.list("")
    w = watchers(store, "l/", rev + 1)
    doomed = store.grant_lease(1)
    kept = store.grant_lease(1)
    store.put("l/doomed/1", "x", lease=doomed)
    store.put("l/doomed/2", "x", lease=doomed)
    store.put("l/kept", "x", lease=kept)
    began = time.monotonic()
    # Keep one lease alive for over twice its TTL while the other expires.
    while time.monotonic() - began < 2.5:
        assert store.keepalive(kept) is True
        assert store.get("l/kept") is not None
        time.sleep(0.2)  # the keepalive period, well inside the 1 s TTL
    assert store.get("l/doomed/1") is None and store.get("l/doomed/2") is None
    events = w.wait_for(5)
    deletes = [e for e in events if e.kind == "delete"]
    assert sorted(e.key for e in deletes) == ["l/doomed/1", "l/doomed/2"]
    assert store.keepalive(doomed) is False
    with pytest.raises(StoreError):
        store.put("l/late", "x", lease=doomed)
    # Without keepalives the other lease goes too, with its delete event.
    wait_until(lambda: store.get("l/kept") is None, timeout=6, what="lease expiry")
    assert [(e.kind, e.key) for e in w.wait_for(6)][-1] == ("delete", "l/kept")


def test_lease_revoke(store, watchers):
    lease = store.grant_lease(60)
    store.put("r/1", "x", lease=lease)
    store.txn({"r/2": 0}, {"r/2": "x"}, lease=lease)
    store.put("r/3", "x", lease=lease)
    store.put("r/3", "y")  # a put without the lease detaches the key from it
    assert store.get("r/1").lease == lease
    _, rev = store.list("")
    w = watchers(store, "r/", rev + 1)
    store.revoke(lease)
    assert store.get("r/1") is None and store.get("r/2") is None
    assert store.get("r/3").value == "y"
    events = w.wait_for(2)
    assert sorted((e.kind, e.key) for e in events) == [("delete", "r/1"), ("delete", "r/2")]
    assert events[0].revision == events[1].revision  # one revision, as etcd does
    assert store.keepalive(lease) is False
    store.revoke(lease)  # revoking twice is not an error


def test_racing_creates_have_one_winner_each(store):
    keys = [f"ip/10.0.0.{i}" for i in range(10)]

    def claim(worker):
        return [k for k in keys if store.txn({k: 0}, {k: f"w{worker}"})]

    with ThreadPoolExecutor(12) as pool:
        won = list(pool.map(claim, range(12)))
    winners = {}
    for worker, ks in enumerate(won):
        for k in ks:
            assert k not in winners, f"{k} won twice"
            winners[k] = f"w{worker}"
    assert sorted(winners) == sorted(keys)
    assert {k: store.get(k).value for k in keys} == winners


def test_compare_and_swap_loses_no_update(store):
    store.put("n", "0")

    def add(times):
        for _ in range(times):
            while True:
                kv = store.get("n")
                if store.txn({"n": kv.mod_revision}, {"n": str(int(kv.value) + 1)}):
                    break

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(add, [15] * 6))
    assert store.get("n").value == "90"
