"""The embedded single-host store: one SQLite file, etcd's semantics.

Safe across threads and processes (gunicorn workers): WAL so readers never
block the writer, a busy timeout so writers queue instead of failing, and
BEGIN IMMEDIATE so every write transaction takes the write lock before it
reads what it will compare. One connection per thread (and per process: a
connection is never used across a fork).

Watches read an event log table. Writers in the same process wake watchers at
once through a Condition; writes from other processes are noticed by polling
(POLL_INTERVAL). The log is compacted to a bounded size; a watch from a
compacted revision raises Compacted. Lease deadlines are wall-clock
timestamps, so they survive restarts and are shared by processes; whoever
touches the store first after a deadline deletes the lease's keys.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Optional

from .base import Compacted, Event, KeyValue, Store, StoreError
from .memory import DEFAULT_HISTORY, check_txn, prefix_end

log = logging.getLogger(__name__)

#: How often a watch looks for writes made by other processes. An idle poll is
#: one PRAGMA data_version; measured: a median cross-process watch latency of
#: 10 ms, and an idle watcher costs about 0.6% of a core.
POLL_INTERVAL = 0.02
#: How long a writer waits for another writer before giving up.
BUSY_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compact_revision', 0);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL,
    mod_revision INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, revision INTEGER NOT NULL,
    kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT
);
CREATE INDEX IF NOT EXISTS events_revision ON events (revision);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl INTEGER NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires);
"""

# One "something was written" signal per database file, shared by every
# SqliteStore of this process, so an in-process write wakes watchers at once.
_signals: dict[str, "_Signal"] = {}
_signals_lock = threading.Lock()


class _Signal:
    def __init__(self):
        self.cond = threading.Condition()
        self.seq = 0

    def bump(self) -> None:
        with self.cond:
            self.seq += 1
            self.cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self.cond:
            if self.seq == seen:
                self.cond.wait(timeout)


def _signal_for(path: str) -> _Signal:
    with _signals_lock:
        return _signals.setdefault(path, _Signal())


