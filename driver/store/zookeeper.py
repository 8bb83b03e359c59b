"""ZooKeeper (3.5 and later) through kazoo, with etcd's semantics.

Layout under the root znode (the URL's path, default /pyoverlay):

    rev                 the store revision, as text
    compact             the oldest revision the change log still holds
    log/<revision>      one node per revision: that write's events, as JSON
    kv/k<key>           a key without "/"; kv/b<first part>/k<rest> for the
                        others, so one family of keys is one znode's children
    leases/l<seq>       one ephemeral node per live lease
    lease-records/<id>  a persistent marker: lease id may own keys

Revision: a counter of pyoverlay's own writes, not the zxid. Every write is one
ZooKeeper multi that sets `rev` to rev + 1 on the version it read, writes the
keys, and creates log/<rev + 1>; so writes are serialised like etcd's, a key's
mod_revision is known before commit (it sits in its JSON value), and a log node
exists exactly for each revision. A multi that lost the race on `rev` is
planned again from fresh reads. (The zxid would do as a revision, but a watch
could then not find "the first change at or after N" without scanning.)

Watch: read log/<n>, log/<n+1>, ... and filter by prefix; at the first missing
node, set a ZooKeeper existence watch on it and wait. The log lives on the
servers, so a watch resumed after a disconnect, a server restart or a session
expiry (follow() resumes from the last revision seen + 1) misses and repeats
nothing. Compaction moves `compact` first and then deletes older log nodes; a
watch from below `compact` raises Compacted (follow() lists again).

Leases are owned by the store that granted them: it tracks the deadline
(the TTL since the last keepalive, counted only while connected: as with
etcd, an outage of the store ends no lease) and revokes the lease when it
passes. An
ephemeral node per lease ties it to the owner's ZooKeeper session too, so a
crashed or frozen owner's lease ends when its session expires. Keys are
ordinary znodes naming their lease; every store with leases looks for lease
records whose ephemeral node is gone and deletes their keys, through the log,
so watchers see the deletes. Why not TTL nodes: they need the server's
extendedTypesEnabled, and ZooKeeper would delete them behind the log's back.

A write whose answer is lost with the connection fails with StoreError and
may have been applied (the caller's compare-and-set loop then sees it).
Reads are ZooKeeper's: served by the member this client is connected to,
never older than what this client wrote or read. list() is one consistent
snapshot: `rev` read before and after the keys; if a write came in between,
it reads again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, Optional
from urllib.parse import quote, unquote

from kazoo.client import KazooClient
from kazoo.exceptions import (AuthFailedError, BadVersionError, NoAuthError, NodeExistsError, NoNodeError,
                              RolledBackError)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from .base import Compacted, Event, KeyValue, Store, StoreError
from .memory import DEFAULT_HISTORY, check_txn

log = logging.getLogger(__name__)

#: Seconds a call waits for a (re)connection before it fails.
CONNECT_TIMEOUT = 2.0
#: Seconds for ZooKeeper to answer a request.
REQUEST_TIMEOUT = 5.0
#: The session timeout asked for: a crashed host's leases end this long after
#: its last ping. The server clamps it into [2, 20] ticks by default.
SESSION_TIMEOUT = 10.0
#: How often a store holding leases looks for the keys of leases whose owner's
#: session ended (one getChildren of each of two small directories).
ORPHAN_INTERVAL = 2.0
#: A watch waits on ZooKeeper's notification, and polls this often anyway (a
#: notification is lost with the session that set it).
WATCH_POLL = 1.0
#: A write that keeps losing the race for `rev` gives up after this many tries.
MAX_TRIES = 200
#: Log nodes fetched per round trip when a watch catches up.
LOG_READ_AHEAD = 64

_AUTH_FLAGS = "--etcd-user and --etcd-password (PYOVERLAY_ETCD_USER, PYOVERLAY_ETCD_PASSWORD)"


def _node_name(text: str) -> str:
    """A key part as one znode name: no "/", never "." or ".." (the letter prefix)."""
    return quote(text, safe="")


def _key_path(key: str) -> tuple[Optional[str], str]:
    """(bucket or None, node name) of key, relative to kv/."""
    head, sep, rest = key.partition("/")
    if sep:
        return "b" + _node_name(head), "k" + _node_name(rest)
    return None, "k" + _node_name(key)


class _KazooLog(logging.LoggerAdapter):
    """kazoo's log, remembering its last warning: why a connection failed
    (refused, a TLS error) for the error a caller gets."""

    last = ""

    def log(self, level, msg, *args, **kw):
        if level >= logging.WARNING:
            try:
                self.last = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last = str(msg)
        super().log(level, msg, *args, **kw)


class ZooKeeperStore(Store):
    def __init__(
        self,
        hosts: list[str],
        root: str = "/pyoverlay",
        *,
        tls: bool = False,
        cacert: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        session_timeout: float = SESSION_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        history: int = DEFAULT_HISTORY,
    ):
        if not hosts:
            raise ValueError("ZooKeeper store needs at least one host:port")
        if root == "/" or root != "/" + "/".join(p for p in root.split("/") if p):
            raise ValueError(f"ZooKeeper root {root!r} must be an absolute path without a trailing /")
        if bool(user) != bool(password):
            raise ValueError(f"ZooKeeper digest authentication needs both {_AUTH_FLAGS}")
        self.hosts = ",".join(hosts)
        self.root = root
        self.url = f"ZooKeeper at {self.hosts}{root}"
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._history = history
        self._user = user
        kw: dict = {}
        if user:
            # Digest: pyoverlay's nodes are created readable and writable by
            # this user only; ZooKeeper then refuses anyone else (NoAuth).
            kw["auth_data"] = [("digest", f"{user}:{password}")]
            kw["default_acl"] = [make_digest_acl(user, password, all=True)]
        if tls or cacert or cert:
            for path in (cacert, cert, key):
                if path and not os.path.isfile(path):
                    raise StoreError(f"{self.url}: cannot load TLS files: {path} is not a readable file; "
                                     "check --etcd-cacert, --etcd-cert and --etcd-key")
            # The server's certificate is checked, its name or IP too, against
            # cacert (else the system's CAs).
            kw.update(use_ssl=True, ca=cacert, certfile=cert, keyfile=key, verify_certs=True, check_hostname=True)
        self._kazoo_log = _KazooLog(logging.getLogger("kazoo.client"), {})
        self._zk = KazooClient(
            hosts=self.hosts,
            logger=self._kazoo_log,
            timeout=session_timeout,
            # Reconnect forever, at most 2 s apart: an outage of ZooKeeper
            # ends without a restart of pyoverlay.
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=2.0),
            **kw,
        )
        self._connected = threading.Event()
        self._zk.add_listener(self._on_state)
        self._ready = False  # the root's nodes exist
        self._buckets: set[str] = set()  # kv/b... nodes known to exist (never deleted)
        self._leases: dict[int, list[float]] = {}  # ours: id -> [ttl, deadline (monotonic)]
        self._lock = threading.Lock()
        self._reaper: Optional[threading.Thread] = None
        self._closed = threading.Event()
        self._compact_wanted = 0  # the highest revision a write asked the log trimmed to
        self._compacting = False  # a trim thread is running (it takes up what is wanted meanwhile)
        self._started = False

    # Connection and calls.

    def _on_state(self, state) -> None:
        if state == KazooState.CONNECTED:
            if not self._connected.is_set():
                # Leases stood still while ZooKeeper was away (as etcd's do
                # across its own outage): each gets its TTL again from now.
                now = time.monotonic()
                with self._lock:
                    for mine in self._leases.values():
                        mine[1] = max(mine[1], now + mine[0])
            self._kazoo_log.last = ""  # a later failure is news
            self._connected.set()
        else:
            self._connected.clear()

    def _error(self, e: BaseException, doing: str) -> StoreError:
        if isinstance(e, NoAuthError):
            who = f"user {self._user!r}" if self._user else "no user"
            return StoreError(
                f"{self.url}: {doing}: access denied (NoAuth) as {who}: the nodes under {self.root} belong to "
                f"a ZooKeeper digest user; pass that user and its password with {_AUTH_FLAGS}")
        if isinstance(e, AuthFailedError):
            return StoreError(f"{self.url}: {doing}: ZooKeeper refused the credentials; check {_AUTH_FLAGS}")
        text = str(e) or type(e).__name__
        return StoreError(f"{self.url}: {doing}: {text}; check that ZooKeeper runs there and that --store "
                          f"names its client port (zk://host:2181[,host:2181...][/root])")

    def _wait_connected(self) -> None:
        if self._closed.is_set():
            raise StoreError(f"{self.url}: the store is closed")
        if not self._started:
            # Connect in the background, from the first call on: the plugin
            # starts while ZooKeeper is away, and every call fails with what to
            # do until it is back.
            with self._lock:
                if not self._started:
                    self._zk.start_async()
                    self._started = True
        if not self._connected.wait(self._connect_timeout):
            if not self._kazoo_log.last:
                # No attempt failed yet: a slow handshake (TLS, a loaded
                # server), not an outage. Give it a request's time.
                self._connected.wait(max(0.0, self._request_timeout - self._connect_timeout))
        if not self._connected.is_set():
            last = self._kazoo_log.last
            raise StoreError(
                f"{self.url}: no connection within {self._connect_timeout:g} s"
                f"{' (' + last + ')' if last else ''}; check that ZooKeeper runs there and that --store names "
                "its client port (zk://host:2181[,host:2181...][/root]; zks:// and --etcd-cacert for its TLS port)")

    def _call(self, doing: str, start: Callable, *args, **kw):
        """One request: fail fast while disconnected, and never wait forever."""
        self._wait_connected()
        self._ensure_root()
        return self._raw(doing, start, *args, **kw)

    def _raw(self, doing: str, start: Callable, *args, **kw):
        try:
            return start(*args, **kw).get(timeout=self._request_timeout)
        except (NoNodeError, NodeExistsError, BadVersionError):
            raise  # answers, for the caller to judge
        except KazooTimeoutError as e:
            raise StoreError(f"{self.url}: {doing}: no answer within {self._request_timeout:g} s") from e
        except Exception as e:
            raise self._error(e, doing) from e

    def _p(self, *parts: str) -> str:
        return "/".join((self.root,) + parts)

    def _ensure_root(self) -> None:
        if self._ready:
            return
        zk = self._zk
        try:
            zk.ensure_path_async(self.root).get(timeout=self._request_timeout)
        except Exception as e:
            raise self._error(e, f"creating {self.root}") from e
        for name, data in (("kv", b""), ("log", b""), ("leases", b""), ("lease-records", b""),
                           ("compact", b"0"), ("rev", b"1")):
            try:
                self._raw(f"creating {self._p(name)}", zk.create_async, self._p(name), data)
            except NodeExistsError:
                pass
        self._ready = True

    # Reading.

    @staticmethod
    def _decode(key: str, data: bytes) -> KeyValue:
        record = json.loads(data)
        return KeyValue(key, record["v"], record["r"], record.get("l", 0))

    def _path(self, key: str) -> str:
        bucket, name = _key_path(key)
        return self._p("kv", bucket, name) if bucket else self._p("kv", name)

    def _read_rev(self):
        data, stat = self._call("reading the revision", self._zk.get_async, self._p("rev"))
        return int(data), stat

    def get(self, key: str) -> Optional[KeyValue]:
        try:
            data, _ = self._call(f"reading {key}", self._zk.get_async, self._path(key))
        except NoNodeError:
            return None
        return self._decode(key, data)

    def _children(self, path: str) -> list[str]:
        try:
            return self._call(f"listing {path}", self._zk.get_children_async, path)
        except NoNodeError:
            return []

    def _scan(self, prefix: str) -> list[tuple[KeyValue, int]]:
        """(KeyValue, znode version) of every key under prefix, sorted by key."""
        head, sep, rest = prefix.partition("/")
        paths: list[tuple[str, str]] = []  # (key, path)
        if sep:  # one bucket: prefix "endpoints/" reads kv/bendpoints only
            bucket = "b" + _node_name(head)
            for name in self._children(self._p("kv", bucket)):
                key = f"{head}/{unquote(name[1:])}"
                if key.startswith(prefix):
                    paths.append((key, self._p("kv", bucket, name)))
        else:
            for name in self._children(self._p("kv")):
                part = unquote(name[1:])
                if name[0] == "k" and part.startswith(prefix):
                    paths.append((part, self._p("kv", name)))
                elif name[0] == "b" and (part + "/").startswith(prefix):
                    for child in self._children(self._p("kv", name)):
                        paths.append((f"{part}/{unquote(child[1:])}", self._p("kv", name, child)))
        # Pipelined: every get is sent before the first answer is read.
        self._wait_connected()
        pending = [(key, self._zk.get_async(path)) for key, path in paths]
        found = []
        for key, result in pending:
            try:
                data, stat = self._raw(f"reading {key}", lambda r=result: r)
            except NoNodeError:
                continue  # deleted meanwhile: the caller's revision check sees that
            found.append((self._decode(key, data), stat.version))
        found.sort(key=lambda kv: kv[0].key)
        return found

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        for _ in range(20):
            before, stat = self._read_rev()
            found = self._scan(prefix)
            _, after = self._read_rev()
            if after.version == stat.version:
                return [kv for kv, _ in found], before
        # Writes never paused long enough: the revision read first is still a
        # true lower bound; a watch from it + 1 re-applies what the list holds.
        return [kv for kv, _ in found], before

    # Writing.

    def _write(self, plan: Callable[[int, dict], tuple], doing: str, lease: int = 0,
               keys: Iterable[str] = ()) -> tuple:
        """Run plan(rev, current) -> (ops, events, answer) as one multi with the
        revision bump, until no other write came first; returns (answer,
        revision). current maps each of keys to (KeyValue, znode version) or
        None. ops are (kind, path, data, version); no ops: answer at once,
        nothing written."""
        keys = list(keys)
        for _ in range(MAX_TRIES):
            # One round trip for all the reads: a session's requests are served
            # in order, so the keys are read no earlier than `rev`, and the
            # multi's version check on `rev` proves nothing changed since.
            self._wait_connected()
            self._ensure_root()
            rev_read = self._zk.get_async(self._p("rev"))
            key_reads = [(key, self._zk.get_async(self._path(key))) for key in keys]
            data, stat = self._raw("reading the revision", lambda: rev_read)
            rev, current = int(data), {}
            for key, result in key_reads:
                try:
                    value, kstat = self._raw(f"reading {key}", lambda r=result: r)
                except NoNodeError:
                    current[key] = None
                else:
                    current[key] = (self._decode(key, value), kstat.version)
            ops, events, answer = plan(rev, current)
            if not ops:
                return answer, rev
            t = self._zk.transaction()
            new = rev + 1 if events else rev
            if events:
                t.set_data(self._p("rev"), str(new).encode(), stat.version)
            else:
                t.check(self._p("rev"), stat.version)
            if lease:
                t.check(self._lease_path(lease), -1)  # the lease is live
            for kind, path, data, version in ops:
                if kind == "create":
                    t.create(path, data)
                elif kind == "set":
                    t.set_data(path, data, version)
                else:
                    t.delete(path, version)
            if events:
                t.create(self._p("log", "%019d" % new), json.dumps(events).encode())
            results = self._call(doing, t.commit_async)
            failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, RolledBackError)]
            if not failed:
                # Trimmed in steps of a tenth of the history, so that it is rare.
                if events and new % max(1, self._history // 10) == 0 and new > self._history:
                    self._compact_later(new - self._history)
                return answer, new
            first = results.index(failed[0])
            if first == 0:
                continue  # `rev` moved: another write came first
            if lease and first == 1 and isinstance(failed[0], NoNodeError):
                raise StoreError(f"{self.url}: lease {lease} not found (expired or revoked)")
            if isinstance(failed[0], NoNodeError):
                self._buckets.clear()  # a bucket we thought was there is not (a wiped root): make it again
                continue
            if isinstance(failed[0], (BadVersionError, NodeExistsError)):
                continue  # a key changed outside pyoverlay's writes: plan again
            raise self._error(failed[0], doing)
        raise StoreError(f"{self.url}: {doing}: gave up after {MAX_TRIES} tries, other writes always came first")

    def _ensure_bucket(self, key: str) -> None:
        bucket, _ = _key_path(key)
        if bucket is None or bucket in self._buckets:
            return
        try:
            self._call(f"creating {self._p('kv', bucket)}", self._zk.create_async, self._p("kv", bucket))
        except NodeExistsError:
            pass
        self._buckets.add(bucket)

    def txn(
        self,
        compare: Mapping[str, int],
        put: Mapping[str, str] = {},
        delete: Iterable[str] = (),
        lease: int = 0,
    ) -> bool:
        delete = check_txn(put, delete)
        for key in put:
            self._ensure_bucket(key)
        if put and lease:
            self._check_lease(lease)

        def plan(rev: int, current: dict):
            for key, want in compare.items():
                have = current[key]
                if (have[0].mod_revision if have else 0) != want:
                    return [], [], False  # nothing written
            ops, events = [], []
            for key, value in put.items():
                data = json.dumps({"v": value, "r": rev + 1, "l": lease}).encode()
                have = current[key]
                ops.append(("set", self._path(key), data, have[1]) if have else
                           ("create", self._path(key), data, -1))
                events.append(("put", key, value))
            for key in delete:
                if current[key]:
                    ops.append(("delete", self._path(key), None, current[key][1]))
                    events.append(("delete", key, None))
            return ops, events, True

        answer, _ = self._write(plan, f"writing {', '.join([*put, *delete]) or 'nothing'}",
                                lease=lease if put else 0, keys=dict.fromkeys([*compare, *put, *delete]))
        return answer

    def put(self, key: str, value: str, lease: int = 0) -> int:
        self._ensure_bucket(key)
        if lease:
            self._check_lease(lease)

        def plan(rev: int, current: dict):
            have = current[key]
            data = json.dumps({"v": value, "r": rev + 1, "l": lease}).encode()
            op = ("set", self._path(key), data, have[1]) if have else ("create", self._path(key), data, -1)
            return [op], [("put", key, value)], None

        _, new = self._write(plan, f"writing {key}", lease=lease, keys=[key])
        return new

    def delete(self, key: str) -> bool:
        def plan(rev: int, current: dict):
            have = current[key]
            if not have:
                return [], [], False
            return [("delete", self._path(key), None, have[1])], [("delete", key, None)], True

        answer, _ = self._write(plan, f"deleting {key}", keys=[key])
        return answer

    # Watching.

    def watch(self, prefix: str, start_revision: int, stop: threading.Event) -> Iterator[list[Event]]:
        nxt = start_revision
        if nxt <= 0:
            nxt = self._read_rev()[0] + 1
        nxt = max(nxt, 2)  # an empty store is at revision 1: the first write makes log/2
        woke = threading.Event()
        # One function object for every existence watch of this generator:
        # kazoo keeps a path's watchers in a set, so re-arming never piles up.
        wake = lambda _event: woke.set()  # noqa: E731
        self._check_compacted(nxt)
        while not stop.is_set():
            woke.clear()
            rev = self._read_rev()[0]
            if rev >= nxt:
                # Every log node up to rev exists, unless trimmed meanwhile.
                pending = [self._zk.get_async(self._p("log", "%019d" % r))
                           for r in range(nxt, min(rev, nxt + LOG_READ_AHEAD - 1) + 1)]
                batch = []
                for result in pending:
                    try:
                        data, _ = self._raw("reading the change log", lambda r=result: r)
                    except NoNodeError:
                        self._check_compacted(nxt)
                        raise StoreError(f"{self.url}: log/{nxt} is missing though the revision is {rev}")
                    batch.extend(Event(kind, key, value, nxt) for kind, key, value in json.loads(data)
                                 if key.startswith(prefix))
                    nxt += 1
                if batch:
                    yield batch
                continue  # look again before sleeping: more may be there now
            # Nothing new: wait for log/<nxt> to appear.
            if self._raw("watching the change log", self._zk.exists_async,
                         self._p("log", "%019d" % nxt), wake) is not None:
                continue
            waited = 0.0
            while not (stop.is_set() or woke.is_set() or waited >= WATCH_POLL):
                if not self._connected.is_set():
                    raise StoreError(f"{self.url}: connection lost while watching {prefix or 'every key'}")
                woke.wait(0.1)
                waited += 0.1

    def _check_compacted(self, revision: int) -> None:
        data, _ = self._call("reading the compaction revision", self._zk.get_async, self._p("compact"))
        oldest = int(data)
        if revision < oldest:
            raise Compacted(f"{self.url}: revision {revision} is compacted (oldest kept {oldest})", oldest)

    # Compaction (not in the interface).

    def compact(self, revision: int) -> None:
        """Forget the change log below revision (done by itself past `history` revisions)."""
        while True:
            rev, _ = self._read_rev()
            if revision > rev:
                raise ValueError(f"cannot compact to future revision {revision} (current {rev})")
            data, stat = self._call("reading the compaction revision", self._zk.get_async, self._p("compact"))
            old = int(data)
            if revision <= old:
                return
            try:
                # First the mark, so that a watch finding a node gone knows why.
                self._call("compacting", self._zk.set_async, self._p("compact"), str(revision).encode(),
                           stat.version)
            except BadVersionError:
                continue  # another store compacted meanwhile
            break
        # The first write made revision 2: nothing is below it.
        for lo in range(max(old, 2), revision, 500):
            pending = [self._zk.delete_async(self._p("log", "%019d" % r)) for r in range(lo, min(lo + 500, revision))]
            for result in pending:
                try:
                    self._raw("trimming the change log", lambda r=result: r)
                except NoNodeError:
                    pass

    def _compact_later(self, revision: int) -> None:
        # One trim thread at a time. A write that asks while one runs raises the
        # target, and the running thread goes on to it before it ends: the last
        # write's trim is never dropped.
        with self._lock:
            if revision <= self._compact_wanted:
                return
            self._compact_wanted = revision
            if self._compacting:
                return
            self._compacting = True

        def run():
            done = 0
            while True:
                with self._lock:
                    target = self._compact_wanted
                    if target <= done:
                        self._compacting = False
                        return
                try:
                    self.compact(target)
                except (StoreError, ValueError) as e:
                    log.warning("%s: trimming the change log: %s", self.url, e)
                done = target

        threading.Thread(target=run, name="zk-compact", daemon=True).start()

    # Leases.

    def _lease_path(self, lease: int) -> str:
        return self._p("leases", "l%010d" % (lease - 1))

    def _check_lease(self, lease: int) -> None:
        with self._lock:
            mine = self._leases.get(lease)
        if mine is not None and mine[1] <= time.monotonic():
            raise StoreError(f"{self.url}: lease {lease} not found (expired or revoked)")

    def grant_lease(self, ttl: int) -> int:
        path = self._call("granting a lease", self._zk.create_async, self._p("leases", "l"),
                          json.dumps({"ttl": ttl}).encode(), ephemeral=True, sequence=True)
        lease = int(path.rsplit("l", 1)[1]) + 1
        try:
            self._call("granting a lease", self._zk.create_async, self._p("lease-records", str(lease)))
        except NodeExistsError:
            pass
        with self._lock:
            self._leases[lease] = [ttl, time.monotonic() + ttl]
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="zk-leases", daemon=True)
                self._reaper.start()
        return lease

    def keepalive(self, lease: int) -> bool:
        self._wait_connected()  # away: an error, not an expiry (the lease stands still meanwhile)
        with self._lock:
            mine = self._leases.get(lease)
        if mine is not None and mine[1] <= time.monotonic():
            return False  # expired: the reaper is deleting its keys
        if self._call("renewing a lease", self._zk.exists_async, self._lease_path(lease)) is None:
            with self._lock:
                self._leases.pop(lease, None)
            return False  # revoked, or its session ended
        if mine is not None:
            with self._lock:
                mine[1] = time.monotonic() + mine[0]
        return True

    def revoke(self, lease: int) -> None:
        try:
            self._call("revoking a lease", self._zk.delete_async, self._lease_path(lease))
        except NoNodeError:
            pass
        with self._lock:
            self._leases.pop(lease, None)
        self._drop_keys(lease)

    def _drop_keys(self, lease: int) -> None:
        """Delete lease's keys (one revision, through the log), then its record."""
        def plan(rev: int, current: dict):
            # Read after `rev` (the multi's check on it covers this scan too).
            doomed = [(kv, version) for kv, version in self._scan("") if kv.lease == lease]
            return ([("delete", self._path(kv.key), None, version) for kv, version in doomed],
                    [("delete", kv.key, None) for kv, _ in doomed], None)

        self._write(plan, f"deleting the keys of lease {lease}")
        try:
            self._call("revoking a lease", self._zk.delete_async, self._p("lease-records", str(lease)))
        except NoNodeError:
            pass

    def _reap(self) -> None:
        """Revoke our leases past their deadline; delete the keys of anyone's
        lease whose session ended."""
        next_orphans = 0.0
        while not self._closed.wait(0.1):
            if not self._connected.is_set():
                continue  # no lease ends while ZooKeeper is away
            now = time.monotonic()
            with self._lock:
                due = [lease for lease, (_, deadline) in self._leases.items() if deadline <= now]
            try:
                for lease in due:
                    self.revoke(lease)
                if now >= next_orphans:
                    next_orphans = now + ORPHAN_INTERVAL
                    self._reap_orphans()
            except StoreError as e:
                log.warning("%s: ending leases: %s (tried again in a second)", self.url, e)
                self._closed.wait(1.0)

    def _reap_orphans(self) -> None:
        # Records first: a lease's ephemeral node is made before its record,
        # so a record seen here whose node is missing below really is orphaned.
        records = self._children(self._p("lease-records"))
        if not records:
            return
        live = {int(name[1:]) + 1 for name in self._children(self._p("leases"))}
        for name in records:
            if int(name) not in live:
                log.info("%s: lease %s ended with its owner's session: deleting its keys", self.url, name)
                self._drop_keys(int(name))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if not self._started:
            return
        try:
            self._zk.stop()
            self._zk.close()
        except Exception as e:  # closing must not fail a shutdown
            log.debug("%s: closing: %s", self.url, e)
