"""The etcd backend against real etcd servers: failover, outages, restarts,
compaction, a stalled server, TLS, and the test server's own netns mode."""

from __future__ import annotations

import base64
import socket
import subprocess
import time
import uuid

import pytest

from driver.store import StoreError, open_store
from driver.store.etcd import REQUEST_TIMEOUT, EtcdStore, _Unsure
from tests.etcdserver import EtcdServer, EtcdTLS

from .conftest import etcd_store
from .tcpproxy import TcpProxy


@pytest.fixture
def etcd():
    """An etcd of the test's own, for tests that stop, pause or restart it."""
    server = EtcdServer()
    server.start()
    yield server
    server.close()


def _dead_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


def test_prefix_is_applied_and_isolates(etcd_server):
    a = etcd_store(etcd_server, prefix="/pa-%s/" % uuid.uuid4().hex[:6])
    b = etcd_store(etcd_server, prefix="/pb-%s/" % uuid.uuid4().hex[:6])
    a.put("k", "in a")
    assert b.get("k") is None and b.list("")[0] == []
    raw = etcd_server.request("POST", "/v3/kv/range",
                              {"key": base64.b64encode((a.prefix.decode() + "k").encode()).decode()})
    assert base64.b64decode(raw["kvs"][0]["value"]) == b"in a"
    assert [kv.key for kv in a.list("")[0]] == ["k"]  # keys come back without the prefix


def test_first_endpoint_dead_fails_over(etcd_server, watchers):
    store = EtcdStore([_dead_endpoint(), etcd_server.endpoint], prefix=f"/fo-{uuid.uuid4().hex[:6]}/")
    began = time.monotonic()
    rev = store.put("k", "v")  # a refused connection surely sent nothing: safe to move on
    assert store.get("k").value == "v"
    assert store.txn({"k": rev}, {"k": "w"})
    w = watchers(store, "", rev)
    assert [e.value for e in w.wait_for(2)] == ["v", "w"]
    assert time.monotonic() - began < 2.0


def test_write_whose_answer_is_lost_is_sent_again(etcd):
    # Two endpoints; the first accepts connections but does not answer.
    other = EtcdServer()
    other.start()
    try:
        prefix = f"/amb-{uuid.uuid4().hex[:6]}/"
        store = EtcdStore([etcd.endpoint, other.endpoint], prefix=prefix, request_timeout=0.5)
        etcd.pause()
        began = time.monotonic()
        assert store.put("k", "v") > 0  # the same key and value again: the same end state
        assert store.txn({"c": 0}, {"c": "claimed"})  # its compare guards a second send
        assert time.monotonic() - began < 4 * 0.5 + 1.0  # one lost answer per call, then the other endpoint
        assert store.get("k").value == "v" and store.get("c").value == "claimed"
    finally:
        etcd.resume()
        other.close()


class _LostAnswers(EtcdStore):
    """Loses the answer of the next `lose` txns, after etcd applied them when
    `applied`: what a client sees when the member it wrote to lost its leader."""

    lose, applied = 0, True

    def _post(self, path, body, *, retry, **kw):
        if path == "/v3/kv/txn" and not retry and self.lose:
            self.lose -= 1
            if self.applied:
                super()._post(path, body, retry=retry, **kw)
            raise _Unsure("etcd at test: leader changed during a write; it may or may not have been applied", 14)
        return super()._post(path, body, retry=retry, **kw)


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "dropped"])
def test_txn_whose_answer_is_lost_is_settled(etcd_server, applied):
    store = _LostAnswers([etcd_server.endpoint], prefix=f"/lost-{uuid.uuid4().hex[:6]}/")
    store.applied = applied
    store.lose = 1
    assert store.txn({"claim": 0}, {"claim": "mine"})  # a claim: applied once, reported once
    assert store.get("claim").value == "mine"
    rev = store.get("claim").mod_revision
    store.lose = 1
    assert store.txn({"claim": rev}, {"claim": "updated"})  # a compare-and-set
    rev2 = store.get("claim").mod_revision
    assert store.get("claim").value == "updated"
    store.lose = 1
    assert store.txn({"claim": rev2}, delete=["claim"]) and store.get("claim") is None


