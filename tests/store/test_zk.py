"""ZooKeeper's own faults, on real servers the tests start: a restart under a
watch, a session that expires, an ensemble member killed, digest auth."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from driver.store import Compacted, StoreError, open_store
from driver.store.zookeeper import ZooKeeperStore
from tests.zkserver import ZkEnsemble, ZkServer, ZkTLS

from .conftest import wait_until


@pytest.fixture
def zk():
    """A server of the test's own: these tests stop and restart it."""
    with ZkServer() as server:
        yield server


def _root() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}"


def _store(url: str, root: str, **kw) -> ZooKeeperStore:
    hosts = url.split("://", 1)[1].split(",")
    return ZooKeeperStore(hosts, root, **kw)


def _write(store, key, value, timeout=20.0):
    """Put, retrying while ZooKeeper comes back; the revision."""
    def attempt():
        try:
            return store.put(key, value)
        except StoreError:
            return None
    return wait_until(attempt, timeout=timeout, interval=0.1, what=f"a write of {key} to succeed")


def _exactly_once(follower, writes: dict[str, int]) -> None:
    """Every write reached the follower as one event at its revision: none
    lost, none repeated, in revision order."""
    revisions = [e.revision for e in follower.events]
    assert revisions == sorted(set(revisions)), f"events repeated or out of order: {follower.events}"
    seen = {(e.key, e.revision) for e in follower.events}
    assert set(writes.items()) <= seen, f"lost: {set(writes.items()) - seen}"


def test_restart_mid_watch_resumes_without_loss_or_repeat(zk, followers):
    root = _root()
    watcher, writer = _store(zk.url, root), _store(zk.url, root)
    try:
        writes = {"w/1": writer.put("w/1", "a")}
        f = followers(watcher, "w/")
        f.wait_state({"w/1": "a"})
        writes["w/2"] = writer.put("w/2", "b")
        f.wait_state({"w/1": "a", "w/2": "b"})
        zk.stop()
        f.wait(lambda: f.errors, what="the watch to notice ZooKeeper is gone")
        zk.start()  # same port, same data
        # Written before the watcher is back, perhaps: it reads them from the log.
        writes["w/3"] = _write(writer, "w/3", "c")
        writes["w/1"] = writer.put("w/1", "a2")
        f.wait_state({"w/1": "a2", "w/2": "b", "w/3": "c"}, timeout=20)
        assert len(f.snapshots) == 1, "the watch listed again instead of resuming"
        _exactly_once(f, {k: v for k, v in writes.items() if k != "w/1"} | {"w/1": writes["w/1"]})
        assert watcher.list("w/")[0] == writer.list("w/")[0]
    finally:
        watcher.close()
        writer.close()


def test_an_outage_longer_than_a_lease_ends_no_lease(zk):
    """The owner keeps trying to renew while ZooKeeper is down: its keys are
    there after the outage (as etcd keeps leases across its own outage)."""
    store = _store(zk.url, _root())
    try:
        lease = store.grant_lease(1)
        store.put("o/k", "v", lease=lease)
        zk.stop()
        down = time.monotonic()
        while time.monotonic() - down < 2.5:  # over twice the TTL
            with pytest.raises(StoreError):
                store.keepalive(lease)
            time.sleep(0.2)  # the keepalive period
        zk.start()
        assert wait_until(lambda: _keepalive_answers(store, lease), timeout=15, interval=0.2,
                          what="a keepalive answered") == "kept"
        assert store.get("o/k").value == "v"
    finally:
        store.close()


def _keepalive_answers(store, lease):
    try:
        return "kept" if store.keepalive(lease) else "lost"
    except StoreError:
        return None


def _expire(store: ZooKeeperStore, address: str) -> None:
    """End store's ZooKeeper session from outside, as the server does when a
    host stops answering: a second client takes the session over and closes it."""
    session_id, password = store._zk.client_id
    thief = KazooClient(hosts=address, client_id=(session_id, password))
    thief.start(timeout=10)
    thief.stop()
    thief.close()