class SqliteStore(Store):
    def __init__(self, path: str, history: int = DEFAULT_HISTORY, clock=time.time):
        if not os.path.isabs(path):
            raise ValueError(f"sqlite store path must be absolute, got {path!r}")
        self.path = os.path.realpath(path)
        self.url = f"sqlite store at {self.path}"
        self._history = history
        self._clock = clock
        self._local = threading.local()
        # Every thread's connection, with the lock it is used under: close()
        # takes each lock before closing, since closing a connection that
        # another thread is in the middle of using crashes the interpreter.
        self._conns: dict[sqlite3.Connection, threading.RLock] = {}
        self._conns_lock = threading.Lock()
        self._signal = _signal_for(self.path)
        # A damaged file or a full disk must not stop the plugin from starting
        # (a service manager would restart it in a loop): the store opens
        # anyway, every call fails with what to do, and the first call after
        # the operator fixed it finds it good.
        self._ready = False
        try:
            self._conn()
        except StoreError as e:
            log.error("%s", e)

    def _prepare(self, db: sqlite3.Connection) -> None:
        """The directory and the schema, once per store (retried until it works)."""
        try:
            # Under the write lock, so processes opening a new file at once agree.
            db.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise self._error(e) from e
        self._ready = True

    # Connections and transactions.

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            if not self._ready:
                self._prepare_or_forget(db)
            return db
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot create its directory: {e}; "
                             f"check that {os.path.dirname(self.path)} can be made and written by root") from e
        try:
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            self._wal(db)
            # NORMAL in WAL mode: a crash of the process loses nothing; a power
            # loss may drop the last commits but never corrupts the file.
            db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            try:
                db.close()
            except (sqlite3.Error, UnboundLocalError):
                pass
            raise self._error(e, "cannot open") from e
        self._local.db, self._local.pid = db, os.getpid()
        with self._conns_lock:
            self._conns[db] = threading.RLock()
        if not self._ready:
            self._prepare_or_forget(db)
        return db

    def _prepare_or_forget(self, db: sqlite3.Connection) -> None:
        try:
            self._prepare(db)
        except StoreError:
            # Open the path again next time: the operator may have moved a damaged file aside.
            self._local.db = None
            with self._conns_lock:
                self._conns.pop(db, None)
            db.close()
            raise

    def _wal(self, db: sqlite3.Connection) -> None:
        # Switching a new file to WAL fails at once with "database is locked"
        # while another process does the same (no busy handler for it): retry.
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                mode = db.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() != "wal":
                    db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _error(self, e: Exception, doing: str = "") -> StoreError:
        """The failure, with what the operator should do about it."""
        text, folder = str(e), os.path.dirname(self.path)
        if "not a database" in text or "malformed" in text:
            advice = (f"the file is damaged: stop pyoverlay, move it aside (mv {self.path} {self.path}.damaged, "
                      f"and its -wal and -shm files) and start pyoverlay again; it starts with an empty store, so "
                      "remove and create the pyoverlay networks again (or put back a backup of the file)")
        elif "full" in text:
            advice = (f"the disk holding it is full: free space in {folder}; nothing of this request was "
                      "written, and pyoverlay carries on by itself once there is room")
        elif "readonly" in text or "unable to open" in text:
            advice = f"pyoverlay cannot write it: check that {folder} is writable by root and not mounted read-only"
        elif "disk I/O error" in text:
            advice = f"the disk failed a write: check the free space in {folder} and the kernel log"
        else:
            return StoreError(f"{self.url}: {doing + ': ' if doing else ''}{text}")
        return StoreError(f"{self.url}: {doing + ': ' if doing else ''}{text}; {advice}")

    @contextmanager
    def _held(self):
        """This thread's connection, held against a close() from another thread."""
        db = self._conn()
        with self._conns_lock:
            lock = self._conns.get(db)
        if lock is None:  # closed meanwhile: the next call opens a new one
            self._local.db = None
            raise StoreError(f"{self.url}: the store was closed")
        with lock:
            if db not in self._conns:
                self._local.db = None
                raise StoreError(f"{self.url}: the store was closed")
            yield db

    @contextmanager
    def _write(self):
        """A write transaction: yields (connection, current revision), sweeps
        expired leases first, and wakes this process's watchers after commit."""
        with self._held() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._error(e) from e
            try:
                self._sweep(db)
                rev = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
                yield db, rev[0] if rev else 1
                db.execute("COMMIT")
            except BaseException as e:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(e, sqlite3.Error):
                    raise self._error(e) from e
                raise
        self._signal.bump()

    @contextmanager
    def _read(self):
        """A read transaction: one consistent snapshot for several SELECTs."""
        with self._held() as db:
            try:
                expired = self._expired(db)
            except sqlite3.Error as e:
                raise self._error(e) from e
            if expired:
                with self._write():
                    pass  # the write transaction sweeps
            try:
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as e:
                raise self._error(e) from e

    def _expired(self, db) -> bool:
        row = db.execute("SELECT min(expires) FROM leases").fetchone()
        return row[0] is not None and row[0] <= self._clock()

    def _bump(self, db, rev: int) -> int:
        db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        return rev

    def _log(self, db, rev: int, events: list[tuple[str, str, Optional[str]]]) -> None:
        db.executemany(
            "INSERT INTO events (revision, kind, key, value) VALUES (?, ?, ?, ?)",
            [(rev, kind, key, value) for kind, key, value in events],
        )
        lo, hi = db.execute("SELECT min(id), max(id) FROM events").fetchone()
        # Ids are contiguous (only the oldest rows are ever deleted), so this is
        # the row count. Trim in steps of a tenth so that it is rare.
        if hi - lo + 1 > self._history + max(1, self._history // 10):
            cut = db.execute("SELECT revision FROM events WHERE id = ?", (hi - self._history + 1,)).fetchone()[0]
            self._compact(db, cut)

    def _compact(self, db, revision: int) -> None:
        db.execute("DELETE FROM events WHERE revision < ?", (revision,))
        db.execute(
            "UPDATE meta SET value = max(value, ?) WHERE name = 'compact_revision'", (revision,)
        )

    def _sweep(self, db) -> None:
        expired = db.execute("SELECT id FROM leases WHERE expires <= ?", (self._clock(),)).fetchall()
        for (lease,) in expired:
            self._drop_lease(db, lease)

    def _drop_lease(self, db, lease: int) -> None:
        db.execute("DELETE FROM leases WHERE id = ?", (lease,))
        keys = [k for (k,) in db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
        if keys:
            rev = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0] + 1
            db.execute("DELETE FROM kv WHERE lease = ?", (lease,))
            self._log(db, rev, [("delete", k, None) for k in keys])
            self._bump(db, rev)

    def _check_lease(self, db, lease: int) -> None:
        if lease and db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise StoreError(f"{self.url}: lease {lease} not found (expired or revoked)")

    # The interface.

    def get(self, key: str) -> Optional[KeyValue]:
        with self._read() as db:
            row = db.execute("SELECT key, value, mod_revision, lease FROM kv WHERE key = ?", (key,)).fetchone()
        return KeyValue(*row) if row else None

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        end = prefix_end(prefix)
        with self._read() as db:
            rev = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            if end is None:
                rows = db.execute(
                    "SELECT key, value, mod_revision, lease FROM kv WHERE key >= ? ORDER BY key", (prefix,)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT key, value, mod_revision, lease FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (prefix, end),
                ).fetchall()
        return [KeyValue(*r) for r in rows], rev

    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._write() as (db, rev):
            self._check_lease(db, lease)
            rev += 1
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, rev, lease))
            self._log(db, rev, [("put", key, value)])
            return self._bump(db, rev)

    def delete(self, key: str) -> bool:
        with self._write() as (db, rev):
            if db.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 0:
                return False
            rev += 1
            self._log(db, rev, [("delete", key, None)])
            self._bump(db, rev)
            return True

    def txn(
        self,
        compare: Mapping[str, int],
        put: Mapping[str, str] = {},
        delete: Iterable[str] = (),
        lease: int = 0,
    ) -> bool:
        delete = check_txn(put, delete)
        with self._write() as (db, rev):
            for key, want in compare.items():
                row = db.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
                if (row[0] if row else 0) != want:
                    return False
            if put:
                self._check_lease(db, lease)
            events = []
            rev += 1
            for key, value in put.items():
                db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, rev, lease))
                events.append(("put", key, value))
            for key in delete:
                if db.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount:
                    events.append(("delete", key, None))
            if events:
                self._log(db, rev, events)
                self._bump(db, rev)
            return True

    def watch(self, prefix: str, start_revision: int, stop: threading.Event) -> Iterator[list[Event]]:
        end = prefix_end(prefix)
        nxt = start_revision
        if nxt <= 0:
            with self._read() as db:
                nxt = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0] + 1
        # What the last look saw; while none of it changed, a poll is one PRAGMA.
        last: Optional[tuple[int, int]] = None
        next_deadline: Optional[float] = None
        while not stop.is_set():
            seen = self._signal.seq  # read before looking, so no wake-up is missed
            # data_version moves when another connection (thread or process)
            # commits; the signal covers commits by this thread's own connection.
            try:
                with self._held() as db:
                    version = db.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error as e:
                raise self._error(e) from e
            due = next_deadline is not None and next_deadline <= self._clock()
            if (version, seen) == last and not due:
                self._signal.wait(seen, POLL_INTERVAL)
                continue
            last = (version, seen)
            with self._read() as db:
                rev, compact_rev, next_deadline = db.execute(
                    "SELECT (SELECT value FROM meta WHERE name = 'revision'),"
                    " (SELECT value FROM meta WHERE name = 'compact_revision'),"
                    " (SELECT min(expires) FROM leases)"
                ).fetchone()
                if nxt < compact_rev:
                    raise Compacted(
                        f"{self.url}: revision {nxt} is compacted (oldest kept {compact_rev})", compact_rev
                    )
                rows = []
                if nxt <= rev:
                    sql = "SELECT kind, key, value, revision FROM events WHERE revision >= ? AND key >= ?"
                    args: tuple = (nxt, prefix)
                    if end is not None:
                        sql += " AND key < ?"
                        args += (end,)
                    rows = db.execute(sql + " ORDER BY id", args).fetchall()
                    nxt = rev + 1
            if rows:
                yield [Event(*r) for r in rows]
            else:
                self._signal.wait(seen, POLL_INTERVAL)

    def grant_lease(self, ttl: int) -> int:
        with self._write() as (db, _):
            return db.execute(
                "INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, self._clock() + ttl)
            ).lastrowid

    def keepalive(self, lease: int) -> bool:
        with self._write() as (db, _):
            cur = db.execute("UPDATE leases SET expires = ? + ttl WHERE id = ?", (self._clock(), lease))
            return cur.rowcount > 0

    def revoke(self, lease: int) -> None:
        with self._write() as (db, _):
            self._drop_lease(db, lease)

    # Not in the interface.

    def compact(self, revision: int) -> None:
        """Forget the event log below revision (done automatically past `history` events)."""
        with self._write() as (db, rev):
            if revision > rev:
                raise ValueError(f"cannot compact to future revision {revision} (current {rev})")
            self._compact(db, revision)

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, {}
        for db, lock in conns.items():
            with lock:  # not while its thread is in the middle of using it
                try:
                    db.close()
                except sqlite3.Error:
                    pass
        self._local = threading.local()