def test_lost_claim_on_a_key_another_writer_holds_is_refused(etcd_server):
    store = _LostAnswers([etcd_server.endpoint], prefix=f"/lost-{uuid.uuid4().hex[:6]}/")
    store.put("claim", "theirs")
    store.lose, store.applied = 1, False
    assert not store.txn({"claim": 0}, {"claim": "mine"})
    assert store.get("claim").value == "theirs"


@pytest.mark.parametrize("how", ["killed", "paused"])
def test_outage_fails_fast_and_names_the_store(etcd, how):
    store = EtcdStore([etcd.endpoint], prefix="/down/")  # default timeouts
    store.put("k", "v")
    etcd.kill() if how == "killed" else etcd.pause()
    calls = [lambda: store.get("k"), lambda: store.put("k", "w"), lambda: store.grant_lease(5)]
    # A paused etcd costs the full request timeout per call: one call shows it.
    for call in calls if how == "killed" else calls[:1]:
        began = time.monotonic()
        with pytest.raises(StoreError) as info:
            call()
        assert time.monotonic() - began < REQUEST_TIMEOUT + 1.0  # the request timeout, not a hang
        assert f"etcd at {etcd.endpoint}" in str(info.value)
    if how == "killed":
        assert "unreachable" in str(info.value) and "check --store" in str(info.value)
        etcd.start()
    else:
        etcd.resume()
    assert store.get("k").value == "v"  # and it recovers by itself


@pytest.mark.parametrize("kill", [False, True], ids=["stop", "kill"])
def test_follow_resumes_after_restart_without_losing_events(etcd, followers, kill):
    prefix = f"/rs-{uuid.uuid4().hex[:6]}/"
    writer = EtcdStore([etcd.endpoint], prefix=prefix)
    f = followers(EtcdStore([etcd.endpoint], prefix=prefix, request_timeout=1.0), "k/")
    f.wait(lambda: f.snapshots, what="snapshot")
    for i in range(20):
        writer.put(f"k/{i}", str(i))  # the follower may still be behind when etcd goes
    etcd.restart(kill=kill)
    for i in range(20, 40):
        writer.put(f"k/{i}", str(i))
    writer.delete("k/0")
    expected = {f"k/{i}": str(i) for i in range(1, 40)}
    f.wait_state(expected)
    assert f.errors, "the restart went unnoticed: nothing was tested"
    assert len(f.snapshots) == 1  # resumed from its revision, no re-list
    revs = [e.revision for e in f.events]
    assert revs == sorted(set(revs)) and len(revs) == 41  # each event once, in order


def test_compaction_during_an_outage_takes_a_new_snapshot(etcd_server, followers):
    prefix = f"/cp-{uuid.uuid4().hex[:6]}/"
    proxy = TcpProxy(("127.0.0.1", etcd_server.client_port))
    try:
        writer = etcd_store(etcd_server, prefix=prefix)
        writer.put("a/1", "1")
        f = followers(EtcdStore([proxy.endpoint], prefix=prefix, request_timeout=1.0), "a/")
        f.wait_state({"a/1": "1"})
        proxy.cut()  # the follower is cut off while history moves on and is compacted
        f.wait(lambda: f.errors, what="the follower noticing the cut")
        writer.put("a/2", "2")
        writer.delete("a/1")
        writer.compact(writer.put("a/3", "3"))
        proxy.heal()
        f.wait_state({"a/2": "2", "a/3": "3"})
        assert len(f.snapshots) == 2
        assert any(type(e).__name__ == "Compacted" for e in f.errors)
    finally:
        proxy.close()