def test_session_expiry_ends_its_leases_and_the_watch_recovers(zk, followers):
    root = _root()
    owner, other = _store(zk.url, root), _store(zk.url, root)
    try:
        lease = owner.grant_lease(60)
        owner.put("m/owner", "here", lease=lease)
        owner.put("m/plain", "stays")
        before = owner._zk.client_id[0]
        watching_other, watching_owner = followers(other, "m/"), followers(owner, "m/")
        for f in (watching_other, watching_owner):
            f.wait_state({"m/owner": "here", "m/plain": "stays"})

        _expire(owner, zk.address)

        # Its lease's key goes, as a delete every watcher sees, long before the TTL.
        for f in (watching_other, watching_owner):
            f.wait_state({"m/plain": "stays"}, timeout=15)
            assert [(e.kind, e.key) for e in f.events][-1] == ("delete", "m/owner")
        assert other.get("m/owner") is None
        wait_until(lambda: owner._zk.client_id and owner._zk.client_id[0] != before, timeout=10,
                   what="a new session")
        assert owner.keepalive(lease) is False
        with pytest.raises(StoreError, match="lease .* not found"):
            owner.put("m/late", "x", lease=lease)
        # The owner's store works on in its new session, and so does its watch.
        again = owner.grant_lease(60)
        _write(owner, "m/new", "1")
        owner.put("m/owner", "back", lease=again)
        for f in (watching_other, watching_owner):
            f.wait_state({"m/plain": "stays", "m/new": "1", "m/owner": "back"}, timeout=15)
            revisions = [e.revision for e in f.events]
            assert revisions == sorted(set(revisions))
    finally:
        owner.close()
        other.close()


CRASHING_OWNER = """
import sys, time
from driver.store.zookeeper import ZooKeeperStore
store = ZooKeeperStore([sys.argv[1]], sys.argv[2], session_timeout=1.0)
store.put("n/dying", "x", lease=store.grant_lease(3600))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_crashed_owners_lease_ends_with_its_session(zk, followers):
    """A process killed without revoking its lease: the lease's ephemeral node
    goes with its session, and another store deletes the keys (through the
    log, so watchers see it), long before the lease's hour is up."""
    root = _root()
    survivor = _store(zk.url, root)
    owner = subprocess.Popen([sys.executable, "-c", CRASHING_OWNER, zk.address, root],
                             stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[2]))
    try:
        assert owner.stdout.readline().strip() == "ready"
        survivor.grant_lease(60)  # a store holding leases looks after orphans
        f = followers(survivor, "n/")
        f.wait_state({"n/dying": "x"})
        owner.kill()
        owner.wait(10)
        f.wait_state({}, timeout=15)
        assert [(e.kind, e.key) for e in f.events] == [("delete", "n/dying")]
    finally:
        owner.kill()
        owner.wait(10)
        survivor.close()


def test_ensemble_member_killed_reads_and_writes_go_on(followers):
    with ZkEnsemble(3) as ensemble:
        root = _root()
        store, writer = _store(ensemble.url, root), _store(ensemble.url, root)
        try:
            f = followers(store, "e/")
            f.wait(lambda: f.snapshots, what="the first snapshot")
            writes = {f"e/{i}": store.put(f"e/{i}", str(i)) for i in range(3)}
            f.wait_state({f"e/{i}": str(i) for i in range(3)})
            ensemble.leader().kill()  # the hardest member to lose: an election follows
            for i in range(3, 6):
                writes[f"e/{i}"] = _write(writer, f"e/{i}", str(i))
            writes["e/6"] = _write(store, "e/6", "6")
            assert store.get("e/6").value == "6" and writer.get("e/0").value == "0"
            f.wait_state({f"e/{i}": str(i) for i in range(7)}, timeout=20)
            _exactly_once(f, writes)
            assert sum(m.mode() in ("leader", "follower") for m in ensemble.members) == 2
        finally:
            store.close()
            writer.close()


