"""open_store(): the URL forms the command line accepts."""

from __future__ import annotations

import pytest

import driver.store as store_pkg
from driver.store import StoreError, open_store
from driver.store.etcd import EtcdStore
from driver.store.memory import MemoryStore
from driver.store.sqlite import SqliteStore


def test_reexports_the_interface():
    for name in ("Store", "KeyValue", "Event", "StoreError", "Compacted", "open_store"):
        assert hasattr(store_pkg, name)


def test_memory():
    assert isinstance(open_store("memory://"), MemoryStore)


def test_sqlite(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/x/state.db")
    assert isinstance(s, SqliteStore) and s.path == f"{tmp_path}/x/state.db"


@pytest.mark.parametrize("url, kw, endpoints", [
    ("etcd://h1:2379,h2:2380", {}, ["http://h1:2379", "http://h2:2380"]),
    ("etcd://h1", {}, ["http://h1:2379"]),
    ("etcds://h1:2379", {}, ["https://h1:2379"]),
    ("etcd://[fd00::1]:2379,10.0.0.1", {}, ["http://[fd00::1]:2379", "http://10.0.0.1:2379"]),
])
def test_etcd_endpoints(url, kw, endpoints):
    s = open_store(url, prefix="/x/", **kw)
    assert isinstance(s, EtcdStore)
    assert s.endpoints == endpoints and s.prefix == b"/x/"
    assert s.url == "etcd at " + ",".join(endpoints)


def test_missing_tls_file_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot load TLS files.*nope.pem"):
        open_store("etcd://h1:2379", cacert=str(tmp_path / "nope.pem"))


@pytest.mark.parametrize("url", ["redis://h:6379", "consul://h", "h1:2379", "sqlite://relative/state.db",
                                 "etcd://", "etcd://h:port", "etcd://fd00::1"])
def test_bad_urls_say_what_is_accepted(url):
    with pytest.raises(ValueError) as info:
        open_store(url)
    message = str(info.value)
    assert url in message or "sqlite" in message or "IPv6" in message or "port" in message
    if not url.startswith(("sqlite", "etcd://h", "etcd://f")):
        assert "memory://" in message and "sqlite:///" in message and "etcd://" in message