def test_watch_moves_to_the_next_endpoint_when_its_own_fails(etcd_server, followers):
    prefix = f"/mv-{uuid.uuid4().hex[:6]}/"
    proxy = TcpProxy(("127.0.0.1", etcd_server.client_port))
    try:
        writer = etcd_store(etcd_server, prefix=prefix)
        f = followers(EtcdStore([proxy.endpoint, etcd_server.endpoint], prefix=prefix, request_timeout=1.0), "m/")
        f.wait(lambda: f.snapshots, what="snapshot")
        writer.put("m/1", "1")
        f.wait_state({"m/1": "1"})  # an event: the watch stream runs through the proxy
        proxy.cut()  # the first endpoint is gone for good
        writer.put("m/2", "2")
        f.wait_state({"m/1": "1", "m/2": "2"})
        assert f.errors and len(f.snapshots) == 1
    finally:
        proxy.close()


def test_stalled_etcd_is_detected_and_followed_again(etcd, followers):
    prefix = f"/st-{uuid.uuid4().hex[:6]}/"
    writer = EtcdStore([etcd.endpoint], prefix=prefix)
    f = followers(EtcdStore([etcd.endpoint], prefix=prefix, request_timeout=0.5, watch_idle_timeout=0.5), "s/")
    f.wait(lambda: f.snapshots, what="snapshot")
    writer.put("s/1", "1")
    f.wait_state({"s/1": "1"})  # an event: the watch stream is up
    etcd.pause()  # the stream stays open and says nothing
    began = time.monotonic()
    try:
        f.wait(lambda: any("stopped answering" in str(e) for e in f.errors), timeout=5, what="stall detection")
        assert time.monotonic() - began < 2.5
    finally:
        etcd.resume()
    writer.put("s/2", "2")
    f.wait_state({"s/1": "1", "s/2": "2"})
    assert len(f.snapshots) == 1


def test_idle_stream_is_not_an_error(etcd_server, watchers):
    store = etcd_store(etcd_server, watch_idle_timeout=0.2)
    w = watchers(store, "", store.list("")[1] + 1)
    time.sleep(0.7)  # several idle periods, each followed by a successful probe
    store.put("k", "v")
    assert [e.key for e in w.wait_for(1)] == ["k"]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "2", cwd=d)
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {name: str(d / name) for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def test_tls_with_client_certificates(certs, watchers):
    tls = EtcdTLS(cert=certs["server.crt"], key=certs["server.key"], ca=certs["ca.crt"],
                  client_ca=certs["ca.crt"], client_cert=certs["client.crt"], client_key=certs["client.key"])
    with EtcdServer(tls=tls) as server:
        assert server.url.startswith("etcds://") and server.endpoint.startswith("https://")
        store = open_store(server.url.replace("etcds://", "etcd://"), prefix="/tls/",
                           cacert=certs["ca.crt"], cert=certs["client.crt"], key=certs["client.key"])
        w = watchers(store, "", store.list("")[1] + 1)
        store.put("k", "v")
        assert store.get("k").value == "v"
        assert [e.key for e in w.wait_for(1)] == ["k"]
        # Without a client certificate, or without our CA, etcd is refused with a clear message.
        for kw in ({"cacert": certs["ca.crt"]}, {}):
            bad = open_store(server.url, prefix="/tls/", **kw)
            with pytest.raises(StoreError) as info:
                bad.get("k")
            assert f"etcd at {server.endpoint}" in str(info.value)


def test_server_in_a_network_namespace():
    ns = f"pyov-etcd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with EtcdServer(netns=ns) as server:
            assert server.request("GET", "/health")["health"] == "true"
            with open(f"/proc/{server.pid}/comm") as f:
                assert f.read().strip() == "etcd"  # `ip netns exec` exec'd it: stop/pause by PID reach etcd
            server.compact(1)
            # Its loopback is the namespace's, not ours.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.client_port), timeout=1).close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