def test_digest_auth(zk_server):
    root = _root()
    owner = open_store(f"{zk_server.url}{root}", user="pyo", password="right-pw")
    try:
        owner.put("a/k", "v")
        for user, password in (("pyo", "wrong-pw"), (None, None)):
            intruder = open_store(f"{zk_server.url}{root}", user=user, password=password)
            try:
                with pytest.raises(StoreError) as info:
                    intruder.get("a/k")
                message = str(info.value)
                assert f"ZooKeeper at {zk_server.address}{root}" in message
                assert "access denied" in message and "--etcd-user and --etcd-password" in message
            finally:
                intruder.close()
        assert owner.get("a/k").value == "v"
    finally:
        owner.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "2")
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {name: str(d / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_tls_with_client_certificates(certs, watchers):
    tls = ZkTLS(cert=certs["server.crt"], key=certs["server.key"], ca=certs["ca.crt"], client_auth=True)
    with ZkServer(tls=tls) as server:
        assert server.url.startswith("zks://")
        store = open_store(server.url, cacert=certs["ca.crt"], cert=certs["client.crt"], key=certs["client.key"])
        try:
            w = watchers(store, "", store.list("")[1] + 1)
            store.put("k", "v")
            assert store.get("k").value == "v"
            assert [e.key for e in w.wait_for(1)] == ["k"]
        finally:
            store.close()
        # Without a client certificate, or without our CA, or in plain text: refused, naming ZooKeeper.
        address = server.url.split("://", 1)[1]
        for url, kw, why in ((server.url, {"cacert": certs["ca.crt"]}, "BAD_CERTIFICATE"),
                             (server.url, {}, "CERTIFICATE_VERIFY_FAILED"),
                             (f"zk://{address}", {}, "connection")):
            bad = open_store(url, **kw)
            try:
                with pytest.raises(StoreError) as info:
                    bad.get("k")
                assert f"ZooKeeper at {address}/pyoverlay" in str(info.value) and why in str(info.value)
            finally:
                bad.close()
    with pytest.raises(StoreError, match="cannot load TLS files.*nope.pem"):
        open_store("zks://127.0.0.1:2281", cacert=certs["ca.crt"] + ".nope.pem")


def test_the_change_log_is_trimmed_to_its_history(zk_server):
    store = _store(zk_server.url, _root(), history=20)
    try:
        first = store.put("t/0", "0")
        for i in range(1, 60):
            last = store.put(f"t/{i % 5}", str(i))
        # Trimmed in the background, the oldest revisions first.
        wait_until(lambda: len(store._zk.get_children(store._p("log"))) <= 22, timeout=10, what="a trimmed log")
        with pytest.raises(Compacted):
            next(iter(store.watch("t/", first, threading.Event())))
        stop = threading.Event()
        assert [e.revision for e in next(iter(store.watch("t/", last, stop)))] == [last]
        stop.set()
    finally:
        store.close()


def test_a_trim_asked_for_while_one_runs_is_not_dropped(zk_server):
    """Trims run in one background thread. The last write's trim, asked for
    while an earlier one is still running, must still happen: with nothing
    written after it, nothing else would trim the log (CI caught the log left
    two nodes long)."""
    store = _store(zk_server.url, _root(), history=20)
    compact = store.compact

    def slow_compact(revision):
        time.sleep(0.3)  # the point of the test: a trim long enough that later writes ask while it runs
        compact(revision)

    def oldest_logged() -> int:
        return min(map(int, store._zk.get_children(store._p("log"))), default=0)

    store.compact = slow_compact
    try:
        for i in range(60):
            store.put(f"t/{i % 5}", str(i))
        rev = store.put("t/last", "x")
        wait_until(lambda: oldest_logged() >= rev - 20 - 1, timeout=10,
                   what="the log trimmed to the last write's history")
    finally:
        store.close()
