"""Fixtures for the store tests: one conformance suite, every backend
(memory, sqlite, etcd, and etcd with authentication on, as a user whose role
may touch only the tests' prefixes; ZooKeeper, one member and a three-member
ensemble).

The etcd backend runs against a real etcd started once per session on free
loopback ports (etcd_server, in tests/conftest.py: the IPAM tests share it);
each test gets its own key prefix in it, so tests never see each other's
keys (revisions, being store-wide, are never assumed contiguous). ZooKeeper
likewise: one server (zk_server, there too) and one ensemble per session, a
root znode per test.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from driver.store.etcd import EtcdStore
from driver.store.follow import follow
from driver.store.memory import MemoryStore
from driver.store.sqlite import SqliteStore
from tests.etcdserver import EtcdServer
from tests.zkserver import ZkEnsemble

BACKENDS = ["memory", "sqlite", "etcd", "etcd-auth", "zk", "zk3"]


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


class Follower:
    """Runs follow() in a thread and keeps the state its callbacks describe."""

    def __init__(self, store, prefix: str, on_events=None):
        self.snapshots, self.batches, self.errors = [], [], []
        self.state: dict[str, str] = {}
        self.stop = threading.Event()
        self.returned = threading.Event()
        self.crashed = None
        self._extra_on_events = on_events
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(store, prefix), daemon=True)
        self._thread.start()

    def _run(self, store, prefix):
        try:
            follow(store, prefix, self.stop, self._on_snapshot, self._on_events, self._on_error)
        except BaseException as e:  # follow must never get here
            self.crashed = e
        self.returned.set()

    def _on_snapshot(self, kvs, revision):
        with self._cond:
            self.snapshots.append((kvs, revision))
            self.state = {kv.key: kv.value for kv in kvs}
            self._cond.notify_all()

    def _on_events(self, batch):
        if self._extra_on_events:
            self._extra_on_events(batch)
        with self._cond:
            self.batches.append(batch)
            for e in batch:
                if e.kind == "put":
                    self.state[e.key] = e.value
                else:
                    self.state.pop(e.key, None)
            self._cond.notify_all()

    def _on_error(self, exc):
        with self._cond:
            self.errors.append(exc)
            self._cond.notify_all()

    @property
    def events(self):
        return [e for b in self.batches for e in b]

    def wait(self, predicate, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout} s waiting for {what}; state={self.state} "
                                f"snapshots={len(self.snapshots)} errors={self.errors[-3:]}")
                self._cond.wait(left)

    def wait_state(self, expected: dict, timeout: float = 10.0):
        self.wait(lambda: self.state == expected, timeout, f"state {expected}")

    def close(self, timeout: float = 3.0) -> float:
        began = time.monotonic()
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "follow did not return after stop was set"
        assert self.crashed is None, f"follow raised {self.crashed!r}"
        return time.monotonic() - began


@pytest.fixture
def followers():
    started = []

    def start(store, prefix, **kw):
        f = Follower(store, prefix, **kw)
        started.append(f)
        return f

    yield start
    for f in started:
        f.close()


def etcd_store(server: EtcdServer, **kw) -> EtcdStore:
    kw.setdefault("prefix", f"/test-{uuid.uuid4().hex[:8]}/")
    return EtcdStore([server.endpoint], **kw)


# etcd with authentication on: root, and a user whose role may read and
# write only keys under /test- (every test's prefix), by password.
AUTH_USER, AUTH_PASSWORD, AUTH_PREFIX = "pyoverlay", "s3cret-pw", "/test-"
#: A short token TTL, so that tests run across token expiry and renewal.
AUTH_TOKEN_TTL = 2


def _b64(text: str) -> str:
    import base64
    return base64.b64encode(text.encode()).decode()


def enable_auth(server: EtcdServer, user: str, password: str | None, prefix: str) -> None:
    """root, a role with readwrite on prefix, user in it; then auth on.
    password None: a user with no password (client certificate name only)."""
    calls = [
        ("/v3/auth/user/add", {"name": "root", "password": "root-pw"}),
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/role/add", {"name": "pyo-rw"}),
        ("/v3/auth/role/grant", {"name": "pyo-rw", "perm": {
            "key": _b64(prefix), "range_end": _b64(prefix[:-1] + chr(ord(prefix[-1]) + 1)), "permType": "READWRITE"}}),
        ("/v3/auth/user/add", {"name": user, "password": password or "", "options": {"no_password": password is None}}),
        ("/v3/auth/user/grant", {"user": user, "role": "pyo-rw"}),
        ("/v3/auth/enable", {}),
    ]
    for path, body in calls:
        answer = server.request("POST", path, body)
        assert "error" not in answer and "code" not in answer, (path, answer)


@pytest.fixture(scope="session")
def etcd_auth_server():
    server = EtcdServer(extra_args=("--auth-token-ttl", str(AUTH_TOKEN_TTL)))
    server.start()
    enable_auth(server, AUTH_USER, AUTH_PASSWORD, AUTH_PREFIX)
    yield server
    server.close()


def etcd_auth_store(server: EtcdServer, **kw) -> EtcdStore:
    kw.setdefault("prefix", f"{AUTH_PREFIX}{uuid.uuid4().hex[:8]}/")
    kw.setdefault("user", AUTH_USER)
    kw.setdefault("password", AUTH_PASSWORD)
    return EtcdStore([server.endpoint], **kw)


@pytest.fixture(scope="session")
def zk_ensemble():
    ensemble = ZkEnsemble(3)
    ensemble.start()
    yield ensemble
    ensemble.close()


def zk_store(url: str, **kw):
    """A store in a root of its own at url (a zk:// URL without a path)."""
    from driver.store import open_store

    return open_store(f"{url}/test-{uuid.uuid4().hex[:8]}", **kw)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def store(backend, request, tmp_path):
    if backend == "memory":
        s = MemoryStore()
    elif backend == "sqlite":
        s = SqliteStore(str(tmp_path / "state.db"))
    elif backend == "zk":
        s = zk_store(request.getfixturevalue("zk_server").url)
    elif backend == "zk3":
        s = zk_store(request.getfixturevalue("zk_ensemble").url)
    elif backend == "etcd-auth":
        s = etcd_auth_store(request.getfixturevalue("etcd_auth_server"))
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
