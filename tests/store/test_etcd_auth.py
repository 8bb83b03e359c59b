"""etcd with authentication on: pyoverlay as a user whose role may touch
only its own prefix (the conformance suite runs as that user too, the
"etcd-auth" backend). Tokens expire and are bought again; a wrong password,
missing credentials and a prefix outside the role are refused with messages
that say what to do."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import pytest

from driver.store import StoreError, open_store
from driver.store.etcd import EtcdStore
from tests.conftest import HostNamespace
from tests.etcdserver import EtcdServer, EtcdTLS
from tests.store.conftest import (AUTH_PASSWORD, AUTH_PREFIX, AUTH_TOKEN_TTL, AUTH_USER, Watcher, enable_auth,
                                  etcd_auth_store)
from tests.test_fuzz import ServedPlugin


def test_wrong_password_is_refused_naming_the_store_and_the_flags(etcd_auth_server):
    store = etcd_auth_store(etcd_auth_server, password="not-the-password")
    with pytest.raises(StoreError) as refused:
        store.put("k", "v")
    message = str(refused.value)
    assert etcd_auth_server.endpoint in message and "authentication failed" in message, message
    assert f"refused user {AUTH_USER!r}" in message and "--etcd-password" in message, message


def test_no_credentials_on_an_etcd_with_auth_says_to_pass_them(etcd_auth_server):
    store = EtcdStore([etcd_auth_server.endpoint], prefix=f"{AUTH_PREFIX}{uuid.uuid4().hex[:8]}/")
    with pytest.raises(StoreError) as refused:
        store.get("k")
    assert "--etcd-user" in str(refused.value) and etcd_auth_server.endpoint in str(refused.value), refused.value


def test_the_role_confines_the_user_to_its_prefix(etcd_auth_server):
    outside = etcd_auth_store(etcd_auth_server, prefix="/pyoverlay/")
    with pytest.raises(StoreError) as refused:
        outside.put("k", "v")
    message = str(refused.value)
    assert "permission denied" in message and "grant-permission" in message and "/pyoverlay/" in message, message
    inside = etcd_auth_store(etcd_auth_server)
    inside.put("k", "v")
    assert inside.get("k").value == "v"


def test_credentials_for_an_etcd_without_authentication_are_not_needed(etcd_server):
    store = EtcdStore([etcd_server.endpoint], prefix=f"/noauth-{uuid.uuid4().hex[:8]}/", user="x", password="y")
    store.put("k", "v")
    assert store.get("k").value == "v"


def test_half_the_credentials_is_an_error():
    with pytest.raises(StoreError, match="give both"):
        open_store("etcd://127.0.0.1:1", user="someone")


def test_an_expired_token_is_renewed(etcd_auth_server):
    store = etcd_auth_store(etcd_auth_server)
    store.put("k", "1")
    first = store._token
    assert first, "no token was bought"
    # A simple token lives AUTH_TOKEN_TTL seconds after its last use; waiting
    # that long is the point here, not a stand-in for a condition.
    time.sleep(AUTH_TOKEN_TTL + 1.5)
    assert store.get("k").value == "1"
    assert store._token and store._token != first, "the expired token was not replaced"


def test_a_restarted_member_forgets_tokens_and_the_store_logs_in_again(etcd_auth_server):
    store = etcd_auth_store(etcd_auth_server)
    store.put("k", "1")
    before = store._token
    etcd_auth_server.restart()  # simple tokens live in the member's memory only
    assert store.get("k").value == "1"
    assert store._token != before
    revision = store.put("k", "2")
    watcher = Watcher(store, "", revision)
    try:
        assert [e.value for e in watcher.wait_for(1)] == ["2"]
    finally:
        watcher.close()


def test_concurrent_requests_share_one_login(etcd_auth_server):
    store = etcd_auth_store(etcd_auth_server)
    errors = []

    def work(n):
        try:
            for i in range(5):
                store.put(f"k{n}-{i}", str(i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(store.list("")[0]) == 40


# -- with TLS client certificates --------------------------------------------------


def _pki(d, client_subject: str) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1, a client certificate with client_subject."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=auth-ca", "-days", "2")
    for who, subject, usage in (("server", "/CN=etcd", "serverAuth,clientAuth"), ("client", client_subject, "clientAuth")):
        (d / f"{who}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{who}.crt", "-days", "2", "-extfile", f"{who}.ext")
    return {f: str(d / f) for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.mark.parametrize("subject,works", [("/O=pyoverlay", True), ("/CN=pyoverlay", False)],
                         ids=["certificate without CN", "certificate with CN"])
def test_client_certificates_with_auth(tmp_path, subject, works):
    """etcd --client-cert-auth with authentication on. etcd 3.4's JSON gateway
    (which pyoverlay speaks) cannot log in by certificate name: it refuses a
    certificate with a CN, and pyoverlay says what to do instead; with a
    certificate without one, the password logs in and the role applies."""
    pki = _pki(tmp_path, subject)
    tls = EtcdTLS(cert=pki["server.crt"], key=pki["server.key"], ca=pki["ca.crt"], client_ca=pki["ca.crt"],
                  client_cert=pki["server.crt"], client_key=pki["server.key"])
    with EtcdServer(tls=tls, workdir=str(tmp_path)) as server:
        enable_auth(server, AUTH_USER, AUTH_PASSWORD, AUTH_PREFIX)
        store = open_store(server.url, prefix=f"{AUTH_PREFIX}tls/", cacert=pki["ca.crt"], cert=pki["client.crt"],
                           key=pki["client.key"], user=AUTH_USER, password=AUTH_PASSWORD)
        if works:
            store.put("k", "v")
            assert store.get("k").value == "v"
            outside = open_store(server.url, prefix="/pyoverlay/", cacert=pki["ca.crt"], cert=pki["client.crt"],
                                 key=pki["client.key"], user=AUTH_USER, password=AUTH_PASSWORD)
            with pytest.raises(StoreError, match="permission denied"):
                outside.put("k", "v")
        else:
            with pytest.raises(StoreError) as refused:
                store.put("k", "v")
            assert "without a common name" in str(refused.value) and "--etcd-user" in str(refused.value), refused.value


# -- the real path: `pyoverlay serve` with the environment of the flags -------------


def test_pyoverlay_serve_logs_in_from_its_environment(tmp_path):
    """`pyoverlay serve` (gunicorn) with PYOVERLAY_ETCD_USER/PASSWORD against an
    etcd with authentication on: calls work; with a wrong password it still
    serves its socket and every call says what to fix."""
    host = HostNamespace()
    etcd = EtcdServer(host.addr, netns=host.name, workdir=str(tmp_path))
    plugins = []
    try:
        etcd.start()
        enable_auth(etcd, AUTH_USER, AUTH_PASSWORD, AUTH_PREFIX)
        url = f"etcd://{host.addr}:{etcd.client_port}"
        for password, works in ((AUTH_PASSWORD, True), ("wrong", False)):
            (tmp_path / "plugin").mkdir(exist_ok=True)
            plugin = ServedPlugin(host, tmp_path / "plugin", store=url, env={
                "PYOVERLAY_ETCD_USER": AUTH_USER, "PYOVERLAY_ETCD_PASSWORD": password,
                "PYOVERLAY_ETCD_PREFIX": f"{AUTH_PREFIX}serve/", "PYOVERLAY_CATALOG": "0"})
            plugins.append(plugin)
            status, text = plugin.request("IpamDriver.RequestPool", json.dumps(
                {"AddressSpace": "pyoverlay", "Pool": "10.84.0.0/24"}).encode())
            answer = json.loads(text)
            if works:
                assert answer.get("PoolID") == "10.84.0.0/24", answer
            else:
                assert "authentication failed" in answer.get("Error", "") and "PYOVERLAY_ETCD_PASSWORD" in answer["Error"], answer
                assert plugin.proc.poll() is None, "the plugin exited on a wrong password"
            plugin.stop()
    finally:
        for plugin in plugins:
            if not plugin.log.closed:
                plugin.stop()
        etcd.close()
        host.remove()
