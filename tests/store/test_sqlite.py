"""The embedded store: persistence, several processes, bounded history."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from driver.store import Compacted, Event, StoreError, open_store
from driver.store import sqlite as sqlite_module
from driver.store.memory import MemoryStore
from driver.store.sqlite import SqliteStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_state_survives_reopen(tmp_path):
    path = str(tmp_path / "state.db")
    s = SqliteStore(path)
    lease = s.grant_lease(60)
    first = s.put("nets/a", "1")
    s.put("eps/x", "2", lease=lease)
    assert s.txn({"ip/1": 0}, {"ip/1": "x"})
    kvs, rev = s.list("")
    s.close()

    s = SqliteStore(path)
    assert s.list("") == (kvs, rev)
    assert s.put("nets/b", "3") == rev + 1  # the revision carries on
    assert s.keepalive(lease) is True  # leases persist
    # So does the history: a watch from before the restart replays it.
    batch = next(iter(s.watch("nets/", first, threading.Event())))
    assert [(e.key, e.revision) for e in batch] == [("nets/a", first), ("nets/b", rev + 1)]
    s.close()


def test_expired_lease_is_swept_after_a_restart(tmp_path):
    path = str(tmp_path / "state.db")
    now = [1000.0]
    s = SqliteStore(path, clock=lambda: now[0])
    lease = s.grant_lease(5)
    s.put("eps/x", "v", lease=lease)
    s.put("nets/a", "v")
    _, rev = s.list("")
    s.close()
    now[0] += 6  # the plugin was down for longer than the TTL
    s = SqliteStore(path, clock=lambda: now[0])
    assert s.get("eps/x") is None
    assert s.get("nets/a") is not None
    assert next(iter(s.watch("", rev + 1, threading.Event()))) == [Event("delete", "eps/x", None, rev + 1)]
    assert s.keepalive(lease) is False


_WORKER = r"""
import sys, threading
from driver.store.sqlite import SqliteStore
path, threads, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # both processes open the new file at the same moment
store = SqliteStore(path)
conflicts = [0]

def add():
    for _ in range(times):
        while True:
            kv = store.get("n")
            value, rev = (int(kv.value), kv.mod_revision) if kv else (0, 0)
            if store.txn({"n": rev}, {"n": str(value + 1)}):
                break
            conflicts[0] += 1

ts = [threading.Thread(target=add) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print("done", conflicts[0], flush=True)
"""


def test_two_processes_lose_no_update(tmp_path):
    path = str(tmp_path / "new" / "state.db")
    os.makedirs(os.path.dirname(path))
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, path, "4", "40"], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.startswith("done"), out
    conflicts = sum(int(out.split()[1]) for out, _ in outs)
    s = SqliteStore(path)
    assert s.get("n").value == str(2 * 4 * 40)
    # Every successful CAS is one put event; the racing ones that lost made none.
    batch = next(iter(s.watch("n", 1, threading.Event())))
    assert [e.value for e in batch] == [str(i) for i in range(1, 321)]
    assert conflicts > 0, "no CAS ever lost a race: this test proved nothing"


def test_watch_sees_writes_of_another_process(tmp_path, watchers):
    path = str(tmp_path / "state.db")
    s = SqliteStore(path)
    w = watchers(s, "k/", s.list("")[1] + 1)
    script = ("import sys; from driver.store.sqlite import SqliteStore; s = SqliteStore(sys.argv[1])\n"
              "for i in range(20): s.put(f'k/{i}', str(i))\ns.delete('k/0')")
    subprocess.run([sys.executable, "-c", script, path], cwd=ROOT, check=True, timeout=30)
    events = w.wait_for(21)
    assert [e.key for e in events[:20]] == [f"k/{i}" for i in range(20)]
    assert (events[20].kind, events[20].key) == ("delete", "k/0")


def test_a_connection_is_not_used_across_fork(tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"))
    s.put("parent", "1")  # this thread now has a connection
    pid = os.fork()
    if pid == 0:  # the child: must open its own connection
        code = 1
        try:
            s.put("child", "1")
            code = 0 if s.get("parent") is not None else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.get("child").value == "1"
    s.put("parent", "2")
    assert s.get("parent").value == "2"


@pytest.mark.parametrize("make", [
    lambda tmp: MemoryStore(history=10),
    lambda tmp: SqliteStore(str(tmp / "state.db"), history=10),
], ids=["memory", "sqlite"])
def test_history_is_bounded(make, tmp_path):
    s = make(tmp_path)
    revs = [s.put(f"k/{i % 3}", str(i)) for i in range(50)]
    with pytest.raises(Compacted) as info:
        next(iter(s.watch("k/", revs[0], threading.Event())))
    oldest = info.value.compact_revision
    assert revs[-12] <= oldest <= revs[-10]  # about `history` events kept
    batch = next(iter(s.watch("k/", oldest, threading.Event())))
    assert [e.revision for e in batch] == [r for r in revs if r >= oldest]
    if isinstance(s, SqliteStore):
        rows = sqlite3.connect(s.path).execute("SELECT count(*) FROM events").fetchone()[0]
        assert rows <= 11


def test_open_store_creates_the_directory(tmp_path):
    path = tmp_path / "a" / "b" / "state.db"
    s = open_store(f"sqlite://{path}")
    s.put("k", "v")
    assert path.exists()
    assert s.url == f"sqlite store at {path}"


def test_busy_database_error_names_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT", 0.2)
    path = str(tmp_path / "state.db")
    s = SqliteStore(path)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holding the write lock for too long
    try:
        with pytest.raises(StoreError) as info:
            s.put("k", "v")
    finally:
        locker.execute("ROLLBACK")
    assert str(info.value).startswith(f"sqlite store at {os.path.realpath(path)}: ")
    assert "locked" in str(info.value)
    s.put("k", "v")  # and it works again once the lock is gone


CLOSE_UNDER_READERS = """
import os, sys, threading, time
from driver.store.base import StoreError
from driver.store.sqlite import SqliteStore
folder = sys.argv[1]
for n in range(40):
    store = SqliteStore(os.path.join(folder, f"s{n}.db"))
    store.put("a", "1")
    stop = threading.Event()
    def reader():
        while not stop.is_set():
            try:
                store.list("")
                store.get("a")
            except StoreError:
                pass  # closed under it: said, not crashed
    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # the readers in the middle of their queries
    store.close()
    time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
print("survived")
"""


def test_close_while_other_threads_read_does_not_crash_the_process(tmp_path):
    """close() from one thread while others are inside a query: closing a
    sqlite connection another thread is using crashes CPython (a segfault
    that killed the unit suite now and then, from a test's teardown while
    its watch threads still polled). In a subprocess, so a crash fails this
    test instead of the run."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", CLOSE_UNDER_READERS, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr[-2000:])
